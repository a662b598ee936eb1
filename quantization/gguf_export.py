"""GGUF export and import: a checkpoint (full precision, QAT, or packed PTQ) as a llama.cpp `gpt2` model, and a
GPT-2 GGUF back into a checkpoint.

Where a weight was trained (QAT) or quantized (PTQ) on a grid that a GGUF block type stores, the file holds that
grid itself: the same integer codes, the scale as the block's fp16 `d` (and Q4_1's `m` = -zero_point * scale).
    symmetric <= 8 bits  -> Q8_0  (d * q, q in -128..127)         blocks of 32 along the input dimension
    symmetric <= 4 bits  -> Q4_0  (d * (q - 8), q in 0..15)
    affine    <= 4 bits  -> Q4_1  (d * q + m, q in 0..15)
    ternary / binary     -> TQ2_0 (d * (q - 1), q in 0..2), blocks of 256; Q4_0 when the width is not a multiple of 256
A block type holds a grid when one scale (and zero point) covers each block: per-tensor, per-channel, and
per-group with a group size that is a multiple of the block. The only loss is the scale's rounding to fp16, which
is measured and printed per tensor. Every other weight is re-quantized by the `gguf` package, with its error
printed (or refused with --requantize=False).

    python quantization/gguf_export.py --out_dir=out --gguf=model.gguf [--type=auto|f32|f16|q8_0|q4_0|q4_1|tq2_0|tq1_0]
    python quantization/gguf_export.py import --gguf=model.gguf --out_dir=out-gguf   # --overwrite replaces a result
    python train.py --init_from=model.gguf ...        # fine-tune or quantize an imported GGUF
"""
import functools
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # run as a command (python quantization/<this>.py): import from the root, not from
    # quantization/ itself, whose kernels/ would shadow the `kernels` package that transformers looks for
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or os.curdir) != here]

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from checkpoint import checkpoint_dataset, save_checkpoint  # noqa: E402
from inference import load_checkpoint  # noqa: E402
from cli import BoolFlag, OneLineParser  # noqa: E402
from inference import from_checkpoint  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from quantization.layers import QuantizedLinear  # noqa: E402
from quantization.packing import check_packed, is_packed, unpack_codes  # noqa: E402
from quantization.quantizers import QuantSpec, code_range, fake_quant_with_codes, to_rows  # noqa: E402
from safety import check_output_dir, check_output_file  # noqa: E402
from tokenizer import GPT2_EOT, GPT2_RANKS, load_meta  # noqa: E402

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2]
GGML_TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "tq2_0": Q.TQ2_0,
              "tq1_0": Q.TQ1_0}
TYPES = ("auto", *GGML_TYPES)
# block types, smallest first: --type=auto takes the first that holds a tensor's grid exactly
AUTO_ORDER = ("tq2_0", "q4_0", "q4_1", "q8_0")
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0,
              "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0}
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which model.py uses


def block_size(type_name):
    return gguf.GGML_QUANT_SIZES[GGML_TYPES[type_name]][0]


@dataclass
class Weight:
    """One weight as the model computes with it: its float values and, when it lies on a grid, that grid per
    element (offset codes k = codes - zero_point, the scale and the zero point), so value == k * scale."""
    value: torch.Tensor
    k: torch.Tensor = None
    scale: torch.Tensor = None
    zero_point: torch.Tensor = None
    spec: QuantSpec = None

    @classmethod
    def on_grid(cls, codes, scale, zero_point, spec, value):
        def per_element(t):
            return t.float().expand(to_rows(codes, spec).shape).reshape(codes.shape)
        zero = per_element(zero_point)
        return cls(value.float(), codes.float() - zero, per_element(scale), zero, spec)


def checkpoint_weights(checkpoint):
    """(model, {parameter name: Weight}) of a checkpoint: the dequantized values the model computes with, and the
    grid of every quantized linear (QAT or packed PTQ) and of a quantized token embedding."""
    model = from_checkpoint(checkpoint)
    model.eval()
    weights = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "parametrizations" not in name:
                weights[name] = Weight(tensor.float())
        for name, module in model.named_modules():
            if isinstance(module, QuantizedLinear):
                latent = module.latent_weight
                if model.quantization_enabled:
                    value, codes, scale, zero_point = fake_quant_with_codes(latent, module.spec, False)
                    weights[f"{name}.weight"] = Weight.on_grid(codes, scale, zero_point, module.spec, value)
                else:
                    weights[f"{name}.weight"] = Weight(latent.float())
        for name, packed in checkpoint.get("packed_weights", {}).items():
            spec = QuantSpec(**packed["spec"])
            shape = packed["shape"]
            codes = (unpack_codes(packed["codes"], spec.bits, int(np.prod(shape))) + code_range(spec)[0]).float()
            codes = codes.reshape(shape)
            value = dict(model.named_modules())[name].weight.detach()
            weights[f"{name}.weight"] = Weight.on_grid(codes, packed["scale"], packed["zero_point"], spec, value)
        if model.embedding_spec is not None and model.quantization_enabled:
            wte = model.transformer.wte.weight
            value, codes, scale, zero_point = fake_quant_with_codes(wte, model.embedding_spec, False)
            weights["transformer.wte.weight"] = Weight.on_grid(codes, scale, zero_point, model.embedding_spec, value)
    return model, weights


def concat(parts):
    """Several weights stacked along the output dimension (q, k, v into llama.cpp's attn_qkv)."""
    if len(parts) == 1:
        return parts[0]
    value = torch.cat([p.value for p in parts])
    if any(p.k is None for p in parts):
        return Weight(value)
    return Weight(value, *(torch.cat([getattr(p, f) for p in parts]) for f in ("k", "scale", "zero_point")),
                  spec=parts[0].spec if all(p.spec == parts[0].spec for p in parts) else None)


# --- the ggml block layouts, written from the grid -----------------------------------------------------------

def _nibbles(q):
    """Q4_0/Q4_1's 16 bytes per 32 codes: byte j holds code j (low) and code j + 16 (high)."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _fp16_bytes(x):
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def holds(type_name, w):
    """Whether a block type stores w's grid exactly (up to the fp16 rounding of its scales)."""
    if w.k is None or type_name not in AUTO_ORDER + ("tq1_0",):
        return False
    bs = block_size(type_name)
    if w.k.shape[-1] % bs:
        return False
    scale, zero = w.scale.reshape(-1, bs), w.zero_point.reshape(-1, bs)
    if not (torch.equal(scale, scale[:, :1].expand_as(scale)) and torch.equal(zero, zero[:, :1].expand_as(zero))):
        return False
    k = w.k
    if type_name == "q8_0":
        return bool(k.min() >= -128 and k.max() <= 127)
    if type_name == "q4_0":
        return bool(k.min() >= -8 and k.max() <= 7)
    if type_name == "q4_1":
        q = k + w.zero_point
        return bool(q.min() >= 0 and q.max() <= 15)
    return bool(((k == -1) | (k == 0) | (k == 1)).all())


def grid_blocks(type_name, w):
    """The bytes of w in a block type that holds its grid: (rows, bytes per row), uint8."""
    bs = block_size(type_name)
    rows = w.k.shape[0]
    k = w.k.reshape(-1, bs).numpy().astype(np.int16)
    d = w.scale.reshape(-1, bs)[:, 0].numpy()
    if type_name == "q8_0":
        blocks = np.concatenate([_fp16_bytes(d), k.astype(np.int8).view(np.uint8)], axis=1)
    elif type_name == "q4_0":
        blocks = np.concatenate([_fp16_bytes(d), _nibbles(k + 8)], axis=1)
    elif type_name == "q4_1":
        zero = w.zero_point.reshape(-1, bs)[:, 0].numpy()
        m = -(zero.astype(np.float64) * d.astype(np.float64))
        blocks = np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _nibbles(k + zero[:, None].astype(np.int16))], axis=1)
    else:
        # the package's ternary packers recover the codes exactly from blocks of codes (their max |code| is 1);
        # the block scale is then replaced by ours (the last 2 bytes of each block)
        blocks = gguf.quants.quantize(k.astype(np.float32), GGML_TYPES[type_name]).reshape(k.shape[0], -1)
        blocks[:, -2:] = _fp16_bytes(d)
    return blocks.reshape(rows, -1)


def encode(type_name, w, exact):
    """(array for GGUFWriter.add_tensor, raw ggml type or None) of w in a type; `exact`: from w's grid."""
    if type_name == "f32":
        return w.value.numpy().astype(np.float32), None
    if type_name == "f16":
        return w.value.numpy().astype(np.float16), None
    if exact:
        return grid_blocks(type_name, w), GGML_TYPES[type_name]
    return gguf.quants.quantize(w.value.numpy().astype(np.float32), GGML_TYPES[type_name]), GGML_TYPES[type_name]


def decode(array, raw_type, shape):
    """What llama.cpp will read back: the float values of an encoded tensor (via the gguf package)."""
    if raw_type is None:
        return torch.from_numpy(array.astype(np.float32)).reshape(shape)
    return torch.from_numpy(gguf.quants.dequantize(array, raw_type).astype(np.float32)).reshape(shape)


# --- the GPT-2 BPE vocabulary, from the tiktoken ranks file ----------------------------------------------------

def bytes_to_unicode():
    """GPT-2's byte -> printable character map (its vocab.json writes every token in these characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(token, ranks, max_rank):
    """tiktoken's byte-pair merge of `token` using only merges ranked below max_rank: the parts left."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 60))
        if ranks.get(parts[best] + parts[best + 1], 1 << 60) >= max_rank:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


@functools.lru_cache(maxsize=1)
def gpt2_vocab():
    """(tokens, token types, merges) of GPT-2 BPE in llama.cpp's form. Each token's merge is recovered from the
    ranks: merging its bytes with every merge ranked below it leaves exactly two parts (GPT-2's merges.txt)."""
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(GPT2_RANKS)
    to_unicode = bytes_to_unicode()
    text = {rank: "".join(to_unicode[b] for b in token) for token, rank in ranks.items()}
    tokens = [text[i] for i in range(len(ranks))] + ["<|endoftext|>"]
    types = [int(gguf.TokenType.NORMAL)] * len(ranks) + [int(gguf.TokenType.CONTROL)]
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = _bpe(token, ranks, rank)
            if len(parts) != 2:
                raise ValueError(f"{GPT2_RANKS}: token {token!r} (rank {rank}) is not one merge of lower ranks")
            left, right = parts
            merges.append(f"{text[ranks[left]]} {text[ranks[right]]}")
    return tuple(tokens), tuple(types), tuple(merges)


# --- export ----------------------------------------------------------------------------------------------------

class ExportError(ValueError):
    pass


def gguf_tensors(model, weights):
    """[(llama.cpp tensor name, Weight)] in llama.cpp's gpt2 layout; zero biases where the model has none
    (llama.cpp's gpt2 requires every bias)."""
    cfg = model.config
    C = cfg.n_embd

    def get(name, size=None):
        if name in weights:
            return weights[name]
        return Weight(torch.zeros(size))

    out = [("token_embd.weight", weights["transformer.wte.weight"]),
           ("position_embd.weight", weights["transformer.wpe.weight"]),
           ("output_norm.weight", get("transformer.ln_f.weight")), ("output_norm.bias", get("transformer.ln_f.bias", C))]
    for i in range(cfg.n_layer):
        h, b = f"transformer.h.{i}", f"blk.{i}"
        out += [(f"{b}.attn_norm.weight", get(f"{h}.ln_1.weight")), (f"{b}.attn_norm.bias", get(f"{h}.ln_1.bias", C)),
                (f"{b}.attn_qkv.weight", concat([weights[f"{h}.attn.{s}.weight"] for s in "qkv"])),
                (f"{b}.attn_qkv.bias", concat([get(f"{h}.attn.{s}.bias", C) for s in "qkv"])),
                (f"{b}.attn_output.weight", weights[f"{h}.attn.attn_proj.weight"]),
                (f"{b}.attn_output.bias", get(f"{h}.attn.attn_proj.bias", C)),
                (f"{b}.ffn_norm.weight", get(f"{h}.ln_2.weight")), (f"{b}.ffn_norm.bias", get(f"{h}.ln_2.bias", C)),
                (f"{b}.ffn_up.weight", weights[f"{h}.mlp.mlp_up.weight"]),
                (f"{b}.ffn_up.bias", get(f"{h}.mlp.mlp_up.bias", 4 * C)),
                (f"{b}.ffn_down.weight", weights[f"{h}.mlp.mlp_down.weight"]),
                (f"{b}.ffn_down.bias", get(f"{h}.mlp.mlp_down.bias", C))]
    return out


def choose_type(name, w, requested, requantize):
    """(type name, exact from the grid, what to report) for one tensor."""
    if w.value.dim() == 1 or name == "position_embd.weight":
        return "f32", False, "f32"
    grid = f"{w.spec.method if w.spec else 'mixed'} grid" if w.k is not None else None
    if requested == "auto":
        if grid is None:
            return "f32", False, "f32 (float weight)"
        exact = next((t for t in AUTO_ORDER if holds(t, w)), None)
        if exact:
            return exact, True, f"{exact}, exact ({grid})"
        # no block type holds the grid: the type of about its bit width
        bits = w.spec.effective_bits if w.spec else 8
        requested = "q8_0" if bits > 4 else ("q4_1" if w.spec and w.spec.grid == "affine" else "q4_0")
    if requested == "f32":
        return "f32", False, f"f32, exact values ({grid})" if grid else "f32"
    width = w.value.shape[-1]
    if requested != "f16" and width % block_size(requested):
        return "f32", False, f"f32, width {width} is not a multiple of {requested}'s block of {block_size(requested)}"
    if grid is None:
        return requested, False, f"{requested}, quantized from a float weight"
    if holds(requested, w):
        return requested, True, f"{requested}, exact ({grid})"
    if not requantize:
        raise ExportError(f"{name}: no GGUF type holds its {grid} ({_describe(w.spec)}) as --type={requested}; "
                          f"it would be re-quantized (allow with --requantize, or use --type=f32)")
    return requested, False, f"{requested}, RE-QUANTIZED from its {grid} ({_describe(w.spec)})"


def _describe(spec):
    if spec is None:
        return "q, k and v on different grids"
    group = f" group {spec.group_size}" if spec.granularity == "per_group" else f" {spec.granularity}"
    return f"{spec.effective_bits}-bit{group}"


def plan_export(checkpoint, requested="auto", requantize=True):
    """[(name, Weight, type, exact, note)] for every tensor; ExportError before anything is written."""
    meta_dataset = checkpoint_dataset(checkpoint)
    try:
        meta = load_meta(os.path.join(ROOT, "data", meta_dataset))
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    if meta["tokenizer"] != "gpt2":
        if meta["tokenizer"] == "char":
            eleven = repr(meta["itos"][11]) if len(meta["itos"]) > 11 else "none"
            raise ExportError(f"dataset '{meta_dataset}' has a character-level vocabulary, which is not exported: "
                              f"llama.cpp's gpt2 (BPE) vocabulary can hold the characters, but with no end-of-text "
                              f"token of its own it takes token 11 ({eleven} here) as end of text and "
                              f"stops generating there; train on a GPT-2 BPE dataset, e.g. --dataset=shakespeare")
        raise ExportError(f"dataset '{meta_dataset}' has the tokenizer '{meta['tokenizer']}'; only GPT-2 BPE is exported")
    model, weights = checkpoint_weights(checkpoint)
    cfg = model.config
    if cfg.norm != "layernorm" or not cfg.tied_head or cfg.online_transforms:
        raise ExportError(f"the checkpoint is rotated (SpinQuant: norm {cfg.norm}, "
                          f"{'tied' if cfg.tied_head else 'untied'} head, online transforms "
                          f"{', '.join(f'{k}={v}' for k, v in cfg.online_transforms.items()) or 'none'}); llama.cpp's "
                          f"gpt2 graph has LayerNorms, a head tied to the embedding and no online transforms, so the "
                          f"file would compute another function: export the checkpoint before rotation")
    if model.config.vocab_size < GPT2_EOT + 1:
        raise ExportError(f"vocab_size {model.config.vocab_size} is smaller than GPT-2's {GPT2_EOT + 1}")
    if model.config.act_quant:
        print(f"note: activation quantization ({', '.join(sorted(model.config.act_quant))}) is not part of GGUF; "
              f"llama.cpp computes with its own activation types")
    plan = []
    for name, w in gguf_tensors(model, weights):
        type_name, exact, note = choose_type(name, w, requested, requantize)
        plan.append((name, w, type_name, exact, note))
    return model, plan


def tensor_error(w, values):
    """(max |error|, max |error| in quantization steps or None) of the values llama.cpp reads against ours."""
    err = (values - w.value).abs()
    steps = (err / w.scale).max().item() if w.scale is not None else None
    return err.max().item(), steps


def export(checkpoint, path, requested="auto", requantize=True, log=print):
    """Write a checkpoint as a GGUF file (atomically); returns [(name, type, max error, error in steps, note)]."""
    model, plan = plan_export(checkpoint, requested, requantize)
    cfg = model.config
    tokens, types, merges = (list(x) for x in gpt2_vocab())
    for i in range(len(tokens), cfg.vocab_size):  # a padded vocabulary (50304): unused tokens, as llama.cpp's converter
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".gguf-", suffix=".tmp")
    os.close(fd)
    report = []
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_name(os.path.splitext(os.path.basename(path))[0])
        writer.add_context_length(cfg.block_size)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(4 * cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(LAYER_NORM_EPS)
        # the file type llama.cpp reports: the type holding most of the layers' weights
        sizes = Counter()
        for name, w, type_name, _, _ in plan:
            if name.startswith("blk.") and w.value.dim() > 1:
                sizes[type_name] += w.value.numel()
        writer.add_file_type(FILE_TYPES[sizes.most_common(1)[0][0]])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(GPT2_EOT)
        writer.add_eos_token_id(GPT2_EOT)
        writer.add_add_bos_token(False)
        for name, w, type_name, exact, note in plan:
            array, raw = encode(type_name, w, exact)
            max_err, steps = tensor_error(w, decode(array, raw, w.value.shape))
            report.append((name, type_name, max_err, steps, note))
            if raw is None:
                writer.add_tensor(name, array)
            else:
                writer.add_tensor(name, array, raw_dtype=raw)
            if w.value.dim() > 1:
                error = f"max error {max_err:.3g}" + (f" ({steps:.2e} of a step)" if steps is not None else "")
                log(f"{name:24s} {type_name:6s} {note}; {error}")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return report


# --- import ----------------------------------------------------------------------------------------------------

def _field(reader, key):
    field = reader.get_field(key)
    return None if field is None else field.contents()


# model_args from the GGUF's gpt2.* metadata
GGUF_DIMS = {"block_count": "n_layer", "attention.head_count": "n_head", "embedding_length": "n_embd",
             "context_length": "block_size", "feed_forward_length": None}


def gguf_shapes(n_layer, n_embd, block_size, vocab_size):
    """{llama.cpp tensor name: shape} of model.py's GPT in llama.cpp's gpt2 layout (every bias included)."""
    C = n_embd
    shapes = {"token_embd.weight": (vocab_size, C), "position_embd.weight": (block_size, C),
              "output_norm.weight": (C,), "output_norm.bias": (C,)}
    for i in range(n_layer):
        for name, shape in (("attn_norm", (C,)), ("ffn_norm", (C,)), ("attn_qkv", (3 * C, C)),
                            ("attn_output", (C, C)), ("ffn_up", (4 * C, C)), ("ffn_down", (C, 4 * C))):
            shapes[f"blk.{i}.{name}.weight"] = shape
            shapes[f"blk.{i}.{name}.bias"] = (shape[0],)
    return shapes


def check_gguf(path, fields, vocab_size, shapes):
    """model_args of a GGUF whose metadata (`fields`: gpt2.<key> -> value) agree with its tensors' names and
    shapes; ValueError naming the file and the first disagreement otherwise. Called before anything is built."""
    dims = {}
    for key, arg in GGUF_DIMS.items():
        value = fields.get(key)
        if value is None and arg is None:
            continue
        if type(value) is not int or not 1 <= value <= 2 ** 31 - 1:
            raise ValueError(f"{path}: its metadata {ARCH}.{key} is {value!r}; expected a positive integer")
        dims[key] = value
    n_layer, n_head, C = dims["block_count"], dims["attention.head_count"], dims["embedding_length"]
    if C % n_head:
        raise ValueError(f"{path}: its embedding_length {C} is not divisible by its head_count {n_head}")
    if dims.get("feed_forward_length", 4 * C) != 4 * C:
        raise ValueError(f"{path}: its feed_forward_length {dims['feed_forward_length']} is not 4 x its "
                         f"embedding_length {C} (model.py's MLP)")
    layers = {int(name.split(".")[1]) for name in shapes if name.startswith("blk.") and name.split(".")[1].isdigit()}
    if layers and max(layers) + 1 != n_layer:
        raise ValueError(f"{path}: its block_count is {n_layer}, its tensors hold {max(layers) + 1} blocks")
    if n_layer > len(shapes):
        raise ValueError(f"{path}: its block_count is {n_layer}, with only {len(shapes)} tensors")
    expected = gguf_shapes(n_layer, C, dims["context_length"], vocab_size)
    expected["output.weight"] = (vocab_size, C)  # optional: the head, tied to token_embd
    for name, shape in shapes.items():
        if name not in expected:
            raise ValueError(f"{path}: has a tensor {name} that llama.cpp's gpt2 with block_count={n_layer} has not")
        if shape != expected[name]:
            raise ValueError(f"{path}: tensor {name} has shape {list(shape)}, its metadata (block_count={n_layer}, "
                             f"embedding_length={C}, context_length={dims['context_length']}, {vocab_size} tokens) "
                             f"give {list(expected[name])}")
    missing = [name for name in expected if name not in shapes and name != "output.weight"]
    if missing:
        raise ValueError(f"{path}: lacks the tensor {missing[0]} (of {len(missing)} missing) that its metadata "
                         f"(block_count={n_layer}) require")
    return dict(n_layer=n_layer, n_head=n_head, n_embd=C, block_size=dims["context_length"], vocab_size=vocab_size,
                bias=True, dropout=0.0, gelu_approximate="tanh")


def read_gguf(path):
    """(model_args, state of model.py's GPT) of a llama.cpp gpt2 GGUF; ValueError naming the problem otherwise."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise ValueError(f"{path} is a '{arch}' model; only the '{ARCH}' architecture is imported")
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    if _field(reader, "tokenizer.ggml.model") != "gpt2" or tuple(tokens[:GPT2_EOT + 1]) != gpt2_vocab()[0]:
        raise ValueError(f"{path}'s vocabulary is not GPT-2's BPE, the only one nanoQAT's datasets tokenize with")
    eps = _field(reader, f"{ARCH}.attention.layer_norm_epsilon")
    if eps is not None and abs(eps - LAYER_NORM_EPS) > 1e-9:
        raise ValueError(f"{path} has layer_norm_epsilon={eps}; model.py's LayerNorm uses {LAYER_NORM_EPS}")
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    model_args = check_gguf(path, {key: _field(reader, f"{ARCH}.{key}") for key in GGUF_DIMS}, len(tokens), shapes)
    n_layer, n_embd = model_args["n_layer"], model_args["n_embd"]
    tensors = {}
    for t in reader.tensors:
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type not in (Q.F32, Q.F16) else t.data
            tensors[t.name] = torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(shapes[t.name]).copy())
        except (ValueError, TypeError, NotImplementedError) as e:
            raise ValueError(f"{path}: tensor {t.name} ({t.tensor_type.name}) cannot be read "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if not bool(torch.isfinite(tensors[t.name]).all()):
            raise ValueError(f"{path}: tensor {t.name} holds nan or inf")
    C = n_embd
    state = {"transformer.wte.weight": tensors["token_embd.weight"],
             "transformer.wpe.weight": tensors["position_embd.weight"],
             "transformer.ln_f.weight": tensors["output_norm.weight"], "transformer.ln_f.bias": tensors["output_norm.bias"]}
    if "output.weight" in tensors and not torch.equal(tensors["output.weight"], tensors["token_embd.weight"]):
        raise ValueError(f"{path} has an output head apart from its token embedding; model.py ties the two")
    for i in range(n_layer):
        h, b = f"transformer.h.{i}", f"blk.{i}"
        for ours, theirs in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm"), ("attn.attn_proj", "attn_output"),
                             ("mlp.mlp_up", "ffn_up"), ("mlp.mlp_down", "ffn_down")):
            for kind in ("weight", "bias"):
                state[f"{h}.{ours}.{kind}"] = tensors[f"{b}.{theirs}.{kind}"]
        for kind in ("weight", "bias"):
            for j, site in enumerate("qkv"):
                state[f"{h}.attn.{site}.{kind}"] = tensors[f"{b}.attn_qkv.{kind}"][j * C:(j + 1) * C]
    return model_args, state


def load_gguf_gpt2(path, block_size=None, dropout=0.0, **overrides):
    """(GPT, model_args) from a GPT-2 GGUF, as quantization/hf.py's load_hf_gpt2 does from a transformers folder
    (block_size may shorten the context; `overrides` are train.py's quantization fields for QAT fine-tuning)."""
    model_args, state = read_gguf(path)
    if block_size:
        model_args["block_size"] = min(block_size, model_args["block_size"])
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:model_args["block_size"]]
    model_args = {**model_args, "dropout": dropout, **overrides}
    model = GPT(GPTConfig(**model_args))
    names = set(model.state_dict())
    latent = {k: k[:-len("weight")] + "parametrizations.weight.original" for k in state}
    model.load_state_dict({latent[k] if k not in names and latent[k] in names else k: v for k, v in state.items()})
    return model, model_args


def import_checkpoint(path, out_dir, dataset="shakespeare"):
    model, model_args = load_gguf_gpt2(path)
    ckpt = os.path.join(out_dir, "ckpt.pt")
    save_checkpoint(ckpt, {"model": model.state_dict(), "model_args": model_args, "iter_num": 0, "best_val_loss": None,
                           "config": {"init_from": path}, "dataset": dataset, "quantization_enabled": True})
    return ckpt


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["import"]:
        p = OneLineParser(prog="gguf_export.py import", description="Read a GPT-2 GGUF into a checkpoint.")
        p.add_argument("--gguf", required=True, help="the GGUF file to read")
        p.add_argument("--out_dir", default="out-gguf", help="folder for the ckpt.pt written")
        p.add_argument("--dataset", default="shakespeare", help="GPT-2 BPE data folder that sample.py tokenizes with")
        p.add_argument("--overwrite", action="store_true", help="replace an existing <out_dir>/ckpt.pt")
        args = p.parse_args(argv[1:])
        try:
            check_output_dir(args.out_dir, ["ckpt.pt"], [args.gguf], overwrite=args.overwrite)
        except ValueError as e:
            sys.exit(f"{p.prog}: error: --out_dir={args.out_dir}: {e}")
        try:
            print(f"wrote {import_checkpoint(args.gguf, args.out_dir, args.dataset)}")
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"{p.prog}: error: --gguf={args.gguf}: {e}")
        return
    p = OneLineParser(prog="gguf_export.py", description="Write a checkpoint as a llama.cpp GGUF file.")
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.pt (QAT, full precision or packed PTQ)")
    p.add_argument("--gguf", default=None, help="file to write (default: <out_dir>/model.gguf)")
    p.add_argument("--type", default="auto", choices=TYPES,
                   help="auto: per tensor, the block type that holds its grid exactly (float weights stay f32)")
    p.add_argument("--requantize", action=BoolFlag, default=True,
                   help="allow re-quantizing a grid the chosen type does not hold (False: refuse instead)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --gguf file")
    args = p.parse_args(argv)
    path = args.gguf or os.path.join(args.out_dir, "model.gguf")
    source = args.out_dir if os.path.isfile(args.out_dir) else os.path.join(args.out_dir, "ckpt.pt")
    try:
        check_output_file(path, [source], args.overwrite)
    except ValueError as e:
        sys.exit(f"{p.prog}: error: --gguf={path}: {e}")
    try:
        checkpoint = load_checkpoint(args.out_dir)
        if is_packed(checkpoint):
            check_packed(checkpoint, source)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"{p.prog}: error: --out_dir={args.out_dir}: {e}")
    try:
        export(checkpoint, path, args.type, args.requantize)
    except ExportError as e:
        sys.exit(f"{p.prog}: error: --out_dir={args.out_dir}: {e}")
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
