"""sample.py on a checkpoint of every weight method, and its errors."""
import pytest

import sample
from conftest import run_main, run_script, train_in_process
from quantization.quantizers import METHODS

QAT = ["--linear_variant_attn=quantized_linear", "--linear_variant_mlp=quantized_linear"]


@pytest.fixture(scope="session")
def method_checkpoints(char_data, tmp_path_factory):
    dirs = {}
    for method in METHODS:
        out = tmp_path_factory.mktemp(method)
        train_in_process(out, *QAT, f"--quantize_linear_method={method}", "--quantize_linear_bits=4",
                         "--quantization_warmup_iters=3", "--max_iters=6", "--eval_interval=6", "--log_interval=6")
        dirs[method] = out
    return dirs


@pytest.mark.parametrize("method", METHODS)
def test_sample_from_each_method(method_checkpoints, method, capsys):
    assert run_main(sample.main, f"--out_dir={method_checkpoints[method]}", "--start=ROMEO.", "--num_samples=2",
                    "--max_new_tokens=20", "--device=cpu") is None
    samples = [s for s in capsys.readouterr().out.split("---------------") if s.strip()]
    assert len(samples) == 2
    assert all(s.strip().startswith("ROMEO.") and len(s.strip()) >= len("ROMEO.") + 10 for s in samples)


def test_sample_cli_with_prompt_from_file(method_checkpoints, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("JULIET.\n")
    result = run_script("sample.py", f"--out_dir={method_checkpoints['ternary_quant']}", f"--start=FILE:{prompt}",
                        "--num_samples=1", "--max_new_tokens=5", "--device=cpu")
    assert result.stdout.startswith("JULIET.\n")


def test_sample_cli_error_is_one_line(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"garbage")
    result = run_script("sample.py", f"--out_dir={tmp_path}", check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a readable checkpoint" in lines[0], result.stderr


@pytest.mark.parametrize("make,flags,message", [
    (None, [], "not found"),
    ("ok", ["--start=FILE:/no/such/prompt"], "--start=FILE:/no/such/prompt"),
    ("ok", ["--start=\u00e9t\u00e9"], "not in this dataset's vocabulary"),
    ("ok", ["--num_samples=two"], "argument --num_samples: invalid int value"),
])
def test_sample_bad_input(method_checkpoints, tmp_path, make, flags, message):
    out = method_checkpoints["symmetric_quant"] if make == "ok" else tmp_path
    error = run_main(sample.main, f"--out_dir={out}", "--max_new_tokens=2", *flags)
    assert error is not None and message in error and "\n" not in error


def test_seed_temperature_and_top_k(method_checkpoints, capsys):
    out = method_checkpoints["affine_quant"]

    def draw(*flags):
        assert run_main(sample.main, f"--out_dir={out}", "--start=A", "--num_samples=1", "--max_new_tokens=30",
                        "--device=cpu", *flags) is None
        return capsys.readouterr().out

    assert draw("--seed=1") == draw("--seed=1")
    assert draw("--seed=1", "--temperature=2.0") != draw("--seed=2", "--temperature=2.0")
    # top_k=1 is greedy: the seed no longer matters
    assert draw("--seed=1", "--top_k=1") == draw("--seed=2", "--top_k=1")
