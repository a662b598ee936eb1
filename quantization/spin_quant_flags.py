"""What the SpinQuant command lines (demos/spinquant_ptq.py, demos/spinquant_compare.py, the SpinQuant benches) share:
their flags, the checks of those flags, and the inputs they load (a full-precision, unrotated model and its
calibration windows)."""
import json
import math
import sys

import torch

from checkpoint import checkpoint_dataset
from cli import BoolFlag
from inference import load_checkpoint, resolve_device
from model import GPT, GPTConfig
from quantization.autoround.calibration import calibration_samples
from quantization.perplexity import split_tokens
from quantization.rtn import weight_spec
from quantization.spin_quant import CHOOSE_BY, FULL_BITS, SMOOTH_ALPHAS, WEIGHT_METHODS, check_plain
from safety import finite_float, table_file_or_exit, write_text_atomic


def add_spinquant_flags(p):
    """The flags of a SpinQuant run."""
    p.add_argument("--out_dir", default="out", help="folder holding the full-precision ckpt.pt")
    p.add_argument("--bits", type=int, default=4, help="weight bits (2..8, or 16: full-precision weights)")
    p.add_argument("--act_bits", type=int, default=4, help="activation bits, per token (2..8, or 16: off)")
    p.add_argument("--kv_bits", type=int, default=-1, help="K/V cache bits (2..8, 16: off; -1: --act_bits)")
    p.add_argument("--group_size", type=int, default=0, help="weight input columns per scale (0: per output channel)")
    p.add_argument("--sym", action=BoolFlag, default=False, help="symmetric weight codes (no zero point)")
    p.add_argument("--act_sym", action=BoolFlag, default=False, help="symmetric activation codes (K/V stay asymmetric)")
    p.add_argument("--method", default="gptq", choices=WEIGHT_METHODS, help="weight quantizer after the rotations")
    p.add_argument("--act_order", action=BoolFlag, default=False, help="GPTQ (--method=gptq, the compare table's "
                   "GPTQ rows): columns in order of decreasing Hessian diagonal")
    p.add_argument("--fp_target", action=BoolFlag, default=False, help="GPTQ (--method=gptq, the compare table's "
                   "GPTQ rows): each layer matches the full-precision model's outputs from the quantized model's "
                   "inputs (asymmetric calibration, GPTAQ) instead of its own outputs on those inputs")
    p.add_argument("--steps", type=int, default=100, help="Cayley SGD steps on R1/R2 (0: random Hadamard rotations)")
    p.add_argument("--lr", type=finite_float, default=1.5, help="Cayley SGD learning rate (cosine-decayed to 0)")
    p.add_argument("--from_identity", action=BoolFlag, default=True, help="also learn R1/R2 from the identity (no "
                   "rotation), a second run of --steps; both learned rotations are candidates of the held-out choice")
    p.add_argument("--smooth", action=BoolFlag, default=True, help="also score S4, a scale per channel of the GELU "
                   "output that mlp_down reads (divided online, multiplied into mlp_down), in R4's place: alone, with "
                   "R3, and with the learned rotations; and S4 with S1 and S2 (scales folded into the norms and v): "
                   "alone, with R3, and with the rotations learned from the identity")
    p.add_argument("--smooth_alpha", default=",".join(f"{a:g}" for a in SMOOTH_ALPHAS), help="S4's migration "
                   "strength, s_j = rms_j^alpha / max|W_down[:, j]|^(1 - alpha), in [0, 1]; several, comma-separated: "
                   "the one whose S4 alone scores lowest on held-out samples")
    p.add_argument("--gelu_shift", action=BoolFlag, default=True, help="also try each channel's mean taken out of "
                   "the GELU output (added back through mlp_down's bias) before S4 and before R4; kept for each where "
                   "it scores lower on held-out samples")
    p.add_argument("--learn_with_s4", action=BoolFlag, default=False, help="with --smooth and --from_identity: two "
                   "more candidates whose R1/R2 are learned with S4 (and the GELU shift) in the model, from the "
                   "identity and on from the rotations learned from it (two more runs of --steps)")
    p.add_argument("--nsamples", type=int, default=64, help="calibration samples (from the train split)")
    p.add_argument("--heldout_tokens", type=int, default=16384, help="held-out calibration tokens (other windows of "
                   "the train split, never learned on) that choose among no rotation, random Hadamard and learned "
                   "rotations; 0: a quarter of --nsamples")
    p.add_argument("--choose_by", default="ce", choices=CHOOSE_BY, help="what scores each candidate on the held-out "
                   "tokens: ce, their cross-entropy, or kl, the KL divergence of its next-token distributions from "
                   "the full-precision model's (chose worse on four GPT-2-BPE trainings: docs/spinquant.md)")
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
    if args.learn_with_s4 and not (args.smooth and args.from_identity and args.steps > 0):
        raise ValueError("learn_with_s4: needs --smooth, --from_identity and --steps above 0 (its candidates are S4's, "
                         "learned from the identity)")
    args.smooth_alphas = parse_alphas(args.smooth_alpha, "smooth_alpha")
    if args.bits != FULL_BITS:
        weight_spec(args.bits, args.group_size, args.sym)


def check_quantized_args(args):
    """check_args, and quantized weights: what a bench that compares weight quantizers needs."""
    check_args(args)
    if args.bits == FULL_BITS:
        raise ValueError(f"bits={args.bits}: needs quantized weights (2..8)")


def write_rows(args, setting, full_precision, rows):
    """A bench's rows, with its checkpoint folder, setting and full-precision loss, to --json (atomically) where
    given."""
    if getattr(args, "json", None):
        write_text_atomic(args.json, json.dumps(dict(out_dir=args.out_dir, setting=setting,
                                                     full_precision=full_precision, rows=rows), indent=1))


def parse_numbers(text, flag, accept=lambda a: 0.0 <= a <= 1.0, expected="numbers in [0, 1]"):
    """Comma-separated finite numbers that `accept` takes -> a tuple; ValueError 'flag=text: expected comma-separated
    <expected>' otherwise."""
    try:
        values = tuple(float(a) for a in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(a) and accept(a) for a in values):
        raise ValueError(f"{flag}={text}: expected comma-separated {expected}")
    return values


def parse_alphas(text, flag):
    """Comma-separated numbers in [0, 1] -> a tuple; ValueError 'flag=text: reason' otherwise."""
    return parse_numbers(text, flag)


def smooth_alpha(args):
    """SpinQuant's smooth_alpha of the flags (after check_args): None when --smooth is off."""
    return args.smooth_alphas if args.smooth else None


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


def bench_inputs(args, prog, error):
    """What a SpinQuant bench starts from, after its flags were checked: the --json file checked (one line and exit if
    it cannot be written), the device resolved, TF32 off (4-bit activations: keep the float math exact), then
    load_inputs' (model, checkpoint, seqlen, calibration, held-out) and the validation tokens. Returns
    (device, model, checkpoint, seqlen, calibration, heldout, val)."""
    if getattr(args, "json", None):
        table_file_or_exit(args.json, "--json", prog)
    device, _ = resolve_device(args.device, "float32")
    torch.backends.cuda.matmul.allow_tf32 = False
    model, checkpoint, seqlen, calibration, heldout = load_inputs(args, device, error)
    return device, model, checkpoint, seqlen, calibration, heldout, split_tokens(checkpoint["dataset"], "val")


def load_inputs(args, device, error):
    """(model, checkpoint, seqlen, calibration samples of seqlen + 1 tokens, held-out samples or None), or exit
    with the flag's error line. The held-out windows are other windows of the train split than the calibration's;
    both come from the tokens at its end that training left out, where it was run with --calib_tokens."""
    try:
        model, checkpoint = load_plain(args.out_dir, device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"{error} --out_dir={args.out_dir}: {e}")
    seqlen = args.seqlen or model.config.block_size
    if seqlen > model.config.block_size:
        sys.exit(f"{error} --seqlen={seqlen}: longer than the model's block_size {model.config.block_size}")
    try:
        train_tokens = split_tokens(checkpoint["dataset"], "train")
        calib = (checkpoint.get("config") or {}).get("calib_tokens", 0)
        if calib:  # text the model never trained on
            train_tokens = train_tokens[-calib:]
            print(f"calibration and held-out windows: the last {calib:,} tokens of the train split, which training "
                  f"left out (--calib_tokens)", flush=True)
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
