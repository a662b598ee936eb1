"""GGUF export/import (quantization/gguf_export.py): the file read back by the gguf package's own reader and
dequantizers equals the model's weights where a block type holds the grid, the vocabulary tokenizes as tiktoken
does, export then import keeps the logits, and bad input is refused with nothing written. llama.cpp itself
(llama-cpp-python) is checked when it is installed."""
import functools
import os

import gguf
import numpy as np
import pytest
import torch

from checkpoint import save_checkpoint
from conftest import ROOT, run_main, train_in_process
from model import GPT, GPTConfig
from quantization import gguf_export

SITES = ("q", "k", "v", "attn_proj", "mlp_up", "mlp_down")


def spec(method="symmetric_quant", bits=8, granularity="per_channel", group_size=0, fp16_scale=True):
    return dict(method=method, bits=bits, granularity=granularity, group_size=group_size, fp16_scale=fp16_scale)


# the grids of the issue: symmetric 4-bit g32 -> Q4_0, affine 4-bit g32 -> Q4_1, symmetric 8-bit -> Q8_0,
# ternary (one scale per tensor, a 256-wide input) -> TQ2_0; the embedding at 8 bits per row -> Q8_0
GRIDS = {"q": spec(bits=4, granularity="per_group", group_size=32), "k": spec(bits=4, granularity="per_group", group_size=32),
         "v": spec(bits=4, granularity="per_group", group_size=32),
         "attn_proj": spec("affine_quant", 4, "per_group", 32), "mlp_up": spec(), "mlp_down": spec("ternary_quant", 2, "per_tensor")}
EXPECTED = {"attn_qkv": "q4_0", "attn_output": "q4_1", "ffn_up": "q8_0", "ffn_down": "tq2_0"}


def make_checkpoint(path, weight_quant=None, embedding_quant=None, dataset="shakespeare", seed=0):
    """A tiny GPT-2 BPE checkpoint as train.py writes it (random weights: exactness does not need training)."""
    torch.manual_seed(seed)
    weight_quant = weight_quant or {}
    args = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=50257, bias=False, dropout=0.0,
                linear_variants={s: "quantized_linear" if s in weight_quant else "linear" for s in SITES},
                weight_quant=weight_quant, act_quant={}, store_activations=False, embedding_quant=embedding_quant,
                gelu_approximate="tanh")
    model = GPT(GPTConfig(**args))
    save_checkpoint(os.path.join(path, "ckpt.pt"), {"model": model.state_dict(), "model_args": args,
                                                    "dataset": dataset, "quantization_enabled": True})
    return str(path)


@functools.lru_cache(maxsize=4)
def read_file(path):
    """(tensors, metadata) of a written file through the gguf package alone, from one reader (it parses the whole
    vocabulary, GPT-2's tokens and merges, as it opens: about 2 s): {tensor name: (type name, float values as
    llama.cpp reads them)}, and {key: value} of its general.* and gpt2.* metadata."""
    reader = gguf.GGUFReader(path)
    names = {v: k for k, v in gguf_export.GGML_TYPES.items()}
    out = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (names[t.tensor_type], torch.from_numpy(np.asarray(values, np.float32).reshape(shape).copy()))
    metadata = {key: field.contents() for key, field in reader.fields.items() if key.startswith(("general.", "gpt2."))}
    return out, metadata


def read_back(path):
    """{tensor name: (type name, float values as llama.cpp reads them)} through the gguf package alone."""
    return read_file(path)[0]


@functools.lru_cache(maxsize=4)
def model_values(ckpt_dir):
    from inference import load_checkpoint
    model, weights = gguf_export.checkpoint_weights(load_checkpoint(ckpt_dir))
    return dict(gguf_export.gguf_tensors(model, weights))


@pytest.fixture(scope="module")
def exported(bpe_data, tmp_path_factory):
    """The GRIDS checkpoint trained-grid style with fp16 scales, exported with --type=auto: (ckpt dir, gguf path)."""
    ckpt = make_checkpoint(tmp_path_factory.mktemp("grids"), GRIDS, spec())
    path = os.path.join(ckpt, "model.gguf")
    assert run_main(gguf_export.main, f"--out_dir={ckpt}", f"--gguf={path}") is None
    return ckpt, path


def test_llama_cpp_names_and_types(exported):
    ckpt, path = exported
    back = read_back(path)
    expected = {gguf.TENSOR_NAMES[t].format(bid=i) + suffix for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPT2]
                for i in range(2) for suffix in (".weight", ".bias")}
    assert set(back) <= expected and "output.weight" not in back  # the head is tied to token_embd
    assert len(back) == 4 + 2 * 12
    assert back["token_embd.weight"][0] == "q8_0" and back["position_embd.weight"][0] == "f32"
    for i in range(2):
        for tensor, type_name in EXPECTED.items():
            assert back[f"blk.{i}.{tensor}.weight"][0] == type_name
    metadata = read_file(path)[1]  # the reader that read the tensors above
    assert metadata["general.architecture"] == "gpt2"
    assert metadata["gpt2.block_count"] == 2
    assert metadata["gpt2.context_length"] == 32


def test_exact_grids_read_back_equal(exported):
    """With fp16 scales, Q8_0, Q4_0 and TQ2_0 read back bit-equal to the model's dequantized weights; Q4_1's
    minimum m = -zero_point * scale is rounded to fp16, an error far under a quantization step."""
    ckpt, path = exported
    ours, back = model_values(ckpt), read_back(path)
    for name, (type_name, values) in back.items():
        if type_name == "q4_1":
            err = (values - ours[name].value).abs() / ours[name].scale
            assert 0 < err.max() < 0.01
        else:
            assert torch.equal(values, ours[name].value), name
    # zero biases where the model has none (llama.cpp's gpt2 requires them)
    assert not back["blk.0.attn_qkv.bias"][1].any() and back["blk.0.attn_qkv.bias"][1].shape == (192,)


def test_fp32_scales_cost_bounded(bpe_data, tmp_path):
    """Without --quantize_linear_fp16_scale the fp16 block scale is the only error: at most |code| * 2**-11 steps."""
    grids = {s: {**g, "fp16_scale": False} for s, g in GRIDS.items()}
    ckpt = make_checkpoint(tmp_path, grids, spec(fp16_scale=False))
    report = gguf_export.export(gguf_export.load_checkpoint(ckpt), os.path.join(ckpt, "m.gguf"))
    steps = {name: s for name, t, err, s, note in report if s is not None}
    assert max(steps.values()) > 0
    assert steps["token_embd.weight"] <= 127 * 2 ** -11 and steps["blk.0.attn_qkv.weight"] <= 8 * 2 ** -11


def test_requantize_reported_or_refused(bpe_data, tmp_path):
    """4-bit group 16: no block type holds it; auto re-quantizes to Q4_0 (error within one Q4_0 step of the block:
    half a step, or a whole one where the block's largest value is positive and clips to code 7; d is rounded to
    fp16) and says so; with --requantize=False: one line naming the tensor, nothing written."""
    grids = {s: spec(bits=4, granularity="per_group", group_size=16) for s in SITES}
    ckpt = make_checkpoint(tmp_path, grids)
    path = os.path.join(ckpt, "m.gguf")
    error = run_main(gguf_export.main, f"--out_dir={ckpt}", f"--gguf={path}", "--no-requantize")
    assert error.startswith("gguf_export.py: error:") and "blk.0.attn_qkv.weight" in error and "\n" not in error
    assert not os.path.exists(path) and os.listdir(ckpt) == ["ckpt.pt"]
    lines = []
    gguf_export.export(gguf_export.load_checkpoint(ckpt), path, log=lines.append)
    assert any("blk.0.ffn_up.weight" in line and "RE-QUANTIZED" in line for line in lines)
    ours, back = model_values(ckpt), read_back(path)
    type_name, values = back["blk.0.ffn_up.weight"]
    assert type_name == "q4_0"
    w = ours["blk.0.ffn_up.weight"].value.reshape(-1, 32)
    d = w.abs().amax(dim=1, keepdim=True) / 8  # Q4_0's block step
    err = (values.reshape(-1, 32) - w).abs()
    assert (err <= d * (1 + 8 * 2 ** -11) + 1e-7).all() and (err > d / 2 * 1.01).float().mean() < 0.05
    assert not torch.equal(values, ours["blk.0.ffn_up.weight"].value)


def test_packed_grid_that_must_be_requantized_exports(bpe_data, tmp_path):
    """A packed PTQ checkpoint whose grid no block type holds (RTN affine 4-bit, groups of 16) exports with
    --type=auto and --type=q8_0 (re-quantized, said so), and --no-requantize refuses it in one line: no traceback
    from the packed weights' gradient."""
    from inference import from_checkpoint, load_checkpoint
    from quantization.packing import packed_checkpoint
    from quantization.rtn import rtn_quantize, weight_spec
    fp = make_checkpoint(tmp_path / "fp")
    model = from_checkpoint(load_checkpoint(fp))
    records = rtn_quantize(model, weight_spec(4, 16))
    packed = tmp_path / "rtn"
    save_checkpoint(str(packed / "ckpt.pt"), packed_checkpoint(load_checkpoint(fp), model, records, {"method": "rtn"}))
    for flags in ([], ["--type=q8_0"]):
        path = str(tmp_path / f"rtn{len(flags)}.gguf")
        assert run_main(gguf_export.main, f"--out_dir={packed}", f"--gguf={path}", *flags) is None
        assert read_back(path)["blk.0.ffn_up.weight"][0] == ("q8_0" if flags else "q4_1")
    path = str(tmp_path / "refused.gguf")
    error = run_main(gguf_export.main, f"--out_dir={packed}", f"--gguf={path}", "--no-requantize")
    assert "blk.0.attn_qkv.weight" in error and "--requantize" in error and "\n" not in error
    assert not os.path.exists(path)


def test_vocab_tokenizes_like_tiktoken(bpe_data):
    """The tokens and merges rebuilt from the tiktoken ranks, run by HF's independent BPE implementation, give
    tiktoken's token ids on Shakespeare."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizer import gpt2_encoding
    tokens, types, merges = gguf_export.gpt2_vocab()
    assert len(tokens) == 50257 and len(merges) == 50000 and merges[:3] == ("Ġ t", "Ġ a", "h e")
    assert types[50256] == gguf.TokenType.CONTROL and tokens[50256] == "<|endoftext|>"
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens[:50256])}, [tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    with open(os.path.join(ROOT, "data", "shakespeare", "shakespeare.txt")) as f:
        text = f.read()[:20000] + " naïve café — 3.14159 ’tis"
    assert bpe.encode(text).ids == gpt2_encoding().encode_ordinary(text)


def test_import_round_trip_and_init_from(bpe_data, tmp_path, one_cpu_thread):
    """f32 export then import gives the same logits; train.py --init_from=model.gguf starts from those weights."""
    from inference import load_checkpoint
    ckpt = make_checkpoint(tmp_path / "fp")
    path = str(tmp_path / "fp.gguf")
    assert run_main(gguf_export.main, f"--out_dir={ckpt}", f"--gguf={path}", "--type=f32") is None
    assert run_main(gguf_export.main, "import", f"--gguf={path}", f"--out_dir={tmp_path / 'back'}") is None
    original, back = load_checkpoint(ckpt), load_checkpoint(str(tmp_path / "back"))
    m1, m2 = GPT(GPTConfig(**original["model_args"])), GPT(GPTConfig(**back["model_args"]))
    m1.load_state_dict(original["model"])
    m2.load_state_dict(back["model"])
    x = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        l1, l2 = m1.eval()(x, x)[0], m2.eval()(x, x)[0]
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
    train_in_process(str(tmp_path / "ft"), "--dataset=shakespeare", f"--init_from={path}", "--max_iters=1",
                     "--learning_rate=0", "--min_lr=0", "--eval_iters=1", "--block_size=32")
    tuned = load_checkpoint(str(tmp_path / "ft"))
    assert torch.equal(tuned["model"]["transformer.h.1.mlp.mlp_down.weight"], back["model"]["transformer.h.1.mlp.mlp_down.weight"])


def test_bad_input(bpe_data, char_data, tmp_path):
    char_ckpt = make_checkpoint(tmp_path / "char", dataset="shakespeare_char")
    out = str(tmp_path / "char.gguf")
    error = run_main(gguf_export.main, f"--out_dir={char_ckpt}", f"--gguf={out}")
    assert "character-level vocabulary" in error and "\n" not in error and not os.path.exists(out)
    other = str(tmp_path / "llama.gguf")
    writer = gguf.GGUFWriter(other, "llama")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    error = run_main(gguf_export.main, "import", f"--gguf={other}", f"--out_dir={tmp_path / 'imp'}")
    assert error.startswith("gguf_export.py import: error: --gguf=") and "'llama'" in error and "\n" not in error
    assert not os.path.exists(tmp_path / "imp")
    error = run_main(gguf_export.main, "import", f"--gguf={tmp_path / 'missing.gguf'}", f"--out_dir={tmp_path / 'imp'}")
    assert "not found" in error
    # a SpinQuant checkpoint: its online Hadamard, untied head and RMSNorms have no place in llama.cpp's gpt2 graph
    from quantization.spin_quant import SpinQuant
    base = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=32, vocab_size=50304))
    sq = SpinQuant(base, bits=4, act_bits=16, kv_bits=16, method="rtn")
    sq.optimize(torch.randint(0, 50257, (8, 33)), steps=1, progress=False)
    sq.apply(progress=False, select=False)
    rotated = tmp_path / "rotated"
    os.makedirs(rotated)
    save_checkpoint(str(rotated / "ckpt.pt"), sq.checkpoint({"dataset": "shakespeare", "iter_num": 0}))
    error = run_main(gguf_export.main, f"--out_dir={rotated}", f"--gguf={tmp_path / 'rotated.gguf'}")
    assert error.startswith("gguf_export.py: error: ") and "rotated" in error and "mlp_activation_output=hadamard" in error
    assert "\n" not in error and not os.path.exists(tmp_path / "rotated.gguf")


def test_llama_cpp_agrees(exported, bpe_data, one_cpu_thread):
    """llama.cpp loads the exact-grid file; its logits on a window follow ours (it quantizes activations itself)
    and its perplexity is within 0.5% of ours."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ckpt, path = exported
    from inference import load_checkpoint
    model, _ = gguf_export.checkpoint_weights(load_checkpoint(ckpt))
    tokens = np.fromfile(os.path.join(bpe_data, "val.bin"), dtype=np.uint16)[:33].astype(np.int64)
    llm = llama_cpp.Llama(model_path=path, n_ctx=32, n_batch=32, n_threads=1, logits_all=True, verbose=False)
    llm.eval(tokens[:32].tolist())
    theirs = torch.from_numpy(np.array(llm.scores[:32], dtype=np.float32))
    x = torch.from_numpy(tokens[:32])[None]
    with torch.no_grad():
        ours = model(x, x)[0][0]
    target = torch.from_numpy(tokens[1:33])
    ppl = [torch.nn.functional.cross_entropy(lg, target).exp().item() for lg in (ours, theirs)]
    assert abs(ppl[1] / ppl[0] - 1) < 0.005
    assert torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1] > 0.99


def test_import_quantized_file(exported):
    """Importing a quantized GGUF gives the float checkpoint of its dequantized blocks (qkv split back)."""
    ckpt, path = exported
    model_args, state = gguf_export.read_gguf(path)
    ours = model_values(ckpt)
    assert model_args["n_layer"] == 2 and model_args["n_embd"] == 64 and model_args["bias"]
    assert torch.equal(state["transformer.h.1.attn.k.weight"], ours["blk.1.attn_qkv.weight"].value[64:128])
    assert torch.equal(state["transformer.wte.weight"], ours["token_embd.weight"].value)


def test_fp16_scale_flag_and_quantizer():
    """--quantize_linear_fp16_scale reaches every weight spec and the embedding's; the scales it computes are
    float16 values, with the gradient still flowing to the weight; --gelu_approximate is a checked flag."""
    from configurator import model_quant_config, parse_args
    from quantization.quantizers import QuantSpec, compute_qparams, fake_quant
    args = parse_args(["--linear_variant_attn=quantized_linear", "--quantize_embedding", "--quantize_linear_fp16_scale",
                       "--gelu_approximate=tanh"])
    quant = model_quant_config(args)
    assert all(quant["weight_quant"][s]["fp16_scale"] for s in ("q", "k", "v", "attn_proj"))
    assert quant["embedding_quant"]["fp16_scale"] and args.gelu_approximate == "tanh"
    assert "fp16_scale" not in model_quant_config(parse_args(["--linear_variant_attn=quantized_linear"]))["weight_quant"]["q"]
    assert run_main(parse_args, "--gelu_approximate=exact").startswith("train.py: error: argument --gelu_approximate")
    x = torch.randn(8, 64, requires_grad=True)
    for method in ("symmetric_quant", "affine_quant", "ternary_quant"):
        spec = QuantSpec(method=method, bits=4, granularity="per_group", group_size=32, fp16_scale=True)
        scale, _ = compute_qparams(x, spec)
        assert torch.equal(scale, scale.half().float())
        assert not torch.equal(scale, compute_qparams(x, QuantSpec(method=method, bits=4, granularity="per_group",
                                                                   group_size=32))[0])
    fake_quant(x, spec, training=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
