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
With --sites, it is where the first setting's gap sits: each quantized site (the weights, each activation site, the
K and V caches) left in full precision while the others stay quantized, and quantized alone, without rotation, with
the norms folded alone, with the fixed Hadamards R4 and R3+R4 alone and with random Hadamard rotations R1, R1+R2,
R1+R2+R3 and all four (RTN weights), and the costliest activation site
quantized alone block by block (and, for the attention's input, on q, k or v's input alone).
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
from quantization.quantizers import fake_quant  # noqa: E402
from quantization.rtn import rtn_quantize, weight_spec  # noqa: E402
from quantization.spin_quant import FULL_BITS, SpinQuant, gelu_output_scales, paired_gain  # noqa: E402
from quantization.spin_quant import CLEAR_Z, NORM_SMOOTH_ALPHA, split_calibration, unrotated  # noqa: E402
from quantization.spin_quant_flags import add_spinquant_flags, check_args, load_inputs, smooth_alpha  # noqa: E402
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
    p.add_argument("--methods", default="rtn,gptq", help="comma-separated weight methods of the SpinQuant rows, rtn "
                   "and/or gptq (one per run splits a long table in two)")
    p.add_argument("--qat", default="", help="comma-separated label=checkpoint folder of QAT runs to score too")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--study", default="", help="instead of the table: comma-separated "
                   "lr:steps:nsamples:learn_weights[:objective] (learn_weights rtn or none; objective ce, the default, "
                   "or kl) runs of SpinQuant + --method at the first setting")
    p.add_argument("--score_candidates", action="store_true", help="also score every candidate of the kept rows on "
                   "the validation tokens and list them (a study of the held-out choice, which never sees them)")
    p.add_argument("--sites", action="store_true", help="instead of the table: the first setting's gap site by site "
                   "(each site left in full precision, and quantized alone), without rotation, with the norms "
                   "folded, with S4 (--smooth), and with Hadamard rotations")
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
        methods = args.methods.split(",")
        if not methods or not set(methods) <= {"rtn", "gptq"} or len(set(methods)) != len(methods):
            raise ValueError(f"methods={args.methods}: expected rtn, gptq or rtn,gptq")
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

    if args.sites:
        if not settings:
            sys.exit(f"{error} --sites needs a W/A/KV setting in --settings")
        return site_gaps(args, base, settings[0], score, fp, device, calibration)
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
        gptq_options = dict(act_order=args.act_order, fp_target=args.fp_target)  # RTN ignores them
        for method in ("rtn", "gptq"):
            if method not in methods:
                continue
            if method == "gptq":
                sq = SpinQuant(base, method="gptq", seed=0, **common)
                sq.apply(learn_part[:, :seqlen], nsamples=args.nsamples, progress=False, **gptq_options)
                add(setting, "random Hadamard + GPTQ", score(sq.model), rtn)
            sq = SpinQuant(base, method=method, seed=0, smooth_alpha=smooth_alpha(args), gelu_shift=args.gelu_shift,
                           learn_with_s4=args.learn_with_s4, **common)
            losses = sq.optimize(calibration, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                 seed=args.seed, progress=False, heldout=heldout, from_identity=args.from_identity)
            if args.smooth:  # S4 alone, its alpha (and the shift) chosen as the choice below will choose them
                scales, alpha, shift = sq.smooth_scales(log=lambda line: print(f"  {line}", flush=True))
                s4 = SpinQuant(base, method=method, seed=0, rotations=(), fold=False, smooth=scales, shift=shift,
                               **common)
                s4.apply(sq.calibration[:, :seqlen], nsamples=args.nsamples, progress=False, select=False,
                         **gptq_options)
                shifted = ", shifted" if shift is not None else ""
                add(setting, f"S4 (GELU output scale, alpha {alpha:g}{shifted}) + {method.upper()}, no rotation",
                    score(s4.model), rtn)
                s12 = SpinQuant(base, method=method, seed=0, rotations=(), fold=False, smooth=scales, shift=shift,
                                smooth_norms=NORM_SMOOTH_ALPHA, **common)
                s12.apply(sq.calibration[:, :seqlen], nsamples=args.nsamples, progress=False, select=False,
                          **gptq_options)
                add(setting, f"S1+S2+S4 (norm, v and GELU output scales{shifted}) + {method.upper()}, no rotation",
                    score(s12.model), rtn)
            sq.apply(nsamples=args.nsamples, progress=False, select=False, **gptq_options)
            add(setting, f"SpinQuant + {method.upper()}, learned", score(sq.model), rtn,
                calib_loss=[losses[0], losses[-1]] if losses else None, best_step=sq.info.get("best_step"),
                heldout_losses=sq.heldout_losses)
            if sq.learned_from_identity is not None:  # the second learning, from no rotation
                learned = sq.rotation_values()
                sq.set_rotations(*sq.learned_from_identity)
                sq.apply(nsamples=args.nsamples, progress=False, select=False, **gptq_options)
                add(setting, f"SpinQuant + {method.upper()}, learned from identity", score(sq.model), rtn,
                    best_step=sq.info.get("identity_best_step"), heldout_losses=sq.identity_heldout_losses)
                sq.set_rotations(*learned)
            sq.apply(nsamples=args.nsamples, progress=False, log=lambda line: print(f"  {line}", flush=True),
                     report=score if args.score_candidates else None, choose_by=args.choose_by, **gptq_options)
            add(setting, f"SpinQuant + {method.upper()}, kept: {sq.choice['name']}", score(sq.model), rtn,
                candidates=sq.candidates, choose_by=args.choose_by, kept_by=sq.choice["by"], bar=sq.choice["bar"])
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
           f"steps (lr {args.lr}), {args.nsamples} x {seqlen} calibration tokens"
           f"{'; GPTQ with act_order' if args.act_order else ''}"
           f"{'; GPTQ to the full-precision outputs (--fp_target)' if args.fp_target else ''}; {device}")
    print(f"\n{cfg}\n")
    print("| setting | method | val loss | perplexity | RTN gap closed | random-seed spread |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        gap = f"{100 * r['gap_closed']:.0f}%" if "gap_closed" in r else "-"
        spread = f"{r['min']:.4f} .. {r['max']:.4f}" if "min" in r else "-"
        print(f"| {r['setting']} | {r['method']} | {r['loss']:.4f} | {torch.tensor(r['loss']).exp().item():.2f} | "
              f"{gap} | {spread} |")
    for r in rows:  # --score_candidates: each candidate on held-out text (its choice) and on validation (not)
        if not any("report" in c for c in r.get("candidates", [])):
            continue
        rtn = next(x["loss"] for x in rows if x["setting"] == r["setting"] and x["method"] == "RTN, no rotation")
        print(f"\n{r['setting']}, {r['method']}: every candidate (eligible: no rotation, or "
              f"{r.get('bar', CLEAR_Z):.2f} standard errors below it on held-out text; the lowest eligible is kept; "
              f"gap closed on validation)\n")
        val = [c["report"] for c in r["candidates"]]
        for key, what in (("heldout_loss", "losses"), ("heldout_kl", "KL divergences from full precision")):
            if all(key in c for c in r["candidates"]):
                print(f"Spearman rank correlation of held-out {what} and validation losses: "
                      f"{rank_correlation([c[key] for c in r['candidates']], val):.2f}")
        by, report = r["choose_by"], {c["name"]: c["report"] for c in r["candidates"]}
        gap = {name: f", {100 * (rtn - v) / (rtn - fp):.0f}% of the gap" if rtn > fp else ""
               for name, v in report.items()}
        print(f"\nChosen by {by}; kept by each score: "
              + "; ".join(f"{c}: {name}{gap[name]}" for c, name in r["kept_by"].items()) + "\n")
        print(f"| candidate | held-out loss | held-out KL | gain over no rotation ({by}) | standard errors | "
              "eligible | val loss | RTN gap closed |\n|---|---:|---:|---:|---:|---|---:|---:|")
        for c in r["candidates"]:
            gain = f"{c['gain']:+.4f} | {c['standard_errors']:.1f}" if "gain" in c else "- | -"
            closed = f"{100 * (rtn - c['report']) / (rtn - fp):.0f}%" if rtn > fp else "-"
            kl = f"{c['heldout_kl']:.4f}" if "heldout_kl" in c else "-"
            print(f"| {c['name']} | {c['heldout_loss']:.4f} | {kl} | {gain} | {'yes' if c['clear'] else 'no'} | "
                  f"{c['report']:.4f} | {closed} |")
    paired = [f"- {r['method']} against {r['against']}: {r['difference']:+.4f} on the same {r['windows']} validation "
              f"windows ({r['standard_errors']:+.1f} standard errors of the per-window differences)"
              for r in rows if "against" in r]
    if paired:
        print("\n" + "\n".join(paired))
    if args.json:
        write_text_atomic(args.json, json.dumps({"config": cfg, "rows": rows}, indent=1))
    return rows


def rank_correlation(a, b):
    """Spearman's rank correlation of two lists (ties broken by order): Pearson's on their ranks."""
    ranks = [torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (a, b)]
    x, y = (r - r.mean() for r in ranks)
    return float((x * y).sum() / (x.norm() * y.norm()))


# (label, rotations, norms folded, S4): no rotation, the folded norms alone, the fixed Hadamards without R1, S4 alone
# (with --smooth), then R1 on
ROTATION_SETS = (("no rotation", (), False, False), ("folded", (), True, False), ("R4", ("R4",), True, False),
                 ("R3+R4", ("R3", "R4"), True, False), ("S4", (), False, True), ("R1", ("R1",), True, False),
                 ("R1+R2", ("R1", "R2"), True, False), ("R1+R2+R3", ("R1", "R2", "R3"), True, False),
                 ("R1+R2+R3+R4", ("R1", "R2", "R3", "R4"), True, False))
READERS = {"input": ("q", "k", "v")}  # the linears that read an attention activation site (one quantizer for three)


def site_gaps(args, base, setting, score, fp, device, calibration):
    """Where the setting's loss gap sits: for each rotation set (none; the folded norms alone; the fixed Hadamards
    R4 and R3+R4; S4 alone, its scales from the calibration samples; random Hadamard R1, R1+R2, ...; seed 0, RTN
    weights), the loss with every site quantized, with each site left in full precision (how much of the gap
    it carries), with each site quantized alone, and with none (the rotated model itself, which should be the full
    precision loss). A site is the weights of every linear, or one activation site in every block; the activation site
    that costs most alone without rotation is also quantized alone block by block, and where it feeds q, k and v,
    its quantizer is put on the input of one of them at a time in the costliest block."""
    from quantization.layers import ActQuant
    w, a, kv = setting
    if w == FULL_BITS:
        sys.exit("spinquant_compare.py: error: --sites needs quantized weights (W below 16 in --settings)")
    common = dict(act_bits=a, kv_bits=kv, group_size=args.group_size, sym=args.sym, act_sym=args.act_sym,
                  device=device, method="rtn", seed=0)
    rows, top, worst = [], None, None
    for label, names, fold, smooth in ROTATION_SETS:
        if smooth and not args.smooth:
            continue
        kwargs = dict(rotations=names, fold=fold)
        if smooth:
            kwargs["smooth"] = gelu_output_scales(base, calibration, args.smooth_alphas[0])
        models = {}
        for bits in (w, FULL_BITS):  # quantized and full-precision weights, the same rotations
            sq = SpinQuant(base, bits=bits, **common, **kwargs)
            sq.apply(progress=False, select=False)
            models[bits] = sq.model.eval()
        acts = {}  # activation site -> its quantizers in every block (each model its own)
        for bits, model in models.items():
            for name, module in model.named_modules():
                if isinstance(module, ActQuant) and module.spec is not None:
                    kind, site = name.split(".")[-3], name.split(".")[-1]  # ...h.<i>.<attn|mlp>.act.<site>
                    acts.setdefault(f"{kind}_{site}", {}).setdefault(bits, []).append(module)

        def switch(bits, keep):  # the activation quantizers of models[bits] on for the sites in keep, off elsewhere
            for site, per_model in acts.items():
                for module in per_model.get(bits, []):
                    module.enabled = site in keep

        def only(bits, keep):
            switch(bits, keep)
            return score(models[bits])

        every = only(w, set(acts))
        row = dict(rotations=label, all=every, none=only(FULL_BITS, set()),
                   without={"weights": only(FULL_BITS, set(acts))}, alone={"weights": only(w, set())})
        for site in acts:
            row["without"][site] = only(w, set(acts) - {site})
            row["alone"][site] = only(FULL_BITS, {site})
        # the activation site that costs most alone without rotation, block by block (each block's quantizer alone)
        top = top or max(acts, key=lambda site: row["alone"][site])
        row["blocks"] = []
        for module in acts[top][FULL_BITS]:
            switch(FULL_BITS, set())
            module.enabled = True
            row["blocks"].append(score(models[FULL_BITS]))
        switch(FULL_BITS, set())
        # in the costliest block (without rotation), the site's quantizer on the input of one reader at a time
        worst = worst if worst is not None else max(range(len(row["blocks"])), key=row["blocks"].__getitem__)
        row.update(top_site=top, top_block=worst, readers={})
        spec = acts[top][FULL_BITS][worst].spec
        kind, site = top.split("_", 1)
        for reader in READERS.get(site, ()) if kind == "attn" else ():
            layer = getattr(models[FULL_BITS].transformer.h[worst].attn, reader)
            hook = layer.register_forward_pre_hook(lambda module, inputs: (fake_quant(inputs[0], spec),))
            row["readers"][reader] = score(models[FULL_BITS])
            hook.remove()
        rows.append(row)
        print(f"{label}: all {every:.4f}, none {row['none']:.4f}; without / alone: " + ", ".join(
            f"{site} {row['without'][site]:.4f} / {row['alone'][site]:.4f}" for site in row["without"]), flush=True)
    sites = list(rows[0]["without"])
    print(f"\n{args.out_dir}: W{w}A{a}KV{kv}, RTN weights "
          f"({'symmetric' if args.sym else 'asymmetric'}, {'group ' + str(args.group_size) if args.group_size else 'per channel'}), "
          f"activations per token {'symmetric' if args.act_sym else 'asymmetric'}; full precision {fp:.4f}. "
          "Per rotation set: the loss with every site quantized (its gap to full precision in brackets), then per "
          "site the loss with that site in full precision and the others quantized (in brackets: the share of "
          "the gap it carries), and with that site quantized alone (in brackets: its gap)\n")
    print("| site | " + " | ".join(r["rotations"] for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    print("| every site | " + " | ".join(f"{r['all']:.4f} ({r['all'] - fp:+.4f})" for r in rows) + " |")
    print("| none (rotation only) | " + " | ".join(f"{r['none']:.4f} ({r['none'] - fp:+.4f})" for r in rows) + " |")
    for site in sites:
        print(f"| {site} in full precision | " + " | ".join(
            f"{r['without'][site]:.4f} ({100 * (r['all'] - r['without'][site]) / (r['all'] - fp):.0f}%)"
            if r["all"] > fp else f"{r['without'][site]:.4f}" for r in rows) + " |")
    for site in sites:
        print(f"| {site} alone | " + " | ".join(f"{r['alone'][site]:.4f} ({r['alone'][site] - fp:+.4f})"
                                               for r in rows) + " |")
    for i in range(len(rows[0]["blocks"])):
        print(f"| {top} alone, block {i} only | " + " | ".join(f"{r['blocks'][i]:.4f} ({r['blocks'][i] - fp:+.4f})"
                                                              for r in rows) + " |")
    for reader in rows[0]["readers"]:
        print(f"| {top}, block {worst}: the input of {reader} alone | " + " | ".join(
            f"{r['readers'][reader]:.4f} ({r['readers'][reader] - fp:+.4f})" for r in rows) + " |")
    if args.json:
        write_text_atomic(args.json, json.dumps({"fp": fp, "setting": list(setting), "top_site": top,
                                                 "top_block": worst, "rows": rows}, indent=1))
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
