"""save_weights.py and visualize.py on dense-and-sparse weights: the outliers are saved as CSR beside the codes
of the dense rest (QAT and packed PTQ checkpoints, every file format), counted per site, drawn where they sit, and
a file whose sparse part does not fit its tensor is refused in one line."""
import dataclasses
import os

import numpy as np
import pytest
import torch

from checkpoint import save_checkpoint
from conftest import run_main, train_in_process
from model import GPT, GPTConfig
from quantization import save_weights, visualize
from quantization.packing import packed_checkpoint, unpack_weight
from quantization.rtn import rtn_quantize, weight_spec

FRACTION = 0.02
PLANTED = ("transformer.h.0.mlp.mlp_up", 7)  # a layer and an input column made an outlier channel
LATENT = ".parametrizations.weight.original"


@pytest.fixture(scope="module")
def qat_outliers(char_data, tmp_path_factory):
    """A tiny QAT model (3-bit, 2% outliers) with one input column of mlp_up scaled up: its out_dir."""
    out = tmp_path_factory.mktemp("qat_outliers")
    train_in_process(out, "--max_iters=3", "--eval_interval=3", "--quantization_warmup_iters=0",
                     "--linear_variant_attn=quantized_linear", "--linear_variant_mlp=quantized_linear",
                     "--quantize_linear_bits=3", f"--quantize_linear_outlier_fraction={FRACTION}")
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    checkpoint["model"][PLANTED[0] + LATENT][:, PLANTED[1]] *= 20
    save_checkpoint(str(out / "ckpt.pt"), checkpoint)
    return out


@pytest.fixture(scope="module")
def qat_saved(qat_outliers):
    paths = {}
    for file_type in save_weights.FILE_TYPES:
        paths[file_type] = str(qat_outliers / f"saved.{file_type}")
        save_weights.main([f"--out_dir={qat_outliers}", f"--file_name={paths[file_type]}",
                           f"--file_type={file_type}"])
    return paths


def test_outliers_are_the_largest_latent_weights_and_dequantize_to_the_computed_weight(qat_outliers, qat_saved):
    checkpoint = torch.load(qat_outliers / "ckpt.pt", weights_only=True)
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    model.set_quantization(True)
    model.eval()
    tensors = save_weights.load_quantized_data(qat_saved["pkl"])["tensors"]
    for name, latent in checkpoint["model"].items():
        if not name.endswith(LATENT):
            continue
        layer = name[:-len(LATENT)]
        saved = tensors[f"{layer}.weight"]
        w = latent.double().numpy()
        k = int(round(FRACTION * w.size))
        expected = set(np.argsort(-np.abs(w).ravel(), kind="stable")[:k].tolist())  # brute force, float64
        rows, cols = save_weights.outlier_positions(saved)
        assert len(rows) == k and set((rows * w.shape[1] + cols).tolist()) == expected, layer
        computed = model.get_submodule(layer).weight.detach().numpy()
        got = save_weights.dequantize_entry(saved)
        mask = np.zeros(w.shape, bool)
        mask[rows, cols] = True
        np.testing.assert_allclose(got[~mask], computed[~mask], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got[mask], w[mask], rtol=1e-3)  # fp16 values, the full-precision weights
        dense = save_weights.dequantize_entry(saved, with_outliers=False)
        assert (dense[mask] == 0).all()  # the dense part's codes hold 0 at the outliers


def test_every_format_holds_the_same_outliers(qat_saved):
    loaded = {t: save_weights.load_quantized_data(p)["tensors"] for t, p in qat_saved.items()}
    for name, tensor in loaded["pkl"].items():
        for other in loaded.values():
            for a in save_weights.OUTLIER_ARRAYS:
                assert np.array_equal(other[name][a], tensor[a]) and other[name][a].dtype == tensor[a].dtype


def test_outlier_count_per_site_is_printed(qat_outliers, tmp_path, capsys):
    # main() in this process: save_weights.py and visualize.py run as commands in test_save_weights.py and
    # test_visualize.py
    capsys.readouterr()
    assert run_main(save_weights.main, f"--out_dir={qat_outliers}", f"--file_name={tmp_path / 'x.npz'}",
                    "--file_type=npz") is None
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    checkpoint = torch.load(qat_outliers / "ckpt.pt", weights_only=True)
    for site in ("q", "k", "v", "attn_proj", "mlp_up", "mlp_down"):
        numel = sum(t.numel() for n, t in checkpoint["model"].items() if n.endswith(f".{site}{LATENT}"))
        per_layer = [int(round(FRACTION * t.numel())) for n, t in checkpoint["model"].items()
                     if n.endswith(f".{site}{LATENT}")]
        assert [site, f"{sum(per_layer):,}", "of", f"{numel:,}"] == [l for l in lines if l[0] == site][0][:4]


def test_packed_ptq_outliers_are_saved_as_the_checkpoint_stores_them(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=84)).eval()
    records = rtn_quantize(model, weight_spec(3, 32, outlier_fraction=0.01))
    checkpoint = packed_checkpoint({"model_args": dataclasses.asdict(model.config)}, model, records, {})
    data = save_weights.collect(checkpoint, snr_batch_size=0)
    for name, packed in checkpoint["packed_weights"].items():
        saved = data["tensors"][f"{name}.weight"]
        assert np.array_equal(saved["outlier_col"], packed["outliers"]["col"].numpy())
        assert len(saved["outlier_values"]) == records[name].outliers > 0
        np.testing.assert_allclose(save_weights.dequantize_entry(saved), unpack_weight(packed).numpy(), atol=1e-6)
    save_weights.save(data, str(tmp_path / "ptq.safetensors"))
    assert save_weights.load_quantized_data(str(tmp_path / "ptq.safetensors"))["tensors"].keys() == \
        data["tensors"].keys()


@pytest.mark.parametrize("damage, array", [
    (lambda a: a[:-1], "outlier_crow"),          # one row pointer short
    (lambda a: a + 10_000, "outlier_col"),       # columns beyond the matrix
    (lambda a: a[:-1], "outlier_values"),        # one value short
])
def test_a_sparse_part_that_does_not_fit_its_tensor_is_one_line(qat_saved, tmp_path, damage, array):
    data = save_weights.load_quantized_data(qat_saved["pkl"])
    name = f"{PLANTED[0]}.weight"
    data["tensors"][name][array] = damage(data["tensors"][name][array])
    bad = str(tmp_path / "bad.npz")
    save_weights.save(data, bad)
    with pytest.raises(ValueError, match="do not match its shape") as e:
        save_weights.load_quantized_data(bad)
    assert name in str(e.value) and "\n" not in str(e.value)
    error = run_main(visualize.main, f"--file_name={bad}", f"--image_folder={tmp_path / 'img'}")
    assert error is not None and "\n" not in error and bad in error and not os.path.exists(tmp_path / "img")


def test_outlier_map_counts_every_outlier_in_its_cell():
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, 600, 500), rng.integers(0, 1000, 500)
    grid, row_step, col_step = visualize.outlier_map(rows, cols, [600, 1000], cells=256)
    assert (row_step, col_step) == (3, 4) and grid.sum() == 500
    for r, c in [(0, 0), (100, 200), (199, 249)]:  # brute force over a few cells
        inside = (rows // 3 == r) & (cols // 4 == c)
        assert grid[r, c] == inside.sum()


def test_visualize_draws_the_outliers_and_their_channel(qat_saved, tmp_path):
    folder = tmp_path / "img"
    assert run_main(visualize.main, f"--file_name={qat_saved['safetensors']}", f"--image_folder={folder}",
                    "--weight=mlp_up", "--graph=outliers") is None
    names = ["transformer.h.0.mlp.mlp_up.weight", "transformer.h.1.mlp.mlp_up.weight"]
    assert sorted(os.listdir(folder)) == sorted([f"{n}_outliers.png" for n in names] + ["overview.png"])
    from test_visualize import assert_png
    for f in os.listdir(folder):
        assert_png(folder / f)
    tensor = save_weights.load_quantized_data(qat_saved["npz"])["tensors"][names[0]]
    _, cols = save_weights.outlier_positions(tensor)
    assert np.bincount(cols).argmax() == PLANTED[1]  # the planted channel is the busiest column
