"""Sliding-window perplexity against a token-by-token reference, and the script on the corpus and a text file."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from quantization.perplexity import evaluate, main, windows
from test_autoround import load_demo, small_model

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.mark.parametrize("n,seqlen,stride", [(100, 16, 16), (100, 16, 5), (17, 16, 1), (50, 7, 3), (64, 63, 63)])
def test_windows_score_every_target_once(n, seqlen, stride):
    scored = []
    for start, first in windows(n, seqlen, stride):
        assert 0 <= start and start + seqlen <= n - 1
        scored += list(range(start + 1 + first, start + seqlen + 1))
    assert scored == list(range(1, n))


def reference_nll(model, tokens, context):
    """Each target predicted from up to `context` tokens before it, one forward pass per target."""
    nll = []
    with torch.no_grad():
        for j in range(1, len(tokens)):
            logits, _ = model(tokens[max(0, j - context):j][None])
            nll.append(F.cross_entropy(logits[0, -1:], tokens[j:j + 1]).item())
    return sum(nll) / len(nll)


def test_stride_one_equals_token_by_token_reference():
    model = small_model().eval()
    tokens = torch.randint(0, 84, (60,))
    result = evaluate(model, tokens, seqlen=16, stride=1, batch_size=7, progress=False)
    assert result["tokens"] == 59
    assert result["loss"] == pytest.approx(reference_nll(model, tokens, 16), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_non_overlapping_windows_equal_chunked_cross_entropy():
    model = small_model().eval()
    tokens = torch.randint(0, 84, (16 * 5 + 1,))
    x, y = tokens[:-1].reshape(5, 16), tokens[1:].reshape(5, 16)
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 1], y[i:i + 1])[0] for i in range(5)])
    expected = F.cross_entropy(logits.reshape(-1, 84), y.reshape(-1)).item()
    result = evaluate(model, tokens, batch_size=2, progress=False)
    assert result["tokens"] == 80 and result["loss"] == pytest.approx(expected, rel=1e-5)


def test_per_window_losses_are_each_windows_mean_over_its_targets():
    """evaluate(per_window=True): one loss per window, each the mean over the targets that window scores (the last
    window's only new ones), against a window-by-window reference; their token-weighted mean is the loss."""
    model = small_model().eval()
    tokens = torch.randint(0, 84, (16 * 4 + 6,))
    result = evaluate(model, tokens, seqlen=16, batch_size=3, progress=False, per_window=True)
    expected, weights = [], []
    with torch.no_grad():
        for start, first in windows(len(tokens), 16, 16):
            logits, _ = model(tokens[start:start + 16][None], tokens[start + 1:start + 17][None])
            nll = F.cross_entropy(logits[0], tokens[start + 1:start + 17], reduction="none")[first:]
            expected.append(nll.double().mean().item())
            weights.append(len(nll))
    assert result["window_losses"].tolist() == pytest.approx(expected, rel=1e-5)
    weighted = sum(l * w for l, w in zip(expected, weights)) / sum(weights)
    assert result["loss"] == pytest.approx(weighted, rel=1e-5) and "window_losses" not in evaluate(
        model, tokens, seqlen=16, progress=False)


def test_bad_stride():
    with pytest.raises(ValueError, match="stride=20"):
        evaluate(small_model(), torch.randint(0, 84, (100,)), seqlen=16, stride=20)


def test_script_base_and_quantized_side_by_side(trained_fp, tmp_path, capsys):
    quantized = str(tmp_path / "rtn")
    load_demo().main([f"--out_dir={trained_fp}", f"--quantized_dir={quantized}", "--method=rtn", "--bits=2",
                      "--group_size=64", "--eval_tokens=2000", "--device=cpu", "--progress=False"])
    capsys.readouterr()
    results = main([f"--out_dir={trained_fp}", f"--quantized_dir={quantized}", "--max_tokens=4000",
                    "--device=cpu", "--progress=False"])
    out = capsys.readouterr().out
    assert "shakespeare_char val: 3,999 tokens scored" in out
    assert f"| {trained_fp} |" in out and f"| {quantized} |" in out
    (_, base), (_, q) = results
    assert q["loss"] > base["loss"]  # 2-bit round to nearest hurts
    text = tmp_path / "poem.txt"
    text.write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n" * 3)
    (_, r), = main([f"--out_dir={trained_fp}", f"--text_file={text}", "--stride=8", "--device=cpu",
                    "--progress=False"])
    assert r["tokens"] == len(text.read_text()) - 1


def test_script_errors(trained_fp, tmp_path):
    with pytest.raises(SystemExit, match="--quantized_dir=.*nowhere.*not found"):
        main([f"--out_dir={trained_fp}", f"--quantized_dir={tmp_path / 'nowhere'}", "--max_tokens=100",
              "--progress=False"])
    bad = tmp_path / "emoji.txt"
    bad.write_text("hello \u2603")
    with pytest.raises(SystemExit, match="not in this dataset's vocabulary"):
        main([f"--out_dir={trained_fp}", f"--text_file={bad}", "--progress=False"])
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="`datasets` package is not installed"):
            main([f"--out_dir={trained_fp}", "--hf_dataset=wikitext:wikitext-2-raw-v1", "--progress=False"])


@pytest.fixture
def text_folder(tmp_path, monkeypatch):
    """A local `datasets` text folder (one row per line, split 'test') of Shakespeare, as --hf_dataset reads it;
    the datasets cache goes to the test's folder. Returns (folder, its text)."""
    from conftest import ROOT
    with open(f"{ROOT}/data/shakespeare/shakespeare.txt") as f:
        text = f.read(60_000)
    folder = tmp_path / "lines"
    folder.mkdir()
    (folder / "test.txt").write_text(text)
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return folder, text


def offline(tmp_path):  # a local folder needs no network; the cache stays in the test's folder
    return dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"))


def test_hf_dataset_with_max_tokens_streams_only_what_it_needs(text_folder, char_data):
    from quantization.perplexity import hf_dataset_tokens
    from tokenizer import Tokenizer, load_meta
    folder, text = text_folder
    tokenizer = Tokenizer(load_meta(char_data))
    whole = torch.tensor(tokenizer.encode("\n\n".join(text.splitlines())))  # the rows, joined by blank lines
    for n in (1, 777, len(whole), len(whole) + 10):
        assert torch.equal(hf_dataset_tokens(str(folder), tokenizer, max_tokens=n), whole[:n])
    assert torch.equal(hf_dataset_tokens(str(folder), tokenizer), whole)  # not streamed


def test_hf_dataset_from_the_script_and_its_errors_are_one_line(text_folder, trained_fp, tmp_path):
    from conftest import run_script
    folder, _ = text_folder
    result = run_script("quantization/perplexity.py", f"--out_dir={trained_fp}", f"--hf_dataset={folder}",
                        "--max_tokens=1000", "--progress=False", "--device=cpu", env=offline(tmp_path))
    assert "999 tokens scored" in result.stdout
    for flags, message in ((["--hf_split=train"], "could not load split 'train'"),
                           (["--hf_text_field=body"], "no column 'body' (it has text)")):
        bad = run_script("quantization/perplexity.py", f"--out_dir={trained_fp}", f"--hf_dataset={folder}",
                         "--max_tokens=100", "--progress=False", *flags, check=False, env=offline(tmp_path))
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode != 0 and message in lines[-1] and f"--hf_dataset={folder}" in lines[-1]
        assert "Traceback" not in bad.stderr
