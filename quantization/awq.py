"""AWQ (arXiv 2306.00978): protect the weights that meet large activations by scaling their input channels up
before quantizing, s_j = mean|x_j|^alpha, with alpha searched on a grid per folding point to minimise the
transformer block's output error under quantization; the scales are folded into the previous LayerNorm or linear
(quantization/fold.py), so the float model is unchanged and any PTQ method (RTN, GPTQ, AutoRound) then rounds the
scaled weights.

    AWQ(model, calibration, spec).apply()      # folds in place; then rtn_quantize / GPTQ / AutoRound
"""
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantization.autoround.calibration import capture_block_inputs, prepare_samples, run_block
from quantization.fold import fold_scale_into_layernorm, fold_scale_into_linear
from quantization.quantizers import dequantize
from quantization.rtn import rtn_weight

_EPS = 1e-4


def block_groups(block):
    """(name, producer, linears that read it, the fold) for each folding point of a block, in forward order."""
    attn, mlp = block.attn, block.mlp
    return [("ln_1", block.ln_1, [attn.q, attn.k, attn.v], fold_scale_into_layernorm),
            ("attn.v", attn.v, [attn.attn_proj], lambda prev, linears, s: fold_scale_into_linear(prev, linears[0], s)),
            ("ln_2", block.ln_2, [mlp.mlp_up], fold_scale_into_layernorm)]


def awq_scale(mean_abs, alpha):
    """mean|x|^alpha, normalised so that the largest and smallest scales straddle 1 (as the authors do)."""
    s = mean_abs.float().clamp(min=_EPS).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


class AWQ:
    """Search and fold AWQ scales into `model` (in place). `spec` is the weight quantization the scales are searched
    for (round to nearest); `grid` alphas evenly spaced in [0, 1] are tried per folding point."""

    def __init__(self, model, calibration, spec, grid=20, nsamples=128, seqlen=None, batch_size=8, device=None,
                 seed=0, progress=True, log=tqdm.write):
        if grid < 1:
            raise ValueError(f"grid={grid}: must be at least 1")
        self.model, self.spec, self.batch_size, self.progress, self.log = model, spec, batch_size, progress, log
        self.alphas = [i / grid for i in range(grid + 1)]
        self.device = device or next(model.parameters()).device
        self.samples = prepare_samples(model, calibration, nsamples, seqlen, seed)
        self.chosen = {}  # folding point -> alpha

    def group_input_mean_abs(self, block, linear, inputs):
        total, count = [0.0], [0]

        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            total[0] = total[0] + x.abs().sum(0)
            count[0] += x.shape[0]

        handle = linear.register_forward_pre_hook(hook)
        try:
            run_block(block, inputs, self.batch_size)
        finally:
            handle.remove()
        return total[0] / count[0]

    def error(self, block, inputs, targets):
        return sum(F.mse_loss(block(x), y, reduction="sum").item()
                   for x, y in zip(inputs.split(self.batch_size), targets.split(self.batch_size))) / targets.numel()

    def search(self, block, linears, mean_abs, inputs, targets):
        """The alpha (and its scale) whose rounded, scaled weights give the smallest block output error."""
        originals = [linear.weight.detach().clone() for linear in linears]
        best = (float("inf"), 0.0, None)
        try:
            for alpha in self.alphas:
                s = awq_scale(mean_abs, alpha)
                for linear, w in zip(linears, originals):
                    codes, scale, zero_point, sparse = rtn_weight(w.float() * s, self.spec)
                    q = dequantize(codes, scale, zero_point, self.spec)
                    q = q if sparse is None else q + sparse
                    linear.weight.copy_((q / s).to(w.dtype))
                err = self.error(block, inputs, targets)
                if err < best[0]:
                    best = (err, alpha, s)
        finally:
            for linear, w in zip(linears, originals):
                linear.weight.copy_(w)
        return best

    @torch.no_grad()
    def apply(self):
        model = self.model
        was_training = model.training
        model.eval()
        inputs = capture_block_inputs(model, self.samples, self.batch_size, self.device)
        for i, block in enumerate(tqdm(model.transformer.h, desc="awq", unit="block", disable=not self.progress)):
            t0 = time.time()
            targets = run_block(block, inputs, self.batch_size)
            for name, producer, linears, fold in block_groups(block):
                mean_abs = self.group_input_mean_abs(block, linears[0], inputs)
                err, alpha, s = self.search(block, linears, mean_abs, inputs, targets)
                fold(producer, linears, s)
                self.chosen[f"transformer.h.{i}.{name}"] = alpha
            self.log(f"block {i}: alpha " + ", ".join(f"{n} {self.chosen[f'transformer.h.{i}.{n}']:.2f}"
                                                      for n, *_ in block_groups(block)) + f" ({time.time() - t0:.1f}s)")
            inputs = targets  # the folded block computes what the original did
        model.train(was_training)
        return self.chosen
