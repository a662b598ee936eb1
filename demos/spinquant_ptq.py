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


from checkpoint import checkpoint_dataset, save_checkpoint  # noqa: E402
from inference import load_checkpoint  # noqa: E402
from cli import BoolFlag, OneLineParser  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from quantization.autoround.calibration import calibration_samples  # noqa: E402
from quantization.perplexity import evaluate, split_tokens  # noqa: E402
from quantization.rtn import rtn_quantize, weight_spec  # noqa: E402
from quantization.spin_quant import FULL_BITS, WEIGHT_METHODS, SpinQuant, check_plain, unrotated  # noqa: E402
from safety import check_output_dir, finite_float, same_file  # noqa: E402


def add_spinquant_flags(p):
    p.add_argument("--out_dir", default="out", help="folder holding the full-precision ckpt.pt")
    p.add_argument("--bits", type=int, default=4, help="weight bits (2..8, or 16: full-precision weights)")
    p.add_argument("--act_bits", type=int, default=4, help="activation bits, per token (2..8, or 16: off)")
    p.add_argument("--kv_bits", type=int, default=-1, help="K/V cache bits (2..8, 16: off; -1: --act_bits)")
    p.add_argument("--group_size", type=int, default=0, help="weight input columns per scale (0: per output channel)")
    p.add_argument("--sym", action=BoolFlag, default=False, help="symmetric weight codes (no zero point)")
    p.add_argument("--act_sym", action=BoolFlag, default=False, help="symmetric activation codes (K/V stay asymmetric)")
    p.add_argument("--method", default="gptq", choices=WEIGHT_METHODS, help="weight quantizer after the rotations")
    p.add_argument("--steps", type=int, default=100, help="Cayley SGD steps on R1/R2 (0: random Hadamard rotations)")
    p.add_argument("--lr", type=finite_float, default=1.5, help="Cayley SGD learning rate (cosine-decayed to 0)")
    p.add_argument("--nsamples", type=int, default=64, help="calibration samples (from the train split)")
    p.add_argument("--heldout_tokens", type=int, default=16384, help="held-out calibration tokens (other windows of "
                   "the train split, never learned on) that choose among no rotation, random Hadamard and learned "
                   "rotations; 0: a quarter of --nsamples")
    p.add_argument("--seqlen", type=int, default=0, help="tokens per calibration sample (0: the model's block_size)")
    p.add_argument("--batch_size", type=int, default=8, help="calibration samples per Cayley step")
    p.add_argument("--eval_tokens", type=int, default=0, help="score only this many validation tokens (0: all)")
    p.add_argument("--eval_batch_size", type=int, default=16, help="windows per forward pass when scoring")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the random Hadamard start and the calibration draw")
    p.add_argument("--progress", action=BoolFlag, default=True, help="progress bars")
    return p


def check_args(args):
    """ValueError 'flag=value: reason' for a bad flag."""
    if args.kv_bits == -1:
        args.kv_bits = args.act_bits
    for flag in ("bits", "act_bits", "kv_bits"):
        bits = getattr(args, flag)
        if bits != FULL_BITS and not 2 <= bits <= 8:
            raise ValueError(f"{flag}={bits}: expected 2..8, or {FULL_BITS} for full precision")
    for flag in ("steps", "group_size", "seqlen", "eval_tokens", "heldout_tokens"):
        if getattr(args, flag) < 0:
            raise ValueError(f"{flag}={getattr(args, flag)}: must be 0 or more")
    for flag in ("nsamples", "batch_size", "eval_batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"{flag}={getattr(args, flag)}: must be at least 1")
    if args.nsamples < 2:
        raise ValueError(f"nsamples={args.nsamples}: must be at least 2 (too few calibration tokens to learn on)")
    if not args.lr > 0:
        raise ValueError(f"lr={args.lr}: must be positive")
    if args.bits != FULL_BITS:
        weight_spec(args.bits, args.group_size, args.sym)


def load_plain(out_dir, device):
    """(model, checkpoint) of a full-precision, unrotated checkpoint; ValueError naming what it is otherwise."""
    checkpoint = load_checkpoint(out_dir, device)
    if "packed_weights" in checkpoint:
        raise ValueError(f"{out_dir} is already quantized ({checkpoint.get('ptq', {}).get('method', 'ptq')})")
    check_plain(checkpoint["model_args"], out_dir)
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    checkpoint["dataset"] = checkpoint_dataset(checkpoint)
    return model.to(device).eval(), checkpoint


def load_inputs(args, device, error):
    """(model, checkpoint, seqlen, calibration samples of seqlen + 1 tokens, held-out samples or None), or exit
    with the flag's error line. The held-out windows are other windows of the train split than the calibration's."""
    try:
        model, checkpoint = load_plain(args.out_dir, device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"{error} --out_dir={args.out_dir}: {e}")
    seqlen = args.seqlen or model.config.block_size
    if seqlen > model.config.block_size:
        sys.exit(f"{error} --seqlen={seqlen}: longer than the model's block_size {model.config.block_size}")
    try:
        train_tokens = split_tokens(checkpoint["dataset"], "train")
        calibration = calibration_samples(train_tokens, args.nsamples, seqlen + 1, args.seed)
    except (OSError, ValueError) as e:
        sys.exit(f"{error} --nsamples={args.nsamples}: {e}")
    if not args.heldout_tokens:
        return model, checkpoint, seqlen, calibration, None
    extra = -(-args.heldout_tokens // (seqlen + 1))
    try:  # the same random windows as above, then `extra` more
        windows = calibration_samples(train_tokens, args.nsamples + extra, seqlen + 1, args.seed)
    except ValueError as e:
        sys.exit(f"{error} --heldout_tokens={args.heldout_tokens}: {e}")
    return model, checkpoint, seqlen, windows[:args.nsamples], windows[args.nsamples:]


def main(argv=None):
    p = OneLineParser(prog="spinquant_ptq.py", description="SpinQuant: learned rotations, then W/A/KV quantization.")
    add_spinquant_flags(p)
    p.add_argument("--quantized_dir", default="spinquant_out", help="where to save ckpt.pt (and ckpt_spinquant.pt)")
    p.add_argument("--overwrite", action=BoolFlag, default=False, help="replace an earlier result in --quantized_dir")
    args = p.parse_args(argv)
    error = f"{p.prog}: error:"
    from inference import resolve_device
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
                       seed=args.seed, device=device)
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
                         progress=args.progress, heldout=heldout)
    if losses:
        print(f"Cayley SGD: calibration loss {losses[0]:.4f} -> {sum(losses[-5:]) / len(losses[-5:]):.4f} "
              f"(mean of the last 5 steps)", flush=True)
    if sq.heldout_losses:
        (_, first), best = sq.heldout_losses[0], min(sq.heldout_losses, key=lambda r: r[1])
        print(f"held-out calibration loss: random start {first:.4f}, best {best[1]:.4f} at step {best[0]} "
              f"(kept)", flush=True)
    sq.apply(nsamples=args.nsamples, seed=args.seed, progress=args.progress,
             log=lambda line: print(line, flush=True))
    q = score(sq.model)
    path = os.path.join(args.quantized_dir, "ckpt.pt")
    save_checkpoint(path, sq.checkpoint(checkpoint, dict(val_loss=q["loss"], base_val_loss=fp["loss"],
                                                         rtn_val_loss=rtn["loss"], lr=args.lr,
                                                         nsamples=args.nsamples, seqlen=seqlen)))
    alias = os.path.join(args.quantized_dir, "ckpt_spinquant.pt")  # the same file under its method's name
    if os.path.exists(alias):
        os.remove(alias)
    os.link(path, alias)
    print(f"saved {path}: W{args.bits}A{args.act_bits}KV{args.kv_bits} spinquant+{args.method}, val loss "
          f"{q['loss']:.4f}")
    print(f"spinquant perplexity: {q['perplexity']:.2f} (no rotation {rtn['perplexity']:.2f}, "
          f"full precision {fp['perplexity']:.2f}), kept {sq.choice['name']}")
    return fp, rtn, q


if __name__ == "__main__":
    main()
