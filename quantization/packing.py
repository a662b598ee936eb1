"""Packed quantized checkpoints: each quantized layer is stored as its integer codes packed bit by bit into bytes
(2 four-bit codes per byte, 8 three-bit codes per 3 bytes, ...), its scales (float32) and its zero points
(the narrowest integer type), instead of a float weight. Everything else is the ordinary checkpoint.

    save_packed(path, base_checkpoint, model, records, ptq_info)   # records from rtn/gptq/autoround
    load_packed(model, checkpoint)                                 # inference.load_model calls it
"""
from dataclasses import asdict

import torch

from checkpoint import save_checkpoint
from quantization.quantizers import QuantSpec, code_bits, code_range, dequantize, smallest_int_dtype

FORMAT = "nanoqat-packed-v1"


def pack_codes(codes, bits):
    """Codes in [0, 2**bits) -> a uint8 tensor of ceil(numel * bits / 8) bytes, least significant bit first."""
    flat = codes.reshape(-1).to(torch.int64).cpu()
    if flat.numel() and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise ValueError(f"codes outside [0, {(1 << bits) - 1}] cannot be packed into {bits} bits")
    bitstream = ((flat[:, None] >> torch.arange(bits)) & 1).reshape(-1)
    bitstream = torch.nn.functional.pad(bitstream, (0, -bitstream.numel() % 8))
    return (bitstream.reshape(-1, 8) << torch.arange(8)).sum(dim=1).to(torch.uint8)


def unpack_codes(packed, bits, numel):
    """The inverse of pack_codes: the first `numel` codes, as int64."""
    bitstream = ((packed.to(torch.int64)[:, None] >> torch.arange(8, device=packed.device)) & 1).reshape(-1)
    bitstream = bitstream[:numel * bits].reshape(numel, bits)
    return (bitstream << torch.arange(bits, device=packed.device)).sum(dim=1)


def pack_record(record):
    qmin, qmax = code_range(record.spec)
    return {"codes": pack_codes(record.codes - qmin, code_bits(record.spec)), "shape": list(record.codes.shape),
            "scale": record.scale.float().cpu(),
            "zero_point": record.zero_point.to(smallest_int_dtype(qmin, qmax)).cpu(), "spec": asdict(record.spec)}


def unpack_weight(packed, name="a layer"):
    """The dequantized float32 weight of one packed layer."""
    spec = QuantSpec(**packed["spec"])
    if spec.grid == "residual_binary" and packed["scale"].shape[-1] != spec.binary_terms:
        raise ValueError(f"{name} stores {packed['scale'].shape[-1]} binary terms but its spec says "
                         f"binary_terms={spec.binary_terms}")
    qmin, _ = code_range(spec)
    shape = packed["shape"]
    numel = 1
    for d in shape:
        numel *= d
    codes = (unpack_codes(packed["codes"], code_bits(spec), numel) + qmin).float().reshape(shape)
    return dequantize(codes, packed["scale"].float(), packed["zero_point"].float(), spec)


def is_packed(checkpoint):
    return "packed_weights" in checkpoint


def packed_checkpoint(base, model, records, ptq_info):
    """A checkpoint dict: `base`'s metadata, `model`'s state without the quantized weights, and their packed form."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()
             if not (k.endswith(".weight") and k[:-len(".weight")] in records)}
    keep = ("model_args", "dataset", "config", "iter_num", "best_val_loss")
    return {**{k: base[k] for k in keep if k in base}, "model": state, "quantization_enabled": True,
            "packed_weights": {name: pack_record(r) for name, r in records.items()},
            "ptq": {"format": FORMAT, **ptq_info}}


def save_packed(path, base, model, records, ptq_info):
    save_checkpoint(path, packed_checkpoint(base, model, records, ptq_info))


def load_packed(model, checkpoint):
    """Load a packed checkpoint into a freshly built model (of the checkpoint's model_args)."""
    packed = load_unpacked_state(model, checkpoint)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, p in packed.items():
            weight = modules[name].weight
            weight.copy_(unpack_weight(p, name).to(weight.device, weight.dtype))
    return model


def load_unpacked_state(model, checkpoint):
    """Load everything but the packed weights (ValueError if the rest does not match the model); returns the
    packed records."""
    packed = checkpoint["packed_weights"]
    missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
    expected = {f"{name}.weight" for name in packed}
    if set(missing) != expected or unexpected:
        raise ValueError(f"packed checkpoint does not match its model (missing {sorted(set(missing) - expected)}, "
                         f"unexpected {sorted(unexpected)})")
    return packed


def packed_bytes(checkpoint):
    """(bytes of packed codes, bytes of scales and zero points) of a packed checkpoint."""
    codes = sum(p["codes"].numel() for p in checkpoint["packed_weights"].values())
    params = sum(t.numel() * t.element_size() for p in checkpoint["packed_weights"].values()
                 for t in (p["scale"], p["zero_point"]))
    return codes, params
