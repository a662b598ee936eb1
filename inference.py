"""Loading a checkpoint for inference, and the device and precision choice: what sample.py, perplexity.py, hf.py,
the demos and train.py share (scripts import this module, never each other). The layer over model.py: a checkpoint
(checkpoint.py) becomes a GPT here, its packed weights dequantized or kept packed (quantization/kernels), its q, k
and v joined for decoding (fuse_qkv), its fake-quantized weights frozen.

    model = from_checkpoint("out")                                  # a folder, a ckpt.pt, or a loaded dict

    model, tokenizer = load_model("out", "cuda")                  # float, or packed weights dequantized
    model, tokenizer = load_model("out-gptq", "cuda", kernels="on")  # packed weights kept packed (PackedLinear)
"""
import os
import sys
from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from checkpoint import checkpoint_dataset, load_checkpoint
from model import GPT, GPTConfig
from quantization.layers import QuantizedLinear
from tokenizer import Tokenizer, load_meta

ROOT = os.path.dirname(os.path.abspath(__file__))
KERNEL_CHOICES = ("auto", "on", "off")


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
