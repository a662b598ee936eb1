"""The scripts behind the README's tables, on tiny settings: their flags do what their help says."""
import json
import os

import torch

from conftest import TINY, run_main, run_script


def test_compare_methods_suite_out_root_and_jobs(char_data, tmp_path):
    result = run_script("demos/compare_methods.py", "--suite=activations", f"--out_root={tmp_path}", "--jobs=2",
                        "--", *[f for f in TINY if not f.startswith("--device")], "--max_iters=2",
                        "--eval_interval=2")
    table = (tmp_path / "activations.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == [
        "full precision", "W8A8 (all sites)", "W4A8 (all sites)", "W8A4 (all sites)"]
    assert all(os.path.exists(tmp_path / d / "ckpt.pt") for d in ("full_precision", "W8A8", "W4A8", "W8A4"))
    assert "| full precision | 2 |" in result.stdout


def test_ptq_compare_bit_widths_methods_and_json(trained_fp, tmp_path):
    from conftest import load_script
    module = load_script("demos/ptq_compare.py")
    out = tmp_path / "rows.json"
    error = run_main(module.main, f"--out_dir={trained_fp}", "--bit_widths=3", "--methods=rtn,gptq", "--nsamples=8",
                     "--eval_tokens=2000", "--device=cpu", "--progress=False", f"--json={out}")
    assert error is None, error
    rows = json.loads(out.read_text())["rows"]
    assert {(r["method"], r.get("bits")) for r in rows if r["method"] != "full precision"} == {("rtn", 3), ("gptq", 3)}
    assert run_main(module.main, f"--out_dir={trained_fp}", "--methods=rtn,fancy").endswith("unknown fancy")


def test_autoround_ptq_sites_sym_and_gptq_options(trained_fp, tmp_path):
    from test_autoround import load_demo
    demo = load_demo()
    qdir = tmp_path / "q"
    error = run_main(demo.main, f"--out_dir={trained_fp}", "--method=gptq", "--bits=4", "--group_size=16", "--sym",
                     "--sites=q,mlp_down", "--act_order", "--true_sequential=False", "--damp_percent=0.05",
                     "--fp_target",
                     "--seed=3", "--nsamples=8", "--eval_tokens=2000", "--eval_batch_size=4", "--device=cpu",
                     "--progress=False", f"--quantized_dir={qdir}")
    assert error is None, error
    ckpt = torch.load(qdir / "ckpt.pt", weights_only=True)
    assert sorted(ckpt["packed_weights"]) == ["transformer.h.0.attn.q", "transformer.h.0.mlp.mlp_down",
                                              "transformer.h.1.attn.q", "transformer.h.1.mlp.mlp_down"]
    assert all(p["spec"]["method"] == "symmetric_quant" for p in ckpt["packed_weights"].values())
    assert ckpt["ptq"]["sym"] is True and ckpt["ptq"]["method"] == "gptq" and ckpt["ptq"]["fp_target"] is True
    assert run_main(demo.main, f"--out_dir={trained_fp}", "--eval_batch_size=0").endswith("must be at least 1")


def test_perplexity_split_flag(trained_fp, capsys):
    from quantization import perplexity
    for split in ("train", "val"):
        assert run_main(perplexity.main, f"--out_dir={trained_fp}", f"--split={split}", "--max_tokens=3000",
                        "--device=cpu", "--progress=False") is None
    out = capsys.readouterr().out
    assert "shakespeare_char train: " in out and "shakespeare_char val: " in out
