"""The AutoRound orchestrator: calibrate once, then tune and quantize one transformer block at a time."""
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantization.autoround.calibration import capture_block_inputs, prepare_samples, run_block
from quantization.autoround.sign_sgd import SignSGD
from quantization.autoround.wrapper import WrapperLinear
from quantization.quantizers import outlier_mask
from quantization.rtn import SITES, check_layers, rtn_quantize, set_quantized, target_layers, weight_spec


class AutoRound:
    """Quantize `model`'s linear sites in place. `calibration` is a 1-D token array (nsamples windows of seqlen
    tokens are drawn from it) or a ready (nsamples, seqlen) tensor of token ids. `quantize()` returns
    {module name: QuantizedWeight}; `block_losses` holds each block's output MSE before (RTN) and after tuning."""

    def __init__(self, model, calibration, bits=4, group_size=128, sym=False, iters=200, lr=None, nsamples=128,
                 seqlen=None, batch_size=8, sites=SITES, device=None, seed=0, progress=True, log=tqdm.write,
                 outlier_fraction=0.0, act_scales=None):
        if iters < 0:
            raise ValueError(f"iters={iters}: must be 0 (round to nearest) or more")
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        self.model, self.iters, self.sites = model, iters, sites
        self.spec = weight_spec(bits, group_size, sym, outlier_fraction)
        self.act_scales = act_scales or {}  # {module name: per-input-channel scale}: outliers by sensitivity
        self.lr = lr if lr is not None else 1.0 / max(iters, 1)
        self.batch_size, self.seed, self.progress, self.log = batch_size, seed, progress, log
        self.device = device or next(model.parameters()).device
        check_layers(target_layers(model, sites), self.spec)
        self.samples = prepare_samples(model, calibration, nsamples, seqlen, seed)
        self.block_losses = []

    def quantize(self):
        if self.iters == 0:
            return rtn_quantize(self.model, self.spec, self.sites, self.act_scales)
        model = self.model
        was_training = model.training
        model.eval()
        requires_grad = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(self.seed)
        # two streams, as the authors run it: the full-precision model's hidden states give each block's target,
        # while the block is tuned on the inputs the already-quantized blocks produce (so it can also correct
        # their error)
        fp_inputs = q_inputs = capture_block_inputs(model, self.samples, self.batch_size, self.device)
        records = {}
        blocks = model.transformer.h
        for i, block in enumerate(tqdm(blocks, desc="autoround", unit="block", disable=not self.progress)):
            t0 = time.time()
            targets = run_block(block, fp_inputs, self.batch_size)
            before, after, block_records = self.tune_block(block, q_inputs, targets, f"transformer.h.{i}.")
            records.update({f"transformer.h.{i}.{name}": r for name, r in block_records.items()})
            fp_inputs, q_inputs = targets, run_block(block, q_inputs, self.batch_size)
            self.block_losses.append((before, after))
            self.log(f"block {i}: output mse {before:.3e} (round to nearest) -> {after:.3e} ({time.time() - t0:.1f}s)")
        model.train(was_training)
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        return records

    def block_mse(self, block, inputs, targets):
        with torch.no_grad():
            total = sum(F.mse_loss(block(x), y, reduction="sum").item()
                        for x, y in zip(inputs.split(self.batch_size), targets.split(self.batch_size)))
        return total / targets.numel()

    def tune_block(self, block, inputs, targets, prefix=""):
        """Wrap the block's linears, minimise its output MSE for `iters` SignSGD steps, keep the best iterate and
        bake it in: (mse before, mse after, {name in block: QuantizedWeight})."""
        def outliers(name, layer):
            if self.spec.outlier_fraction == 0:
                return None
            return outlier_mask(layer.weight, self.spec.outlier_fraction, self.act_scales.get(prefix + name))
        wrappers = {name: WrapperLinear(layer, self.spec, outliers(name, layer))
                    for name, layer in target_layers(block, self.sites).items()}
        for name, wrapper in wrappers.items():
            block.set_submodule(name, wrapper)
        params = [p for w in wrappers.values() for p in (w.value, w.min_scale, w.max_scale)]
        optimizer = SignSGD(params, lr=self.lr)
        schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=self.iters)
        before = self.block_mse(block, inputs, targets)
        best_loss, best = float("inf"), None
        n = inputs.size(0)
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.iters):
            idx = torch.randint(n, (min(self.batch_size, n),), generator=g).to(inputs.device)
            loss = F.mse_loss(block(inputs[idx]), targets[idx])
            if loss.item() < best_loss:  # the iterate that produced this loss, before the step moves it
                best_loss, best = loss.item(), [p.detach().clone() for p in params]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            for w in wrappers.values():
                w.clamp_()
        with torch.no_grad():
            for p, b in zip(params, best):
                p.copy_(b)
        after = self.block_mse(block, inputs, targets)
        if after > before:  # the best minibatch iterate can lose on the whole set: keep round to nearest then
            with torch.no_grad():
                for w in wrappers.values():
                    w.value.zero_(), w.min_scale.fill_(1.0), w.max_scale.fill_(1.0)
            after = before
        records = {}
        with torch.no_grad():
            for name, wrapper in wrappers.items():
                codes, scale, zero_point, dense = wrapper.quantized_weight()
                records[name] = set_quantized(wrapper.linear, codes, scale, zero_point, self.spec,
                                              wrapper.sparse_weight(dense))
                block.set_submodule(name, wrapper.linear)
        return before, after, records

