"""The SpinQuant results table of a full-precision checkpoint: validation loss and perplexity of round-to-nearest
without rotation, random Hadamard rotations + RTN (QuaRot-style, over several seeds), SpinQuant + RTN, random
Hadamard + GPTQ and SpinQuant + GPTQ, at each W/A/KV setting, plus QAT checkpoints given with --qat.

    python demos/spinquant_compare.py --out_dir=out-baby-gpt --settings=4/4/4,4/8/8,4/16/16 --seeds=3 \\
        --qat="QAT W4A4=out-qat,QAT W4A4 + rotations=out-qat-spin" --json=results.json

"gap closed" is the share of RTN-without-rotation's loss gap to full precision that a row recovers. "SpinQuant +
GPTQ, kept" is what SpinQuant.apply hands a user: the best of its candidates on held-out calibration samples (a
quarter of --nsamples, never learned on); "learned" rows are the learned rotations whatever the choice. Each
--qat row after the first is set against the first on the same validation windows: the difference and how many
standard errors of the per-window differences it is, printed under the table (and in --json).
With --study, the table is instead what learning needs (steps, lr, calibration samples, the loss it learns on).
"""
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from cli import OneLineParser  # noqa: E402
from inference import load_checkpoint  # noqa: E402
from quantization.hf import from_pretrained  # noqa: E402
from quantization.perplexity import evaluate, split_tokens  # noqa: E402
from quantization.rtn import rtn_quantize, weight_spec  # noqa: E402
from quantization.spin_quant import FULL_BITS, SpinQuant, paired_gain, split_calibration, unrotated  # noqa: E402
from quantization.spin_quant_flags import add_spinquant_flags, check_args, load_inputs  # noqa: E402
from safety import check_output_file, write_text_atomic  # noqa: E402


def parse_settings(text):
    settings = []
    for item in text.split(","):
        parts = item.split("/")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"settings={text}: expected W/A/KV bit triples like 4/4/4,4/8/8")
        settings.append(tuple(int(p) for p in parts))
    return settings


def main(argv=None):
    p = OneLineParser(prog="spinquant_compare.py", description="SpinQuant against RTN and random rotations.")
    add_spinquant_flags(p)
    p.add_argument("--settings", default="4/4/4,4/8/8,4/16/16", help="comma-separated W/A/KV bits (16: off)")
    p.add_argument("--seeds", type=int, default=3, help="random Hadamard seeds (at least 1)")
    p.add_argument("--qat", default="", help="comma-separated label=checkpoint folder of QAT runs to score too")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--study", default="", help="instead of the table: comma-separated "
                   "lr:steps:nsamples:learn_weights[:objective] (learn_weights rtn or none; objective ce, the default, "
                   "or kl) runs of SpinQuant + --method at the first setting")
    args = p.parse_args(argv)
    error = f"{p.prog}: error:"
    from inference import resolve_device
    device, _ = resolve_device(args.device, "float32")
    torch.backends.cuda.matmul.allow_tf32 = False  # activations of 4 bits: keep the float math exact
    try:
        check_args(args)
        settings = parse_settings(args.settings) if args.settings != "none" else []  # none: QAT rows only
        for w, a, kv in settings:
            for flag, bits in (("bits", w), ("act_bits", a), ("kv_bits", kv)):
                if bits != FULL_BITS and not 2 <= bits <= 8:
                    raise ValueError(f"settings={args.settings}: {flag} {bits}: expected 2..8 or {FULL_BITS}")
        if args.seeds < 1:
            raise ValueError(f"seeds={args.seeds}: must be at least 1")
        for item in filter(None, args.study.split(",")):
            fields = item.split(":")
            try:
                ok = len(fields) in (4, 5) and float(fields[0]) > 0 and int(fields[1]) >= 0 and int(fields[2]) >= 1
            except ValueError:
                ok = False
            if not ok or fields[3] not in ("rtn", "none") or fields[4:] not in ([], ["ce"], ["kl"]):
                raise ValueError(f"study={args.study}: '{item}': expected lr:steps:nsamples:rtn|none[:ce|kl]")
        qat = [item.split("=", 1) for item in args.qat.split(",") if item]
        if any(len(q) != 2 for q in qat):
            raise ValueError(f"qat={args.qat}: expected label=folder pairs")
        for label, folder in qat:
            if not os.path.exists(os.path.join(folder, "ckpt.pt")):
                raise ValueError(f"qat={args.qat}: {folder}/ckpt.pt not found")
    except ValueError as e:
        sys.exit(f"{error} --{e}")
    if args.json:  # never onto a checkpoint it reads, nor over an earlier result without --overwrite
        sources = [os.path.join(folder, "ckpt.pt") for folder in [args.out_dir] + [f for _, f in qat]]
        try:
            check_output_file(args.json, sources, args.overwrite)
        except ValueError as e:
            sys.exit(f"{error} --json={args.json}: {e}")
    base, checkpoint, seqlen, calibration, heldout = load_inputs(args, device, error)
    val = split_tokens(checkpoint["dataset"], "val")

    def score(model, windows=False):  # windows: (loss, per-window losses) to compare two models window by window
        result = evaluate(model, val, batch_size=args.eval_batch_size, max_tokens=args.eval_tokens, device=device,
                          progress=False, per_window=windows)
        return (result["loss"], result["window_losses"]) if windows else result["loss"]

    fp = score(base)
    rows = [dict(setting="-", method="full precision", loss=fp)]
    print(f"full precision: val loss {fp:.4f}", flush=True)

    def add(setting, method, loss, rtn=None, **extra):
        row = dict(setting=setting, method=method, loss=loss, **extra)
        if rtn is not None and rtn > fp:
            row["gap_closed"] = (rtn - loss) / (rtn - fp)
        rows.append(row)
        print(f"{setting} {method}: val loss {loss:.4f}" + (f", gap closed {100 * row['gap_closed']:.0f}%"
                                                            if "gap_closed" in row else ""), flush=True)
        return loss

    if args.study:
        return study(args, base, checkpoint, settings[0], score, fp, device, heldout)
    for w, a, kv in settings:
        setting = f"W{w}A{a}KV{kv}"
        common = dict(bits=w, act_bits=a, kv_bits=kv, group_size=args.group_size, sym=args.sym, act_sym=args.act_sym,
                      device=device)
        model = unrotated(base, a, kv, args.act_sym)
        if w != FULL_BITS:
            rtn_quantize(model, weight_spec(w, args.group_size, args.sym))
        rtn = add(setting, "RTN, no rotation", score(model))
        random_losses = []
        for seed in range(args.seeds):
            sq = SpinQuant(base, method="rtn", seed=seed, **common)
            sq.apply()
            random_losses.append(score(sq.model))
        spread = dict(seeds=random_losses, min=min(random_losses), max=max(random_losses))
        add(setting, f"random Hadamard + RTN, mean of {args.seeds} seeds", statistics.mean(random_losses), rtn,
            **spread)
        learn_part = calibration if heldout is not None else split_calibration(calibration)[0]
        for method in ("rtn", "gptq"):
            if method == "gptq":
                sq = SpinQuant(base, method="gptq", seed=0, **common)
                sq.apply(learn_part[:, :seqlen], nsamples=args.nsamples, progress=False)
                add(setting, "random Hadamard + GPTQ", score(sq.model), rtn)
            sq = SpinQuant(base, method=method, seed=0, **common)
            losses = sq.optimize(calibration, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                 seed=args.seed, progress=False, heldout=heldout, from_identity=args.from_identity)
            sq.apply(nsamples=args.nsamples, progress=False, select=False)
            add(setting, f"SpinQuant + {method.upper()}, learned", score(sq.model), rtn,
                calib_loss=[losses[0], losses[-1]] if losses else None, best_step=sq.info.get("best_step"),
                heldout_losses=sq.heldout_losses)
            if sq.learned_from_identity is not None:  # the second learning, from no rotation
                learned = sq.rotation_values()
                sq.set_rotations(*sq.learned_from_identity)
                sq.apply(nsamples=args.nsamples, progress=False, select=False)
                add(setting, f"SpinQuant + {method.upper()}, learned from identity", score(sq.model), rtn,
                    best_step=sq.info.get("identity_best_step"), heldout_losses=sq.identity_heldout_losses)
                sq.set_rotations(*learned)
            sq.apply(nsamples=args.nsamples, progress=False, log=lambda line: print(f"  {line}", flush=True))
            add(setting, f"SpinQuant + {method.upper()}, kept: {sq.choice['name']}", score(sq.model), rtn,
                candidates=sq.candidates)
    first_qat = None  # (label, loss, per-window losses) of the first QAT row, which the others are compared with
    for label, folder in qat:
        model = from_pretrained(folder).to(device).eval()
        choice = load_checkpoint(folder).get("spinquant_choice")  # train.py --spinquant's decision at the switch
        loss, per_window = score(model, windows=True)
        extra = {}
        if first_qat is not None:  # the same validation windows: a paired difference and its standard error
            _, z = paired_gain(first_qat[2], per_window)
            extra = dict(against=first_qat[0], difference=loss - first_qat[1], standard_errors=0.0 - z,
                         windows=len(per_window))
        add("QAT", label + (f", kept {choice}" if choice not in (None, "off") else ""), loss, **extra)
        first_qat = first_qat or (label, loss, per_window)
    cfg = (f"{args.out_dir}: {checkpoint['model_args']['n_layer']} layers, {checkpoint['model_args']['n_embd']} wide, "
           f"{checkpoint['dataset']}; weights {'symmetric' if args.sym else 'asymmetric'} "
           f"{'group ' + str(args.group_size) if args.group_size else 'per channel'}, activations per token "
           f"{'symmetric' if args.act_sym else 'asymmetric'}, K/V per token and head asymmetric; {args.steps} Cayley "
           f"steps (lr {args.lr}), {args.nsamples} x {seqlen} calibration tokens; {device}")
    print(f"\n{cfg}\n")
    print("| setting | method | val loss | perplexity | RTN gap closed | random-seed spread |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        gap = f"{100 * r['gap_closed']:.0f}%" if "gap_closed" in r else "-"
        spread = f"{r['min']:.4f} .. {r['max']:.4f}" if "min" in r else "-"
        print(f"| {r['setting']} | {r['method']} | {r['loss']:.4f} | {torch.tensor(r['loss']).exp().item():.2f} | "
              f"{gap} | {spread} |")
    paired = [f"- {r['method']} against {r['against']}: {r['difference']:+.4f} on the same {r['windows']} validation "
              f"windows ({r['standard_errors']:+.1f} standard errors of the per-window differences)"
              for r in rows if "against" in r]
    if paired:
        print("\n" + "\n".join(paired))
    if args.json:
        write_text_atomic(args.json, json.dumps({"config": cfg, "rows": rows}, indent=1))
    return rows


def study(args, base, checkpoint, setting, score, fp, device, heldout):
    """What learning needs: for each lr:steps:nsamples:learn_weights, the loss on the learning samples and on the
    held-out ones (random start, best step, last step), and on validation against the random Hadamard start, the
    folded model without rotation and the model as it came (each with the weight method)."""
    from quantization.autoround.calibration import calibration_samples
    w, a, kv = setting
    common = dict(bits=w, act_bits=a, kv_bits=kv, group_size=args.group_size, sym=args.sym, act_sym=args.act_sym,
                  device=device, method=args.method)
    seqlen = args.seqlen or base.config.block_size
    train = split_tokens(checkpoint["dataset"], "train")
    rtn_model = unrotated(base, a, kv, args.act_sym)
    rtn_quantize(rtn_model, weight_spec(w, args.group_size, args.sym))
    rtn = score(rtn_model)
    print(f"W{w}A{a}KV{kv} {args.method}: full precision {fp:.4f}, RTN no rotation {rtn:.4f}", flush=True)
    runs = [item.split(":") for item in args.study.split(",")]
    most = max(int(r[2]) for r in runs)
    if heldout is not None:  # held-out windows after every run's calibration windows (a prefix of one draw)
        windows = calibration_samples(train, most + heldout.shape[0], seqlen + 1, args.seed)
        heldout = windows[most:]
    rows, seen = [], set()
    for lr, steps, nsamples, learn, *objective in runs:
        lr, steps, nsamples, learn_weights = float(lr), int(steps), int(nsamples), learn == "rtn"
        objective = objective[0] if objective else "ce"
        calibration = calibration_samples(train, nsamples, seqlen + 1, args.seed)
        sq = SpinQuant(base, seed=0, **common)
        sq.optimize(calibration, steps=steps, lr=lr, batch_size=args.batch_size, seed=args.seed, progress=False,
                    eval_every=max(1, steps // 20), learn_weights=learn_weights, heldout=heldout, objective=objective)
        best = sq.rotation_values()
        fit_best = sq.evaluate(sq.calibration, learn_weights)
        sq.set_rotations(*sq.start)
        fit_start = sq.evaluate(sq.calibration, learn_weights)
        sq.set_rotations(*best)
        sq.apply(nsamples=nsamples, progress=False, select=False)
        row = dict(lr=lr, steps=steps, nsamples=nsamples,
                   learns_on=("A+W(RTN)" if learn_weights else "A") + (", KL" if objective == "kl" else ""),
                   fit_start=fit_start, fit_best=fit_best, held_start=sq.heldout_losses[0][1],
                   held_best=min(h for _, h in sq.heldout_losses), held_last=sq.heldout_losses[-1][1],
                   best_step=sq.info["best_step"], val_learned=score(sq.model))
        if nsamples not in seen:  # the random start and the folded model without rotation, once per sample count
            seen.add(nsamples)
            for name, kwargs in (("val_random", {}), ("val_fold_only", dict(rotations=())),
                                 ("val_no_rotation", dict(rotations=(), fold=False))):
                other = SpinQuant(base, seed=0, **kwargs, **common)
                other.calibration = sq.calibration
                other.apply(nsamples=nsamples, progress=False, select=False)
                row[name] = score(other.model)
        rows.append(row)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    print(f"\n{args.out_dir}: W{w}A{a}KV{kv}, weights by {args.method}; full precision {fp:.4f}, RTN no rotation "
          f"{rtn:.4f}; loss on the learning samples (fit: random start -> best step), on the held-out samples and "
          f"on validation (val)\n")
    print("| lr | steps | samples | learns on | fit start -> best | held-out start / best (step) / last | "
          "val learned | val random start | val folded, no rotation | val no rotation |")
    print("|---:|---:|---:|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['lr']} | {r['steps']} | {r['nsamples']} | {r['learns_on']} | {r['fit_start']:.4f} -> "
              f"{r['fit_best']:.4f} | {r['held_start']:.4f} / {r['held_best']:.4f} ({r['best_step']}) / "
              f"{r['held_last']:.4f} | {r['val_learned']:.4f} | " + (
                  f"{r['val_random']:.4f} | {r['val_fold_only']:.4f} | {r['val_no_rotation']:.4f} |"
                  if "val_random" in r else "- | - | - |"))
    if args.json:
        write_text_atomic(args.json, json.dumps({"rtn": rtn, "fp": fp, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
