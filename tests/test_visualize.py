"""visualize.py: valid PNG files for histogram, matrix and overview; the numbers behind them; bad input is one
clear line and a non-zero exit."""
import math
import os
import pickle

import matplotlib.image
import numpy as np
import pytest

from conftest import run_script
from quantization import visualize
from quantization.save_weights import load_quantized_data

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PICKED = ["transformer.h.1.attn.v.weight", "transformer.h.0.attn.act.softmax_input"]


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, path
    assert image[..., :3].std() > 0.05, f"{path} is blank"


@pytest.fixture(scope="module")
def tensors(quant_saved):
    return load_quantized_data(quant_saved["npz"])["tensors"]


def test_histogram_matrix_and_overview_are_valid_pngs(quant_saved, tmp_path):
    folder = tmp_path / "img"
    pattern = r"transformer\.h\.1\.attn\.v\.weight|transformer\.h\.0\.attn\.act\.softmax_input"  # a regex
    result = run_script("quantization/visualize.py", f"--file_name={quant_saved['safetensors']}",
                        f"--image_folder={folder}", f"--weight={pattern}", "--graph=both")
    expected = {f"{n}_{g}.png" for n in PICKED for g in ("histogram", "matrix")} | {"overview.png"}
    assert set(os.listdir(folder)) == expected, result.stdout
    for name in expected:
        assert_png(folder / name)


@pytest.mark.parametrize("pattern, expected", [
    ("all", 37),
    ("transformer.h.0.mlp.mlp_up.weight", ["transformer.h.0.mlp.mlp_up.weight"]),
    ("attn.softmax_input", ["transformer.h.0.attn.act.softmax_input", "transformer.h.1.attn.act.softmax_input"]),
    ("*.h.1.mlp.act.*put", ["transformer.h.1.mlp.act.input", "transformer.h.1.mlp.act.activation_input",
                            "transformer.h.1.mlp.act.activation_output", "transformer.h.1.mlp.act.output"]),
])
def test_weight_picks_a_name_a_site_a_glob_or_all(tensors, pattern, expected):
    picked = visualize.select(tensors, pattern)
    assert (len(picked) if isinstance(expected, int) else picked) == expected


def test_histogram_counts_each_level_as_the_codes_say(tensors):
    t = tensors["transformer.h.0.mlp.act.activation_output"]  # 3-bit affine
    counts, levels = visualize.used_levels(t)
    assert list(levels) == list(range(8))
    values, occurrences = np.unique(t["codes"], return_counts=True)
    assert dict(zip(values.tolist(), occurrences.tolist())) == {l: c for l, c in zip(levels, counts) if c}
    assert counts.sum() == t["codes"].size


def test_overview_numbers(tensors):
    summary = visualize.site_summary(tensors)
    assert len(summary) == 6 + 1 + 12  # linear sites, embedding, activation sites
    # share at the limits, counted here from the codes of both layers
    names = [f"transformer.h.{i}.attn.act.softmax_input" for i in (0, 1)]
    limits = sum(((tensors[n]["codes"] == 0) | (tensors[n]["codes"] == 255)).sum() for n in names)
    share, snr = summary[("activation", "attn.softmax_input")]
    assert share == pytest.approx(limits / sum(tensors[n]["codes"].size for n in names))
    # 8-bit per-token ranges: far better than 3-bit ones
    assert snr > summary[("activation", "mlp.activation_output")][1] + 15
    signal = sum(tensors[f"transformer.h.{i}.attn.q.weight"]["signal_sq"] for i in (0, 1))
    noise = sum(tensors[f"transformer.h.{i}.attn.q.weight"]["noise_sq"] for i in (0, 1))
    assert summary[("weight", "q")][1] == pytest.approx(10 * math.log10(signal / noise))
    assert 15 < summary[("weight", "q")][1] < 30  # 4-bit weights: about 6 dB per bit, less for Gaussian tails


def error_line(argv):
    with pytest.raises(SystemExit) as e:
        visualize.main(argv)
    message = str(e.value.code)
    assert e.value.code not in (0, None) and message.startswith("visualize.py: error:") and "\n" not in message
    return message


def test_an_unknown_tensor_is_named_and_the_known_ones_listed(quant_saved, tmp_path):
    message = error_line([f"--file_name={quant_saved['pkl']}", f"--image_folder={tmp_path}", "--weight=h.9.attn.q"])
    assert "'h.9.attn.q'" in message and "transformer.h.0.attn.q.weight" in message and "attn.softmax_input" in message
    assert not os.listdir(tmp_path)


def test_a_site_that_does_not_exist_is_named(quant_saved, tmp_path):
    message = error_line([f"--file_name={quant_saved['pkl']}", f"--image_folder={tmp_path}",
                          "--weight=attn.softmax_output"])
    assert "'attn.softmax_output'" in message


def test_a_file_not_saved_by_save_weights_is_refused(quant_ckpt, tmp_path):
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps({"codes": np.zeros(4, np.int8)}))
    message = error_line([f"--file_name={path}", f"--image_folder={tmp_path}"])
    assert str(path) in message and "not a file saved by save_weights.py" in message
    message = error_line([f"--file_name={os.path.join(quant_ckpt, 'ckpt.pt')}", f"--image_folder={tmp_path}"])
    assert "ckpt.pt" in message


def test_bits_outside_2_to_8_are_refused(quant_saved, tmp_path):
    data = load_quantized_data(quant_saved["pkl"])
    data["tensors"]["transformer.h.1.mlp.act.output"]["bits"] = 1
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(data, protocol=4))
    message = error_line([f"--file_name={path}", f"--image_folder={tmp_path}"])
    assert "transformer.h.1.mlp.act.output" in message and "bits=1" in message


def test_an_unknown_graph_is_refused(quant_saved, tmp_path):
    message = error_line([f"--file_name={quant_saved['pkl']}", "--graph=pie"])
    assert "pie" in message
