"""GPTQ (arXiv 2210.17323): quantize a layer's weight one input column at a time, pushing each column's rounding
error onto the columns not yet quantized through the inverse Hessian of the layer's inputs (H = 2 X^T X / n).
Block by block over the cached calibration inputs, like AutoRound; the rounding itself is quantizers.quantize.

Options: damp_percent (the fraction of the mean Hessian diagonal added to it), group_size (0: per output channel),
sym, act_order (columns in order of decreasing Hessian diagonal; the group ranges are then taken up front, so a
group is still a run of consecutive columns and packs like any other) and true_sequential (q/k/v, then
attn_proj, then mlp_up, then mlp_down, each seeing the inputs that the already-quantized layers produce) and
fp_target (asymmetric calibration, GPTAQ, arXiv 2504.02692: match the full-precision model's outputs X W^T from the
inputs X~ the quantized model gives the layer, quantized activations and earlier layers' errors included, instead of
X~ W^T; `asymmetric_weight` reduces it to GPTQ on the least-squares solution).
"""
import copy
import dataclasses
import time

import torch
from tqdm.auto import tqdm

from quantization.autoround.calibration import capture_block_inputs, prepare_samples, run_block
from quantization.layers import ActQuant
from quantization.quantizers import compute_qparams, dequantize, outlier_mask, quantize
from quantization.rtn import SITES, check_layers, set_quantized, target_layers, weight_spec

# the order in which true-sequential quantization visits a block's sites
SEQUENTIAL_GROUPS = (("q", "k", "v"), ("attn_proj",), ("mlp_up",), ("mlp_down",))


@torch.no_grad()
def gptq_weight(weight, hessian, spec, damp_percent=0.01, act_order=False, blocksize=128, outliers=None):
    """codes, scale, zero_point of one (out, in) weight given its inputs' Hessian (in, in). With an `outliers` mask
    (dense-and-sparse), also the sparse part: outliers keep their value as updated so far (no rounding error to
    pass on), the dense codes see them as 0, and the ranges are taken without them."""
    W = weight.detach().clone().float()
    keep = None if outliers is None else ~outliers
    H = hessian.clone().float()
    ncols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    column_spec = dataclasses.replace(spec, granularity="per_channel", group_size=0)
    grouped = spec.granularity == "per_group"
    gs = spec.group_size if grouped else ncols
    if grouped:  # keep whole groups inside a block of columns, so a group's range sees the updated weights
        blocksize = gs * max(1, blocksize // gs)
    scale = torch.zeros(W.shape[0], ncols // gs, device=W.device)
    zero_point = torch.zeros_like(scale)
    perm = torch.arange(ncols, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
    if act_order or not grouped:  # ranges fixed up front, from the weight as it is
        s, z = compute_qparams(W if keep is None else W * keep, spec)
        scale.copy_(s.reshape(scale.shape)), zero_point.copy_(z.reshape(scale.shape))
    W, H = W[:, perm], H[perm][:, perm]
    if keep is not None:
        keep = keep[:, perm].float()
        sparse = torch.zeros_like(W)
    H.diagonal().add_(damp_percent * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(W)
    order = perm.tolist()
    for i1 in range(0, ncols, blocksize):
        i2 = min(i1 + blocksize, ncols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = order[i1 + i]
            if grouped and not act_order and col % gs == 0:
                group = W1[:, i:i + gs] if keep is None else W1[:, i:i + gs] * keep[:, i1 + i:i1 + i + gs]
                s, z = compute_qparams(group, column_spec)
                scale[:, col // gs], zero_point[:, col // gs] = s[:, 0], z[:, 0]
            s, z = scale[:, col // gs, None], zero_point[:, col // gs, None]
            w = W1[:, i:i + 1]
            if keep is None:
                c = quantize(w, s, z, column_spec)
                q = dequantize(c, s, z, column_spec)
            else:
                k = keep[:, i1 + i:i1 + i + 1]
                c = quantize(w * k, s, z, column_spec)
                q = dequantize(c, s, z, column_spec)
                sparse[:, i1 + i] = ((w - q) * (1 - k))[:, 0]
                q = q * k + w * (1 - k)
            codes[:, i1 + i] = c[:, 0]
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i:i + 1, i:]
            Err1[:, i] = err[:, 0]
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inverse = torch.argsort(perm)
    codes = codes[:, inverse]
    if keep is not None:
        return codes, scale.reshape(-1, 1), zero_point.reshape(-1, 1), sparse[:, inverse]
    return codes, scale.reshape(-1, 1), zero_point.reshape(-1, 1)


@torch.no_grad()
def asymmetric_weight(weight, hessian, cross, damp_percent=0.01):
    """The weight that GPTQ quantizes under asymmetric calibration: W + W D H^-1, with H = 2 X~^T X~ / n the
    quantized inputs' Hessian (damped as gptq_weight damps it) and D = 2 (X - X~)^T X~ / n, X the full-precision
    inputs. Undamped it is the least-squares W* = W X^T X~ (X~^T X~)^-1, and ||X W^T - X~ Q^T||^2 =
    ||X W^T - X~ W*^T||^2 + ||X~ (W* - Q)^T||^2 for any Q, so GPTQ of W* with H minimizes the asymmetric error.
    With X = X~ it is W."""
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp_percent * torch.mean(torch.diag(H)))
    W = weight.detach().double()
    correction = torch.cholesky_solve((W @ cross.double()).t(), torch.linalg.cholesky(H)).t()
    return (W + correction).to(weight.dtype)


def full_precision_copy(block):
    """A copy of a block as the full-precision model computes it: its weights as they are now, every activation
    quantizer off (the online transforms, part of the function, stay)."""
    fp_block = copy.deepcopy(block)
    for module in fp_block.modules():
        if isinstance(module, ActQuant):
            module.enabled = False
    return fp_block


class GPTQ:
    """Quantize `model`'s linear sites in place with GPTQ; `quantize()` returns {module name: QuantizedWeight}.
    `calibration` is a 1-D token array or a ready (nsamples, seqlen) tensor, as for AutoRound. With `fp_target`
    each layer matches the full-precision model's outputs (asymmetric calibration; the block losses logged are then
    against the full-precision model's block outputs)."""

    def __init__(self, model, calibration, bits=4, group_size=128, sym=False, damp_percent=0.01, act_order=False,
                 true_sequential=True, nsamples=128, seqlen=None, batch_size=8, sites=SITES, device=None, seed=0,
                 progress=True, log=tqdm.write, outlier_fraction=0.0, act_scales=None, fp_target=False):
        if not 0 <= damp_percent <= 1:
            raise ValueError(f"damp_percent={damp_percent}: must be between 0 and 1")
        self.model, self.spec, self.sites = model, weight_spec(bits, group_size, sym, outlier_fraction), sites
        self.act_scales = act_scales or {}  # {module name: per-input-channel scale}: outliers by sensitivity
        self.damp_percent, self.act_order, self.true_sequential = damp_percent, act_order, true_sequential
        self.fp_target = fp_target
        self.batch_size, self.progress, self.log = batch_size, progress, log
        self.device = device or next(model.parameters()).device
        check_layers(target_layers(model, sites), self.spec)
        self.samples = prepare_samples(model, calibration, nsamples, seqlen, seed)
        self.block_losses = []

    def hessians(self, block, layers, inputs, fp_block=None, fp_inputs=None):
        """{name: (H, D)} for each named layer over the block's cached inputs: H = 2 X~^T X~ / n, and with a
        full-precision block and its inputs (fp_target) D = 2 (X - X~)^T X~ / n, X the inputs the full-precision
        block gives the same layer (D None without)."""
        sums = {name: torch.zeros(layer.in_features, layer.in_features, device=inputs.device)
                for name, layer in layers.items()}
        cross = {name: torch.zeros_like(s) for name, s in sums.items()} if fp_block is not None else {}
        fp_seen, count = {}, [0]

        def hook(name):
            def fn(module, args):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[name].addmm_(x.t(), x)
                if name in cross:
                    cross[name].addmm_((fp_seen.pop(name) - x).t(), x)
            return fn

        def fp_hook(name):
            def fn(module, args):
                fp_seen[name] = args[0].reshape(-1, args[0].shape[-1]).float()
            return fn

        handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
        if fp_block is not None:
            fp_layers = target_layers(fp_block, self.sites)
            handles += [fp_layers[name].register_forward_pre_hook(fp_hook(name)) for name in layers]
        try:
            for j, x in enumerate(inputs.split(self.batch_size)):
                if fp_block is not None:
                    fp_block(fp_inputs[j * self.batch_size:(j + 1) * self.batch_size])
                block(x)
                count[0] += x.shape[0] * x.shape[1]
        finally:
            for h in handles:
                h.remove()
        return {name: (2 * s / count[0], 2 * cross[name] / count[0] if cross else None) for name, s in sums.items()}

    @torch.no_grad()
    def quantize(self):
        model = self.model
        was_training = model.training
        model.eval()
        inputs = capture_block_inputs(model, self.samples, self.batch_size, self.device)
        fp_inputs = inputs if self.fp_target else None
        records = {}
        groups = SEQUENTIAL_GROUPS if self.true_sequential else (SITES,)
        for i, block in enumerate(tqdm(model.transformer.h, desc="gptq", unit="block", disable=not self.progress)):
            t0 = time.time()
            fp_block = full_precision_copy(block) if self.fp_target else None
            # what the block should output: the full-precision block's outputs (fp_target), or its own now
            targets = run_block(fp_block, fp_inputs, self.batch_size) if self.fp_target else run_block(
                block, inputs, self.batch_size)
            layers = target_layers(block, self.sites)
            for group in groups:
                group_layers = {n: l for n, l in layers.items() if n.rsplit(".", 1)[-1] in group}
                if not group_layers:
                    continue
                for name, (H, D) in self.hessians(block, group_layers, inputs, fp_block, fp_inputs).items():
                    layer, full_name = group_layers[name], f"transformer.h.{i}.{name}"
                    weight = layer.weight if D is None else asymmetric_weight(layer.weight, H, D, self.damp_percent)
                    outliers = None
                    if self.spec.outlier_fraction > 0:
                        outliers = outlier_mask(weight, self.spec.outlier_fraction,
                                                self.act_scales.get(full_name))
                    codes, scale, zero_point, *sparse = gptq_weight(weight, H, self.spec, self.damp_percent,
                                                                    self.act_order, outliers=outliers)
                    records[full_name] = set_quantized(layer, codes, scale, zero_point, self.spec, *sparse)
                    del H, D
            inputs = run_block(block, inputs, self.batch_size)
            fp_inputs = targets if self.fp_target else None
            mse = torch.mean((inputs - targets) ** 2).item()
            self.block_losses.append(mse)
            self.log(f"block {i}: output mse {mse:.3e} ({time.time() - t0:.1f}s)")
        model.train(was_training)
        return records
