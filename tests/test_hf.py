"""Hugging Face GPT-2 interop with a random tiny config (no network): import and export give the same logits."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from quantization.hf import export_checkpoint, import_checkpoint, load_hf_gpt2
from inference import load_model

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny_hf(activation="gelu_new"):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=48, vocab_size=100,
                                     activation_function=activation, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random biases and LayerNorm affines, so a mapping mistake shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def all_logits(model, idx):
    with torch.no_grad():
        return model(idx, idx)[0]


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_import_matches_transformers(tmp_path, fmt):
    hf = tiny_hf()
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path)
    else:
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model, model_args = load_hf_gpt2(str(tmp_path))
    assert model_args["gelu_approximate"] == "tanh" and model_args["block_size"] == 48
    idx = torch.randint(0, 100, (3, 48))
    torch.testing.assert_close(all_logits(model.eval(), idx), hf_logits(hf, idx), atol=1e-5, rtol=1e-5)


def test_export_of_trained_checkpoint_matches(trained_fp, tmp_path):
    model, _ = load_model(trained_fp, "cpu")
    export_checkpoint(trained_fp, str(tmp_path / "hf"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.activation_function == "gelu"
    idx = torch.randint(0, model.config.vocab_size, (2, 64))
    torch.testing.assert_close(hf_logits(hf, idx), all_logits(model, idx), atol=1e-5, rtol=1e-5)


def test_export_of_packed_quantized_checkpoint_matches(tmp_path):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path / "src")
    import_checkpoint(str(tmp_path / "src"), str(tmp_path / "ours"))
    from quantization.packing import save_packed
    from quantization.rtn import rtn_quantize, weight_spec
    model, _ = load_model(str(tmp_path / "ours"), "cpu")
    records = rtn_quantize(model, weight_spec(4, 16))
    from inference import load_checkpoint
    save_packed(str(tmp_path / "q" / "ckpt.pt"), load_checkpoint(str(tmp_path / "ours")), model, records, {})
    export_checkpoint(str(tmp_path / "q"), str(tmp_path / "hf"))
    back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 100, (2, 48))
    torch.testing.assert_close(hf_logits(back, idx), all_logits(model, idx), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hf_logits(back, idx), hf_logits(hf, idx), atol=1e-3)  # it is the quantized model
    # and importing the export gives back our model exactly
    reimported, _ = load_hf_gpt2(str(tmp_path / "hf"))
    for (name, p), q in zip(model.state_dict().items(), reimported.state_dict().values()):
        assert torch.equal(p, q), name


def test_hub_name_offline_is_a_clear_error(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "quantization", "hf.py"), "import", "--hf=gpt2",
                             f"--out_dir={tmp_path / 'out'}"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("hf.py: error: could not fetch 'gpt2'")
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ValueError, match="neither a folder nor one of gpt2"):
        load_hf_gpt2(str(tmp_path / "missing"))


def test_import_into_a_qat_model(tmp_path):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path)
    plain, _ = load_hf_gpt2(str(tmp_path))
    qat, args = load_hf_gpt2(str(tmp_path), block_size=32, linear_variants={"q": "quantized_linear"},
                             weight_quant={"q": {"bits": 8}})
    assert args["block_size"] == 32 and qat.config.linear_variants == {"q": "quantized_linear"}
    assert torch.equal(qat.transformer.h[1].attn.q.latent_weight, plain.transformer.h[1].attn.q.weight)
    assert torch.equal(qat.transformer.wpe.weight, plain.transformer.wpe.weight[:32])


def test_train_fine_tunes_from_a_local_gpt2_folder_with_qat(tmp_path):
    """train.py --init_from=<HF folder>: GPT-2 weights, then QAT on the BPE Shakespeare data."""
    import json as _json

    import train as train_script
    from conftest import TINY, run_main, run_script
    if not os.path.exists(os.path.join(ROOT, "data", "shakespeare", "train.bin")):
        run_script("data/shakespeare/prepare.py")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    error = run_main(train_script.main, f"--out_dir={out}", *TINY, f"--init_from={tmp_path / 'hf'}",
                     "--dataset=shakespeare", "--max_iters=4", "--eval_interval=4", "--quantization_warmup_iters=2",
                     "--linear_variant_mlp=quantized_linear", "--quantize_linear_bits=4")
    assert error is None, error
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["gelu_approximate"] == "tanh" and ckpt["model_args"]["vocab_size"] == 50257
    assert ckpt["model_args"]["linear_variants"]["mlp_up"] == "quantized_linear"
    with open(out / "log.jsonl") as f:
        assert [r["quantized"] for r in map(_json.loads, f) if "loss" in r] == [False, False, True, True]
    error = run_main(train_script.main, f"--out_dir={out}", *TINY, f"--init_from={tmp_path / 'hf'}", "--max_iters=1",
                     "--overwrite")
    assert error is not None and "needs a GPT-2 BPE dataset" in error
