"""Loading a checkpoint for inference, and the device and precision choice: what sample.py, perplexity.py, hf.py,
the demos and train.py share (scripts import this module, never each other).

    model, tokenizer = load_model("out", "cuda")                  # float, or packed weights dequantized
    model, tokenizer = load_model("out-gptq", "cuda", kernels="on")  # packed weights kept packed (PackedLinear)
"""
import os
import sys
from contextlib import nullcontext

import torch
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
        model = GPT.from_checkpoint(checkpoint)
    model.eval().to(device)
    dataset = checkpoint_dataset(checkpoint)
    return model, Tokenizer(load_meta(os.path.join(ROOT, "data", dataset)))


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

