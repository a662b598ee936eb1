"""The launcher's persistent choices (quantization/kernels/ops.py): a shape timed once is not timed again in a new
process; a stored choice that is no longer a candidate, a damaged file or an unwritable one only costs the timing."""
import json
import os

import pytest
import torch

pytest.importorskip("triton")
from quantization.kernels import ops  # noqa: E402


def fake_kernel(x, qweight, scale, zero, bias, bits, blocks_per_group, zero_const, config):
    return x * config[0]


def other_kernel(x, qweight, scale, zero, bias, bits, blocks_per_group, zero_const, config):
    return x * -config[0]


@pytest.fixture
def launcher(tmp_path, monkeypatch):
    """ops.run with two fake candidates, timing replaced by a counter that picks the second; the choices file in
    tmp_path; `fresh()` forgets what this process chose, as a new process would."""
    path = tmp_path / "choices.json"
    monkeypatch.setenv("NANOQAT_KERNEL_CACHE", str(path))
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    pairs = [(fake_kernel, (2,)), (other_kernel, (3,))]
    monkeypatch.setattr(ops, "candidates", lambda m, group_size, bits=None, gluon=False, n=None: list(pairs))
    timed = []

    def fastest(args, candidates, counters=None, fused=None):
        timed.append(len(candidates) if fused is None else (len(candidates), fused))
        return candidates[1]
    monkeypatch.setattr(ops, "_fastest", fastest)

    def fresh():
        monkeypatch.setattr(ops, "_best", {})
        monkeypatch.setattr(ops, "_stored", None)
    fresh()

    def call():
        x = torch.ones(1, 32)
        return ops.run(x, torch.zeros(4, 8, dtype=torch.int32), torch.ones(1, 8), None, None, 4, 32, 32, 0.0)
    return path, pairs, timed, fresh, call


def test_a_shape_timed_once_is_reused_by_a_new_process(launcher):
    path, pairs, timed, fresh, call = launcher
    assert call()[0, 0].item() == -3 and timed == [2]  # timed, the second candidate chosen
    entries = json.loads(path.read_text())
    assert list(entries.values()) == [["other_kernel", [3]]]
    (name,) = entries
    assert name.startswith("cpu|torch ") and ops.source_digest() in name and "rows 1 n 8 k 32 bits 4" in name
    fresh()
    assert call()[0, 0].item() == -3 and timed == [2]  # read from the file, not timed again


def test_a_fused_call_is_timed_with_its_own_arguments_under_its_own_key(launcher, monkeypatch):
    """one_row_config(fused=...): the LayerNorm's or the residual's arguments (their first row, as x's) go to the
    timing, and the choice is stored under a name of its own, apart from the plain call of the shape and from the
    other fusion; NANOQAT_FUSED_TUNING=0 (FUSED_TUNING) takes the plain call's choice, timed once."""
    path, pairs, timed, fresh, call = launcher
    x, r = torch.ones(3, 32), torch.randn(3, 32)
    args = (x, torch.zeros(4, 8, dtype=torch.int32), torch.ones(1, 8), None, None, 4, 1, 0.0)
    wg = torch.ones(8)
    assert ops.one_row_config(args, 32, 32, None, dict(norm=(r, wg, 1, 1e-5))) == (3,)
    (count, fused), = timed
    assert count == 2 and torch.equal(fused["norm"][0], r[:1]) and fused["norm"][1:] == (wg, 1, 1e-5)
    ops.one_row_config(args, 32, 32, None, dict(residual=(r, wg)))
    assert torch.equal(timed[1][1]["residual"][0], r[:1]) and timed[1][1]["residual"][1] is wg
    call()
    assert timed[2] == 2  # the plain call of the shape: timed apart
    names = sorted(json.loads(path.read_text()))
    assert [n.split("float32")[-1] for n in names] == ["", " fused norm1", " fused residual"]
    fresh()
    monkeypatch.setattr(ops, "FUSED_TUNING", 0)
    assert ops.one_row_config(args, 32, 32, None, dict(norm=(r, wg, 1, 1e-5))) == (3,) and len(timed) == 3
    assert ops.fused_tag(None) is None and ops.fused_tag(dict(norm=(r, wg, 2, 1e-5))) == "norm2"


def test_a_stored_choice_that_is_no_longer_a_candidate_is_timed_again(launcher):
    path, pairs, timed, fresh, call = launcher
    call()
    entries = json.loads(path.read_text())
    path.write_text(json.dumps({name: ["other_kernel", [7]] for name in entries}))  # a config since removed
    fresh()
    assert call()[0, 0].item() == -3 and timed == [2, 2]
    assert list(json.loads(path.read_text()).values()) == [["other_kernel", [3]]]


def test_a_damaged_file_is_replaced_with_one_note(launcher, capsys):
    path, pairs, timed, fresh, call = launcher
    path.write_text("{not json")
    call()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path} is not a kernel choices file" in err
    assert list(json.loads(path.read_text()).values()) == [["other_kernel", [3]]]


def test_an_unwritable_place_keeps_the_choice_in_memory(launcher, tmp_path, monkeypatch, capsys):
    path, pairs, timed, fresh, call = launcher
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("NANOQAT_KERNEL_CACHE", str(blocker / "choices.json"))  # a folder that is a file
    assert call()[0, 0].item() == -3 and call()[0, 0].item() == -3 and timed == [2]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err and "for this process only" in err


def test_off_writes_nothing(launcher, tmp_path, monkeypatch):
    path, pairs, timed, fresh, call = launcher
    monkeypatch.setenv("NANOQAT_KERNEL_CACHE", "off")
    call()
    fresh()
    call()
    assert timed == [2, 2] and not os.listdir(tmp_path)


def test_the_residual_binary_gemv_is_timed_once_per_shape(tmp_path, monkeypatch):
    """binary_bitwise.tuned_config: the first call of a shape times CONFIGS (here a stub picks the third) and
    stores the choice; a new process reads it back; another shape is timed on its own."""
    from quantization.kernels import binary_bitwise as bb
    monkeypatch.setenv("NANOQAT_KERNEL_CACHE", str(tmp_path / "choices.json"))
    monkeypatch.setattr(bb, "can_time", lambda x: True)
    timed = []

    def fastest(x, words, scales, pairs):
        timed.append(tuple(words.shape))
        return pairs[2]
    monkeypatch.setattr(bb, "_fastest", fastest)
    monkeypatch.setattr(bb, "_best", {})
    monkeypatch.setattr(ops, "_stored", None)
    x, words, scales = torch.zeros(1, 256), torch.zeros(2, 24, 8, dtype=torch.int32), torch.ones(2, 24, 1)
    assert bb.tuned_config(x, words, scales) == bb.CONFIGS[2] and timed == [(2, 24, 8)]
    assert bb.tuned_config(x, words, scales) == bb.CONFIGS[2] and len(timed) == 1
    monkeypatch.setattr(bb, "_best", {})
    monkeypatch.setattr(ops, "_stored", None)
    assert bb.tuned_config(x, words, scales) == bb.CONFIGS[2] and len(timed) == 1  # from the file
    assert bb.tuned_config(x, torch.zeros(2, 48, 8, dtype=torch.int32), torch.ones(2, 48, 1)) == bb.CONFIGS[2]
    assert timed == [(2, 24, 8), (2, 48, 8)]
    names = list(json.loads((tmp_path / "choices.json").read_text()))
    assert len(names) == 2 and all("residual binary terms 2" in n for n in names)


def test_without_a_gpu_the_default_config_runs_untimed(monkeypatch):
    from quantization.kernels import binary_bitwise as bb
    monkeypatch.setattr(bb, "_fastest", lambda *a: pytest.fail("timed on the CPU"))
    assert bb.tuned_config(torch.zeros(1, 256), torch.zeros(1, 8, 8, dtype=torch.int32), torch.ones(1, 8, 1)) \
        == bb.CONFIGS[0]


def test_a_gluon_candidate_that_disagrees_with_the_first_is_not_timed(monkeypatch, capsys):
    """ops._fastest checks the experimental Gluon GEMM's output against the first candidate's (a Triton kernel
    checked under the interpreter) once per tuning: one that disagrees (a Triton version that miscompiles it, say)
    is left out with one line and never chosen, however fast; one that agrees is timed like the others."""
    if ops.gluon_gemm is None:
        pytest.skip("no gluon_gemm module")
    timings = {}
    monkeypatch.setattr(ops, "weight_copies", lambda args, weights=3: [tuple(args[1:1 + weights])])
    monkeypatch.setattr(ops, "graph_time", lambda args, call, config, copies, weights: timings[config])
    args = (torch.randn(20, 32), torch.zeros(4, 8, dtype=torch.int32), torch.ones(1, 8), None, None, 4, 1, 0.0)
    for factor, agrees in ((-2, False), (2 * (1 + 1e-3), True)):
        def gluon(x, qweight, scale, zero, bias, bits, blocks_per_group, zero_const, config, factor=factor,
                  counters=None):
            return x * factor  # the first candidate gives x * 2
        monkeypatch.setattr(ops.gluon_gemm, "gluon_mm", gluon)
        timings.clear()
        timings.update({(2,): 1.0, (7,): 0.1})
        assert ops._fastest(args, [(fake_kernel, (2,)), (gluon, (7,))])[0] is (gluon if agrees else fake_kernel)
        err = capsys.readouterr().err
        assert err.count("gluon_mm (7,) disagrees with fake_kernel") == (0 if agrees else 1), err


def test_a_gluon_config_out_of_shared_memory_is_skipped_quietly_and_other_errors_in_one_line(monkeypatch, capsys):
    """A Gluon config that needs more shared memory than the device has (8-bit codes at 8 stages: a property of the
    config and the format) is left out without a word, as the Triton kernels' are; any other error it raises is
    one line on stderr, and the other candidates are timed either way."""
    if ops.gluon_gemm is None:
        pytest.skip("no gluon_gemm module")
    monkeypatch.setattr(ops, "weight_copies", lambda args, weights=3: [tuple(args[1:1 + weights])])
    monkeypatch.setattr(ops, "graph_time", lambda args, call, config, copies, weights: {(2,): 1.0}[config])
    args = (torch.randn(20, 32), torch.zeros(4, 8, dtype=torch.int32), torch.ones(1, 8), None, None, 4, 1, 0.0)

    class OutOfResources(Exception):
        pass
    for error, lines in ((OutOfResources("out of resource: shared memory, Required: 233680"), 0),
                         (AssertionError("strides must be 16-byte aligned"), 1)):
        def gluon(x, qweight, scale, zero, bias, bits, blocks_per_group, zero_const, config, error=error,
                  counters=None):
            raise error
        monkeypatch.setattr(ops.gluon_gemm, "gluon_mm", gluon)
        assert ops._fastest(args, [(fake_kernel, (2,)), (gluon, (7,))]) == (fake_kernel, (2,))
        err = capsys.readouterr().err
        assert err.count("gluon_mm (7,) did not run here") == lines and err.count("\n") == lines, err


def test_agrees_compares_relative_error_and_where_values_are_not_finite():
    ref = torch.tensor([[1.0, -2.0, float("inf")], [3.0, float("nan"), 0.5]])
    close = ref * (1 + 1e-3)
    assert ops.agrees(close, ref) and ops.agrees(close.bfloat16(), ref)
    assert not ops.agrees(ref * 1.1, ref)  # 10% off
    assert not ops.agrees(torch.where(torch.isfinite(ref), ref, 0.0), ref)  # finite where the reference is not
    assert not ops.agrees(torch.full_like(ref, float("nan")), ref)
