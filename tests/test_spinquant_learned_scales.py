"""bench/spinquant_learned_scales.py: S1, S2 and S4 scales learned by Adam (log-offsets on the closed-form ones)."""
import pytest
import torch

from conftest import _random_model, _rel, load_script, run_main
from quantization.spin_quant import SpinQuant, gelu_output_scales


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/spinquant_learned_scales.py")


def _smoothed(model, data, bits=16, act_bits=16):
    sq = SpinQuant(model, bits=bits, act_bits=act_bits, kv_bits=act_bits, rotations=(), fold=False, smooth_norms=0.5,
                   smooth=gelu_output_scales(model, data, 0.5), dtype=torch.float64, method="rtn")
    sq.apply(data, progress=False, select=False)
    return sq


def test_offsets_fold_without_changing_the_float64_function(bench):
    """Any log-offsets of S1, S2 and S4 are folded so that the float64 model (quantizers off) computes what the plain
    one does, and zero offsets give SpinQuant's own state."""
    model = _random_model()
    x = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(1))
    reference = model(x, x)[0]
    data = torch.randint(0, 40, (4, 17), generator=torch.Generator().manual_seed(2))
    sq = _smoothed(model, data)
    g = torch.Generator().manual_seed(3)
    s4 = [torch.randn(t.shape[0], generator=g, dtype=torch.float64) for t in sq.smooth]
    norms = {k: torch.randn(s.shape[0], generator=g, dtype=torch.float64) for k, s in sq.norm_scales.items()}
    state = bench.scaled_state(sq, s4, norms, quantize_weights=False)
    assert _rel(torch.func.functional_call(sq.model, state, (x, x))[0], reference) < 1e-6
    assert not torch.allclose(state["transformer.h.0.ln_1.weight"], sq.rotated_state()["transformer.h.0.ln_1.weight"])
    zero = bench.scaled_state(sq, [torch.zeros_like(t) for t in s4], {k: torch.zeros_like(v) for k, v in norms.items()},
                              quantize_weights=False)
    own = sq.rotated_state()
    assert all(torch.allclose(zero[k], own[k], rtol=1e-12, atol=0) for k in own)


def test_learning_keeps_the_best_held_out_step_and_the_model_holds_it(tiny_trained, bench):
    """learn: the kept step's held-out loss is what sq.model scores on the held-out samples afterwards, and no higher
    than step 0's (the closed-form scales)."""
    from conftest import _calibration
    model, tokens = tiny_trained
    data = torch.cat(_calibration(tokens, n=8))
    calibration, heldout = data[:6], data[6:]
    sq = SpinQuant(model, bits=4, act_bits=4, kv_bits=4, rotations=(), fold=False, smooth_norms=0.5,
                   smooth=gelu_output_scales(model, calibration, 0.5), method="rtn")
    sq.apply(calibration, progress=False, select=False)
    start = sq.evaluate(heldout, model=bench._loaded(
        sq, bench.scaled_state(sq, [torch.zeros(t.shape[0]) for t in sq.smooth],
                               {k: torch.zeros(s.shape[0]) for k, s in sq.norm_scales.items()})))
    step, held = bench.learn(sq, calibration, heldout, steps=4, lr=0.05, batch_size=2, eval_every=1)
    assert 0 <= step <= 4 and held <= start + 1e-9
    assert sq.evaluate(heldout, model=sq.model) == pytest.approx(held, abs=1e-6)


def test_bench_rows_and_bad_flags(plain_dir, capsys, bench):
    """The bench's rows (none, closed form, one per learning rate) and its table; bad flags one line each."""
    rows = bench.main([f"--out_dir={plain_dir}", "--device=cpu", "--eval_tokens=1000", "--nsamples=4",
                       "--heldout_tokens=256", "--steps=2", "--scale_lrs=0.01", "--progress=False"])
    assert [(r["scales"], r["lr"]) for r in rows] == [("none", None), ("closed form", None), ("learned", 0.01)]
    assert all("gap_closed" in r for r in rows[1:])
    assert "| S1+S2+S4 scales | Adam lr | kept step | val loss | RTN gap closed |" in capsys.readouterr().out
    for flag in ("--scale_lrs=0.01,x", "--scale_lrs=0", "--scale_lrs=-1", "--bits=16", "--heldout_tokens=0",
                 "--batch_size=0"):
        error = run_main(bench.main, f"--out_dir={plain_dir}", "--device=cpu", flag)
        assert error.startswith(f"spinquant_learned_scales.py: error: {flag}") and "\n" not in error, error
