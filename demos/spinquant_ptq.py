"""SpinQuant post-training quantization of a full-precision checkpoint: fold the norms, rotate (R1-R4), learn R1/R2
on calibration text, quantize the weights (GPTQ by default, or RTN, or AutoRound) and the activations (per token,
K/V caches at --kv_bits), save a packed checkpoint, and compare perplexity with round-to-nearest without rotation.

    python demos/spinquant_ptq.py --out_dir=out --bits=4 --act_bits=4 --steps=100 --nsamples=64
    python sample.py --out_dir=spinquant_out
    python quantization/perplexity.py --out_dir=spinquant_out
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


from checkpoint import save_checkpoint  # noqa: E402
from cli import BoolFlag, OneLineParser  # noqa: E402
from inference import resolve_device  # noqa: E402
from quantization.perplexity import evaluate, split_tokens  # noqa: E402
from quantization.rtn import rtn_quantize, weight_spec  # noqa: E402
from quantization.spin_quant import FULL_BITS, SpinQuant, unrotated  # noqa: E402
from quantization.spin_quant_flags import add_spinquant_flags, check_args, load_inputs, smooth_alpha  # noqa: E402
from safety import check_output_dir, same_file  # noqa: E402


def main(argv=None):
    p = OneLineParser(prog="spinquant_ptq.py", description="SpinQuant: learned rotations, then W/A/KV quantization.")
    add_spinquant_flags(p)
    p.add_argument("--quantized_dir", default="spinquant_out", help="where to save ckpt.pt (and ckpt_spinquant.pt)")
    p.add_argument("--overwrite", action=BoolFlag, default=False, help="replace an earlier result in --quantized_dir")
    args = p.parse_args(argv)
    error = f"{p.prog}: error:"
    device, _ = resolve_device(args.device, "float32")
    try:
        check_args(args)
    except ValueError as e:
        sys.exit(f"{error} --{e}")
    if same_file(args.quantized_dir, args.out_dir):
        sys.exit(f"{error} --quantized_dir={args.quantized_dir}: would overwrite the original checkpoint")
    # the result never replaces its source, whatever links lie between them, nor an earlier result unasked
    source = args.out_dir if os.path.isfile(args.out_dir) else os.path.join(args.out_dir, "ckpt.pt")
    try:
        check_output_dir(args.quantized_dir, ["ckpt.pt", "ckpt_spinquant.pt"], [source],
                         [os.path.dirname(os.path.abspath(source))], args.overwrite)
    except ValueError as e:
        sys.exit(f"{error} --quantized_dir={args.quantized_dir}: {e}")
    model, checkpoint, seqlen, calibration, heldout = load_inputs(args, device, error)
    try:
        sq = SpinQuant(model, bits=args.bits, act_bits=args.act_bits, kv_bits=args.kv_bits,
                       group_size=args.group_size, sym=args.sym, act_sym=args.act_sym, method=args.method,
                       seed=args.seed, device=device, smooth_alpha=smooth_alpha(args),
                       gelu_shift=args.gelu_shift, learn_with_s4=args.learn_with_s4)
    except ValueError as e:
        sys.exit(f"{error} --out_dir={args.out_dir}: {e}")
    val = split_tokens(checkpoint["dataset"], "val")

    def score(m):
        return evaluate(m, val, batch_size=args.eval_batch_size, max_tokens=args.eval_tokens, device=device,
                        progress=args.progress)

    fp = score(model)
    print(f"full precision: val loss {fp['loss']:.4f}, perplexity {fp['perplexity']:.2f}", flush=True)
    baseline = unrotated(model, args.act_bits, args.kv_bits, args.act_sym)
    if args.bits != FULL_BITS:
        rtn_quantize(baseline, weight_spec(args.bits, args.group_size, args.sym))
    rtn = score(baseline)
    print(f"no rotation (RTN): val loss {rtn['loss']:.4f}, perplexity {rtn['perplexity']:.2f}", flush=True)
    del baseline
    losses = sq.optimize(calibration, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                         progress=args.progress, heldout=heldout, from_identity=args.from_identity)
    if losses:
        print(f"Cayley SGD: calibration loss {losses[0]:.4f} -> {sum(losses[-5:]) / len(losses[-5:]):.4f} "
              f"(mean of the last 5 steps)", flush=True)
    if sq.heldout_losses:
        (_, first), best = sq.heldout_losses[0], min(sq.heldout_losses, key=lambda r: r[1])
        print(f"held-out calibration loss: random start {first:.4f}, best {best[1]:.4f} at step {best[0]} "
              f"(kept)", flush=True)
    if sq.identity_heldout_losses:
        (_, first), best = sq.identity_heldout_losses[0], min(sq.identity_heldout_losses, key=lambda r: r[1])
        print(f"learned from the identity: held-out calibration loss {first:.4f} at the start, best {best[1]:.4f} "
              f"at step {best[0]} (kept)", flush=True)
    sq.apply(nsamples=args.nsamples, seed=args.seed, progress=args.progress,
             log=lambda line: print(line, flush=True), act_order=args.act_order, fp_target=args.fp_target,
             choose_by=args.choose_by)
    q = score(sq.model)
    path = os.path.join(args.quantized_dir, "ckpt.pt")
    save_checkpoint(path, sq.checkpoint(checkpoint, dict(val_loss=q["loss"], base_val_loss=fp["loss"],
                                                         rtn_val_loss=rtn["loss"], lr=args.lr,
                                                         nsamples=args.nsamples, seqlen=seqlen)))
    alias = os.path.join(args.quantized_dir, "ckpt_spinquant.pt")  # the same file under its method's name
    if os.path.exists(alias):
        os.remove(alias)
    os.link(path, alias)
    print(f"saved {path}: W{args.bits}A{args.act_bits}KV{args.kv_bits} spinquant+{sq.method}, val loss "
          f"{q['loss']:.4f}")
    print(f"spinquant perplexity: {q['perplexity']:.2f} (no rotation {rtn['perplexity']:.2f}, "
          f"full precision {fp['perplexity']:.2f}), kept {sq.choice['name']}")
    return fp, rtn, q


if __name__ == "__main__":
    main()
