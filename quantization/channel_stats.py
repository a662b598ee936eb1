"""Per-input-channel statistics of the activations entering each linear layer, over calibration samples: what
outlier selection by sensitivity (|w| times the channel's RMS), AWQ (mean |x|) and SmoothQuant (max |x|) need."""
import torch

from quantization.rtn import SITES, target_layers


@torch.no_grad()
def input_channel_stats(model, samples, batch_size=8, device=None, sites=SITES):
    """{module name: {"mean", "mean_abs", "max_abs", "rms"}} (each one value per input channel) of every target
    linear, from running the model over (nsamples, seqlen) token ids."""
    device = device or next(model.parameters()).device
    layers = target_layers(model, sites)
    sums = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = sums.setdefault(name, {"sum": 0.0, "abs": 0.0, "sq": 0.0, "n": 0,
                                       "max_abs": torch.zeros(x.shape[1], device=x.device)})
            s["sum"] = s["sum"] + x.sum(0)
            s["abs"] = s["abs"] + x.abs().sum(0)
            s["sq"] = s["sq"] + (x * x).sum(0)
            s["max_abs"] = torch.maximum(s["max_abs"], x.abs().amax(0))
            s["n"] += x.shape[0]
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in samples.split(batch_size):
            model(batch.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: {"mean": s["sum"] / s["n"], "mean_abs": s["abs"] / s["n"], "max_abs": s["max_abs"],
                   "rms": (s["sq"] / s["n"]).sqrt()}
            for name, s in sums.items()}


def sensitivity_scales(model, samples, batch_size=8, device=None, sites=SITES):
    """{module name: RMS of each input channel}: outliers by sensitivity pick the largest |w_ij| * rms_j, the weights
    whose rounding error moves the layer's output most (the diagonal of GPTQ's Hessian is 2 rms^2)."""
    return {name: s["rms"] for name, s in input_channel_stats(model, samples, batch_size, device, sites).items()}
