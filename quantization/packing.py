"""Packed quantized checkpoints: each quantized layer is stored as its integer codes packed bit by bit into bytes
(2 four-bit codes per byte, 8 three-bit codes per 3 bytes, ...), its scales (float32) and its zero points
(the narrowest integer type), instead of a float weight. Everything else is the ordinary checkpoint.
A dense-and-sparse layer also stores its full-precision outliers S as CSR ("outliers": int32 row pointers,
int16 column indices (int32 past 32768 columns), fp16 values); its weight is dequantize(codes) + S.

    save_packed(path, base_checkpoint, model, records, ptq_info)   # records from rtn/gptq/autoround
    load_packed(model, checkpoint)                                 # inference.load_model calls it
"""
from dataclasses import asdict

import torch

from checkpoint import save_checkpoint
from quantization.quantizers import QuantSpec, code_bits, code_range, dequantize, index_bits, smallest_int_dtype

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


def to_csr(sparse):
    """A dense-shaped (out, in) tensor that is zero but at its outliers -> {crow (int32), col (int16 or int32),
    values (fp16)}: CSR, row by row, columns ascending."""
    sparse = sparse.detach().cpu()
    rows, cols = torch.nonzero(sparse, as_tuple=True)
    counts = torch.bincount(rows, minlength=sparse.shape[0])
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    col_dtype = torch.int16 if index_bits(sparse.shape[1]) == 16 else torch.int32
    return {"crow": crow, "col": cols.to(col_dtype), "values": sparse[rows, cols].to(torch.float16)}


def from_csr(csr, shape):
    """The dense-shaped float32 tensor of a CSR dict (zero but at the outliers); ValueError when it does not fit
    `shape`."""
    crow, col, values = csr["crow"].long(), csr["col"].long(), csr["values"]
    if crow.numel() != shape[0] + 1 or col.numel() != values.numel() or crow[-1].item() != values.numel() \
            or (col.numel() and (col.min() < 0 or col.max() >= shape[1])) or bool((crow.diff() < 0).any()):
        raise ValueError(f"its sparse outliers (CSR with {crow.numel() - 1} rows, {values.numel()} values, columns "
                         f"up to {col.max().item() if col.numel() else 0}) do not match the layer's shape {shape}")
    rows = torch.repeat_interleave(torch.arange(shape[0]), crow.diff())
    dense = torch.zeros(shape, dtype=torch.float32)
    dense[rows, col] = values.float()
    return dense


def pack_record(record):
    qmin, qmax = code_range(record.spec)
    packed = {"codes": pack_codes(record.codes - qmin, code_bits(record.spec)), "shape": list(record.codes.shape),
              "scale": record.scale.float().cpu(),
              "zero_point": record.zero_point.to(smallest_int_dtype(qmin, qmax)).cpu(), "spec": asdict(record.spec)}
    if getattr(record, "sparse", None) is not None:
        packed["outliers"] = to_csr(record.sparse)
    return packed


def packed_outliers(packed):
    """The dense-shaped float32 outliers of one packed layer, or None."""
    return from_csr(packed["outliers"], packed["shape"]) if "outliers" in packed else None


def unpack_weight(packed, name="a layer", with_outliers=True):
    """The dequantized float32 weight of one packed layer (its dense part alone without `with_outliers`)."""
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
    weight = dequantize(codes, packed["scale"].float(), packed["zero_point"].float(), spec)
    sparse = packed_outliers(packed) if with_outliers else None
    return weight if sparse is None else weight + sparse


def check_packed(checkpoint, path=None):
    """ValueError naming the file (when given), the layer and what is wrong unless every packed layer agrees with
    itself: a valid spec, a shape of positive integers, exactly the bytes of codes that shape takes, scales and
    zero points of one per row of the spec (finite scales, integer zero points on the code range), outliers in
    CSR form that fit the shape with finite values. Checks before anything is built or unpacked."""
    where = f"{path}: " if path else ""
    packed = checkpoint.get("packed_weights")
    if not isinstance(packed, dict):
        raise ValueError(f"{where}'packed_weights' is not a dict")
    for name, p in packed.items():
        try:
            _check_packed_layer(p)
        except ValueError as e:
            raise ValueError(f"{where}packed weight {name}: {e}") from None


def _check_packed_layer(p):
    if not isinstance(p, dict) or not {"codes", "shape", "scale", "zero_point", "spec"} <= set(p):
        raise ValueError("lacks codes, shape, scale, zero_point or spec")
    if not isinstance(p["spec"], dict):
        raise ValueError("its spec is not a dict")
    try:
        spec = QuantSpec(**p["spec"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"its spec is not valid ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    shape = p["shape"]
    if not isinstance(shape, (list, tuple)) or len(shape) != 2 or not all(type(d) is int and d > 0 for d in shape):
        raise ValueError(f"its shape {shape!r} is not two positive integers")
    tensors = {k: p[k] for k in ("codes", "scale", "zero_point")}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"its {key} is not a tensor")
    codes, scale, zero_point = tensors["codes"], tensors["scale"], tensors["zero_point"]
    numel = shape[0] * shape[1]
    need = -(-numel * code_bits(spec) // 8)
    if codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() != need:
        raise ValueError(f"its codes are {codes.numel()} {codes.dtype} values; {code_bits(spec)}-bit codes of "
                         f"{list(shape)} take {need} uint8 bytes")
    if spec.granularity == "per_group" and shape[1] % spec.group_size:
        raise ValueError(f"group_size={spec.group_size} does not divide the input width {shape[1]}")
    rows = {"per_tensor": 1, "per_channel": shape[0], "per_token": shape[0]}.get(spec.granularity,
                                                                              numel // max(spec.group_size, 1))
    terms = spec.binary_terms if spec.grid == "residual_binary" else 1
    if tuple(scale.shape) != (rows, terms) or not scale.is_floating_point():
        raise ValueError(f"its scale has shape {list(scale.shape)} ({scale.dtype}); its spec gives [{rows}, {terms}] floats")
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("its scale holds nan or inf")
    qmin, qmax = code_range(spec)
    if tuple(zero_point.shape) != (rows, 1) or zero_point.is_floating_point() or zero_point.dtype == torch.bool:
        raise ValueError(f"its zero_point has shape {list(zero_point.shape)} ({zero_point.dtype}); its spec gives "
                         f"[{rows}, 1] integers")
    if zero_point.numel() and (zero_point.min() < qmin or zero_point.max() > qmax):
        raise ValueError(f"its zero_point lies outside the code range [{qmin}, {qmax}]")
    if "outliers" in p:
        csr = p["outliers"]
        if not isinstance(csr, dict) or not all(isinstance(csr.get(k), torch.Tensor) for k in ("crow", "col", "values")):
            raise ValueError("its outliers are not CSR tensors (crow, col, values)")
        crow, col, values = csr["crow"], csr["col"], csr["values"]
        if crow.is_floating_point() or col.is_floating_point() or not values.is_floating_point() \
                or crow.dim() != 1 or col.dim() != 1 or values.dim() != 1:
            raise ValueError("its outliers are not CSR tensors (integer crow and col, float values)")
        crow, col = crow.long(), col.long()
        if crow.numel() != shape[0] + 1 or col.numel() != values.numel() or crow[0].item() != 0 \
                or crow[-1].item() != values.numel() or bool((crow.diff() < 0).any()) \
                or (col.numel() and (col.min() < 0 or col.max() >= shape[1])):
            raise ValueError(f"its sparse outliers (CSR with {crow.numel() - 1} rows, {values.numel()} values) do "
                             f"not match the layer's shape {list(shape)}")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("its outliers hold nan or inf")


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
            if list(p["shape"]) != list(weight.shape):
                raise ValueError(f"packed weight {name} has shape {list(p['shape'])}, its layer {list(weight.shape)}")
            try:
                weight.copy_(unpack_weight(p, name).to(weight.device, weight.dtype))
            except ValueError as e:
                raise ValueError(f"packed weight {name}: {e}") from None
    return model


def load_unpacked_state(model, checkpoint):
    """Load everything but the packed weights (ValueError if the rest does not match the model); returns the
    packed records."""
    check_packed(checkpoint)
    packed = checkpoint["packed_weights"]
    missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
    expected = {f"{name}.weight" for name in packed}
    if set(missing) != expected or unexpected:
        raise ValueError(f"packed checkpoint does not match its model (missing {sorted(set(missing) - expected)}, "
                         f"unexpected {sorted(unexpected)})")
    return packed


def load_dense_sparse(model, checkpoint):
    """load_packed, then every layer with outliers computes x @ D^T + x @ S^T through a DenseSparseLinear (the
    dequantized dense part and a torch.sparse CSR matrix of the outliers) instead of one dequantized weight."""
    from quantization.layers import DenseSparseLinear
    load_packed(model, checkpoint)
    for name, p in checkpoint["packed_weights"].items():
        sparse = packed_outliers(p)
        if sparse is None:
            continue
        layer = model.get_submodule(name)
        dense = unpack_weight(p, with_outliers=False).to(layer.weight.device)
        model.set_submodule(name, DenseSparseLinear(dense, sparse.to(dense.device), layer.bias))
    return model


def packed_bytes(checkpoint):
    """(bytes of packed codes, bytes of scales and zero points) of a packed checkpoint."""
    codes = sum(p["codes"].numel() for p in checkpoint["packed_weights"].values())
    params = sum(t.numel() * t.element_size() for p in checkpoint["packed_weights"].values()
                 for t in (p["scale"], p["zero_point"]))
    return codes, params


def outlier_bytes(checkpoint):
    """Bytes of the sparse outliers (row pointers, column indices, values) of a packed checkpoint."""
    return sum(t.numel() * t.element_size() for p in checkpoint["packed_weights"].values()
               for t in p.get("outliers", {}).values())
