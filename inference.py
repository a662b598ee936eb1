"""Loading a checkpoint for inference, and the device and precision choice: what sample.py, perplexity.py, hf.py,
the demos and train.py share (scripts import this module, never each other). The layer over model.py: a checkpoint
(checkpoint.py) becomes a GPT here, its packed weights dequantized or kept packed (quantization/kernels), its q, k
and v joined for decoding (fuse_qkv) and its GELU left to a packed up projection's kernel (fuse_gelu), its
fake-quantized weights frozen.

    model = from_checkpoint("out")                                  # a folder, a ckpt.pt, or a loaded dict

    model, tokenizer = load_model("out", "cuda")                  # float, or packed weights dequantized
    model, tokenizer = load_model("out-gptq", "cuda", kernels="on")  # packed weights kept packed (PackedLinear)
"""
import dataclasses
import os
import sys
from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from checkpoint import checkpoint_dataset, read_checkpoint
from model import GPT, GPTConfig
from quantization.layers import QuantizedLinear
from tokenizer import Tokenizer, load_meta

ROOT = os.path.dirname(os.path.abspath(__file__))
KERNEL_CHOICES = ("auto", "on", "off")
# model_args every checkpoint must carry (the rest have GPTConfig's defaults), and the largest value believed
REQUIRED_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
MAX_DIM = 2 ** 31 - 1


def resolve_device(device, dtype):
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


def autocast_context(device, dtype):
    """Mixed precision for float16/bfloat16, nothing for float32."""
    if dtype == "float32":
        return nullcontext()
    ptdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return torch.amp.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=ptdtype)


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict of a file or folder, checked against the GPT its model_args describe (every tensor's name
    and shape); FileNotFoundError or ValueError with a one-line reason when it cannot be used."""
    checkpoint = read_checkpoint(path, device)
    try:
        check_model_args(checkpoint["model_args"])
        check_state(checkpoint)
    except ValueError as e:
        path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
        raise ValueError(f"{path}: {e}") from None
    return checkpoint


def check_model_args(model_args):
    """ValueError naming the field unless `model_args` describes a GPT that GPTConfig and GPT accept."""
    if not isinstance(model_args, dict):
        raise ValueError("model_args is not a dict")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(str(k) for k in model_args if k not in fields)
    if unknown:
        raise ValueError(f"model_args has unknown config field(s) {', '.join(unknown)} (a newer or foreign checkpoint?)")
    for key in REQUIRED_MODEL_ARGS:
        value = model_args.get(key)
        if type(value) is not int or not 1 <= value <= MAX_DIM:
            raise ValueError(f"model_args lacks a valid '{key}' (a positive integer), got {value!r}")
    if model_args["n_embd"] % model_args["n_head"]:
        raise ValueError(f"model_args: n_embd={model_args['n_embd']} is not divisible by n_head={model_args['n_head']}")
    dropout = model_args.get("dropout", 0.0)
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise ValueError(f"model_args: dropout={dropout!r} is not in [0, 1)")
    try:
        GPTConfig(**model_args)
        with torch.device("meta"):  # builds the module tree without allocating any weight
            GPT(GPTConfig(**model_args))
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError) as e:
        raise ValueError(f"model_args describe no valid model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def check_state(checkpoint):
    """ValueError unless checkpoint['model'] holds exactly the tensors (names and shapes) its model_args' GPT has;
    the weights of a packed checkpoint's quantized layers are in checkpoint['packed_weights'] instead."""
    state = checkpoint["model"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError("'model' is not a dict of named tensors")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(GPTConfig(**checkpoint["model_args"])).state_dict().items()}
    packed = checkpoint.get("packed_weights", {})
    if not isinstance(packed, dict):
        raise ValueError("'packed_weights' is not a dict")
    for name, p in packed.items():
        key = f"{name}.weight"
        if key not in expected or not isinstance(p, dict) or not {"codes", "shape", "scale", "zero_point", "spec"} <= set(p):
            raise ValueError(f"packed weight '{name}' is not a weight of the model, or lacks codes/shape/scale/spec")
        if list(p["shape"]) != list(expected[key]):
            raise ValueError(f"packed weight '{name}' has shape {p['shape']}, the model's is {list(expected[key])}")
    missing = [k for k in expected if k not in state and k[:-len(".weight")] not in packed]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"its tensors do not match its model_args (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    wrong = [k for k, v in state.items() if tuple(v.shape) != expected[k]]
    if wrong:
        raise ValueError(f"tensor {wrong[0]} has shape {list(state[wrong[0]].shape)}, its model_args give "
                         f"{list(expected[wrong[0]])}")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"tensor {bad} holds nan or inf (a diverged run?): nothing computed from it would mean "
                         f"anything")


def use_kernels(kernels, device, packed):
    """Whether a checkpoint's packed weights stay packed (PackedLinear): 'on', 'off', or 'auto' (on for a packed
    checkpoint on a CUDA device). ValueError for 'on' without packed weights."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels '{kernels}' is unknown; expected one of {', '.join(KERNEL_CHOICES)}")
    if kernels == "on" and not packed:
        raise ValueError("kernels=on needs a packed quantized checkpoint (this one holds float weights)")
    return packed and (kernels == "on" or (kernels == "auto" and str(device).startswith("cuda")))


def load_model(out_dir, device, kernels="off"):
    """The model of a checkpoint, in eval mode with its quantizers on, and the tokenizer of its data.
    A packed quantized checkpoint (quantization/packing.py) is dequantized into float weights, or, with kernels
    (see use_kernels), its linear layers become PackedLinear modules that hold only the codes and scales.
    FileNotFoundError or ValueError with a one-line reason when the checkpoint cannot be used."""
    from quantization.packing import check_packed, is_packed
    checkpoint = load_checkpoint(out_dir, device)
    if is_packed(checkpoint):
        check_packed(checkpoint, out_dir if os.path.isfile(out_dir) else os.path.join(out_dir, "ckpt.pt"))
    if use_kernels(kernels, device, is_packed(checkpoint)):
        model = load_packed_kernels(GPT(GPTConfig(**checkpoint["model_args"])), checkpoint, required=kernels == "on")
        model.set_quantization(checkpoint.get("quantization_enabled", True))
    else:
        model = from_checkpoint(checkpoint)
    model.eval().to(device)
    dataset = checkpoint_dataset(checkpoint)
    return model, Tokenizer(load_meta(os.path.join(ROOT, "data", dataset)))


def from_checkpoint(checkpoint):
    """The GPT of a checkpoint (a loaded dict, or its file or folder): its weights (a packed one dequantized),
    quantizers on or off as it was saved."""
    from quantization.packing import is_packed, load_packed
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    if is_packed(checkpoint):
        load_packed(model, checkpoint)
    else:
        model.load_state_dict(checkpoint["model"])
    model.set_quantization(checkpoint.get("quantization_enabled", True))
    return model


def load_packed_kernels(model, checkpoint, required):
    """model with its packed layers as PackedLinear (quantization/kernels). Where the kernels package cannot be
    imported: ValueError when required, else a one-line note and the dequantized float weights."""
    from quantization.packing import load_packed, load_unpacked_state
    try:
        from quantization.kernels import convert_to_packed
    except ImportError as e:
        if required:
            raise ValueError(f"kernels=on: the packed kernels cannot be loaded ({e})") from None
        print(f"note: packed kernels unavailable ({e}); using dequantized weights", file=sys.stderr)
        return load_packed(model, checkpoint)
    return convert_to_packed(model, load_unpacked_state(model, checkpoint))


def freeze_quantized_weights(model):
    """Replace every fake-quantized weight (QAT's QuantizedLinear, the quantized embedding) by its quantized value,
    once, so that decoding does not re-quantize the weights at every token. The outputs are unchanged (fake_quant
    is deterministic in eval mode); the model can no longer train or switch its weight quantizers off."""
    assert not model.training, "freeze_quantized_weights needs a model in eval mode (stochastic rounding otherwise)"
    if model.embedding_spec is not None and model.quantization_enabled:
        with torch.no_grad():
            model.transformer.wte.weight.copy_(model.token_embedding_weight())
        model.embedding_spec = None
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and parametrize.is_parametrized(module, "weight"):
            enabled = module.parametrizations.weight[0].enabled
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=enabled)
    return model



def concatenate_linears(layers):
    """One layer whose output is the layers' outputs side by side (they read the same input), or None where they
    cannot be joined. Linears that compute F.linear with a plain weight (no parametrization, so QAT layers once
    frozen) become one nn.Linear; a layer class with a `concatenate` classmethod (PackedLinear) joins its own."""
    first = layers[0]
    if all(type(layer).forward is nn.Linear.forward and not parametrize.is_parametrized(layer) for layer in layers):
        if len({(layer.bias is None, layer.weight.dtype, layer.weight.device) for layer in layers}) > 1:
            return None
        fused = nn.Linear(first.in_features, sum(layer.out_features for layer in layers), bias=first.bias is not None,
                          device="meta")
        fused.weight = nn.Parameter(torch.cat([layer.weight.detach() for layer in layers]), requires_grad=False)
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([layer.bias.detach() for layer in layers]), requires_grad=False)
        return fused
    if len({type(layer) for layer in layers}) == 1 and hasattr(type(first), "concatenate"):
        return type(first).concatenate(layers)
    return None


def fuse_qkv(model):
    """Inference: each attention layer computes q, k and v with one layer of 3 x n_embd outputs (one matmul, or
    one packed kernel, instead of three); layers whose q, k and v cannot be joined keep them. The state dict then
    holds `qkv` in place of `q`, `k` and `v`: fuse after loading, and save or export (hf.py, gguf_export.py) an
    unfused model. Returns how many layers were fused."""
    fused = 0
    for block in model.transformer.h:
        attn = block.attn
        if attn.qkv is not None:  # fused already
            continue
        qkv = concatenate_linears([attn.q, attn.k, attn.v])
        if qkv is not None:
            attn.qkv, attn.q, attn.k, attn.v = qkv, None, None, None
            fused += 1
    return fused


def fuse_gelu(model):
    """Inference: each MLP whose up projection can apply the GELU itself (a PackedLinear: the kernel that writes its
    output applies it) hands it over, so that a decode step has no GELU kernel of its own; MLPs with an activation
    quantizer or transform around the GELU keep theirs. The state dict does not change. Returns how many MLPs were
    fused."""
    fused = 0
    for block in model.transformer.h:
        mlp = block.mlp
        sites = [mlp.act[site] for site in ("activation_input", "activation_output")]
        if getattr(mlp.mlp_up, "gelu", "") is not None or any(a.spec is not None or a.transform is not None
                                                               for a in sites):
            continue  # fused already, a layer that cannot apply it, or a quantizer at the GELU
        mlp.mlp_up.gelu = mlp.gelu_approximate
        fused += 1
    return fused


# fuse_norms applies to models at least this wide. On an H200 (bench/results/norms_h200/README.md, in-run repeats)
# it sped GPT-2 XL's batch-1 decode (width 1600) by 4%, left the 6.7B shape's (4096) level and slowed 124M's (768)
# by 2-3%: the kernels it removes cost less there than the work it adds to the packed kernels
NORMS_MIN_WIDTH = 1024


def fuse_norms(model, min_width=NORMS_MIN_WIDTH):
    """Inference: each block's two normalizations go into the packed layers after them (the q/k/v layer and the up
    projection: PackedLinear.fuse_norm) and its two residual adds into the layers before (the output and down
    projections, which also hand the next normalization its input: fuse_residual), so that a one-row decode step
    (generate.fused_block_step) has no normalization or add kernel of its own. Run it after fuse_qkv and fuse_gelu.
    It applies to every block or to none: each needs q, k and v joined, its four layers packed with no sparse
    outliers, and no activation quantizer or transform at the sites the fused step skips (the attention's and the
    MLP's input and output); and the model at least `min_width` wide (NORMS_MIN_WIDTH: where it was measured to
    help). The state dict and forward do not change. Returns how many blocks were fused."""
    from quantization.kernels import PackedLinear
    blocks = list(model.transformer.h)
    if model.config.n_embd < min_width:
        return 0

    def fusable(block):
        attn, mlp = block.attn, block.mlp
        layers = (attn.qkv, attn.attn_proj, mlp.mlp_up, mlp.mlp_down)
        sites = (attn.act["input"], attn.act["output"], mlp.act["input"], mlp.act["output"])
        return (all(isinstance(layer, PackedLinear) and layer.sparse is None for layer in layers)
                and all(isinstance(norm, (nn.LayerNorm, nn.RMSNorm)) for norm in (block.ln_1, block.ln_2))
                and not any(site.spec is not None or site.transform is not None for site in sites))
    if model.training or not blocks or not all(fusable(block) for block in blocks):
        return 0
    norms_after = [block.ln_1 for block in blocks[1:]] + [model.transformer.ln_f]
    for block, next_norm in zip(blocks, norms_after):
        block.attn.qkv.fuse_norm(block.ln_1)
        block.attn.attn_proj.fuse_residual(_gain(block.ln_2))
        block.mlp.mlp_up.fuse_norm(block.ln_2)
        block.mlp.mlp_down.fuse_residual(_gain(next_norm))
        block.norms_fused = True
    return len(blocks)


def _gain(norm):
    """A normalization's gain (ones where it has none)."""
    weight = getattr(norm, "weight", None)
    return weight if weight is not None else torch.ones(norm.normalized_shape)
