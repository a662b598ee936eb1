"""Post-training weight quantization behind one call, in the manner of gpt-fast's quantize handlers:

    quantizer = make_quantizer("gptq", model, calibration_tokens, PTQConfig(bits=4, group_size=128))
    records = quantizer.quantize()        # {module name: QuantizedWeight}; the model now holds the quantized weights

METHODS maps a name to a factory `(model, calibration, config) -> object with quantize()`; the factory checks its
options and the model at once (ValueError naming the option), quantize() does the work. A method that only
reshapes the weights for the next one (AWQ's scales) is named before it: "awq+gptq"; alone it is followed by
round to nearest. A new method is one file with its factory, plus one line in METHODS (docs/architecture.md).
The demos, ptq_compare.py and SpinQuant all quantize through here.
"""
import dataclasses
import math
import os

from checkpoint import checkpoint_dataset
from inference import load_checkpoint
from cli import BoolFlag
from model import GPT, GPTConfig
from quantization.autoround import AutoRound
from quantization.autoround.calibration import prepare_samples
from quantization.awq import AWQ
from quantization.channel_stats import sensitivity_scales
from quantization.gptq import GPTQ
from quantization.packing import is_packed
from quantization.perplexity import split_tokens, text_tokens
from quantization.quantizers import MAX_OUTLIER_FRACTION
from quantization.rtn import SITES, check_layers, rtn_quantize, target_layers, weight_spec
from safety import check_device, finite_float
from tokenizer import Tokenizer, load_meta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class PTQConfig:
    bits: int = 4
    group_size: int = 32  # input columns per scale (0: one per output channel)
    sym: bool = False
    sites: tuple = SITES
    nsamples: int = 128  # calibration samples
    seqlen: int = 0  # tokens per calibration sample (0: the model's block_size)
    batch_size: int = 8
    device: str = None  # None: where the model is
    seed: int = 0
    progress: bool = True
    outlier_fraction: float = 0.0
    outlier_criterion: str = "magnitude"  # or "sensitivity": |w| times the input channel's activation RMS
    iters: int = 200  # AutoRound
    lr: float = 0.0  # AutoRound (0: 1/iters)
    damp_percent: float = 0.01  # GPTQ
    act_order: bool = False  # GPTQ
    true_sequential: bool = True  # GPTQ
    fp_target: bool = False  # GPTQ: asymmetric calibration (the full-precision outputs as the target)
    awq_grid: int = 20  # AWQ
    log: object = None  # where the methods' per-block lines go (None: tqdm.write)

    @classmethod
    def from_args(cls, args, **overrides):
        """The config of a script's parsed flags (those it has; `sites` as a comma-separated string)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        if isinstance(values.get("sites"), str):
            values["sites"] = tuple(s for s in values["sites"].split(",") if s)
        return cls(**{**values, **overrides})

    @property
    def spec(self):
        return weight_spec(self.bits, self.group_size, self.sym, self.outlier_fraction)

    def calibration_options(self):
        options = dict(nsamples=self.nsamples, seqlen=self.seqlen or None, batch_size=self.batch_size,
                       device=self.device, seed=self.seed, progress=self.progress)
        return options if self.log is None else {**options, "log": self.log}


class RTN:
    """Round to nearest: no calibration."""
    block_losses = ()

    def __init__(self, model, calibration, config):
        self.model, self.config, self.act_scales = model, config, None
        check_layers(target_layers(model, config.sites), config.spec)

    def quantize(self):
        return rtn_quantize(self.model, self.config.spec, self.config.sites, self.act_scales)


def gptq(model, calibration, config):
    return GPTQ(model, calibration, bits=config.bits, group_size=config.group_size, sym=config.sym,
                damp_percent=config.damp_percent, act_order=config.act_order, true_sequential=config.true_sequential,
                fp_target=config.fp_target, outlier_fraction=config.outlier_fraction, sites=config.sites,
                **config.calibration_options())


def autoround(model, calibration, config):
    return AutoRound(model, calibration, bits=config.bits, group_size=config.group_size, sym=config.sym,
                     iters=config.iters, lr=config.lr or None, outlier_fraction=config.outlier_fraction,
                     sites=config.sites, **config.calibration_options())


def awq(model, calibration, config):
    """AWQ's scales searched for round to nearest and folded into the model: a step before a method."""
    opts = config.calibration_options()
    return AWQ(model, calibration, config.spec, grid=config.awq_grid, **opts)


METHODS = {"rtn": RTN, "gptq": gptq, "autoround": autoround, "awq": awq}
PRE_STEPS = ("awq",)  # methods that fold into the weights and leave the quantizing to the method after them


def method_names():
    """Every name make_quantizer takes: the methods, and each pre-step before each other method."""
    plain = [m for m in METHODS if m not in PRE_STEPS]
    return plain + list(PRE_STEPS) + [f"{p}+{m}" for p in PRE_STEPS for m in plain if m != "rtn"]


def check_method(name):
    """The steps of a method name, the quantizing one last; ValueError unless it is one of method_names()."""
    *pre, base = name.split("+")
    if base not in METHODS or any(p not in PRE_STEPS for p in pre) or (pre and base in PRE_STEPS):
        raise ValueError(f"method={name}: unknown; expected one of {', '.join(method_names())}")
    return pre + [base, "rtn"] if base in PRE_STEPS else pre + [base]


class Pipeline:
    """The pre-steps, the sensitivity statistics where outliers are chosen by them, then the method."""

    def __init__(self, model, calibration, config, pre_steps, quantizer):
        self.model, self.calibration, self.config = model, calibration, config
        self.pre_steps, self.quantizer = pre_steps, quantizer
        self.block_losses = quantizer.block_losses

    def quantize(self):
        config = self.config
        for step in self.pre_steps:
            step.apply()
        if config.outlier_fraction > 0 and config.outlier_criterion == "sensitivity":
            samples = prepare_samples(self.model, self.calibration, config.nsamples, config.seqlen or None,
                                      config.seed)
            device = config.device or next(self.model.parameters()).device
            self.quantizer.act_scales = sensitivity_scales(self.model, samples, config.batch_size, device,
                                                           config.sites)
        return self.quantizer.quantize()


def make_quantizer(method, model, calibration, config):
    """The runner of `method` (a name of method_names()) over `model`, calibrated on `calibration` tokens (a 1-D
    token tensor, or (nsamples, seqlen) samples); ValueError naming the option that does not fit."""
    *pre, base = check_method(method)
    steps = [METHODS[name](model, calibration, config) for name in pre]
    return Pipeline(model, calibration, config, steps, METHODS[base](model, calibration, config))


# What the PTQ command lines (demos/autoround_ptq.py, demos/ptq_compare.py) share

def add_ptq_flags(p):
    """The flags of a PTQ run: PTQConfig's fields, and what to load, score and save."""
    p.add_argument("--out_dir", default="out", help="folder holding the full-precision ckpt.pt")
    p.add_argument("--bits", type=int, default=4, help="weight bits (2..8)")
    p.add_argument("--group_size", type=int, default=32, help="input columns per scale (0: one per output channel)")
    p.add_argument("--sym", action=BoolFlag, default=False, help="symmetric codes (no zero point)")
    p.add_argument("--iters", type=int, default=200, help="AutoRound steps per block (0: round to nearest)")
    p.add_argument("--lr", type=finite_float, default=0.0, help="AutoRound SignSGD learning rate (0: 1/iters)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration samples")
    p.add_argument("--seqlen", type=int, default=0, help="tokens per calibration sample (0: the model's block_size)")
    p.add_argument("--batch_size", type=int, default=8, help="calibration samples per step")
    p.add_argument("--sites", default=",".join(SITES), help="comma-separated linear sites to quantize")
    p.add_argument("--calib_file", default=None, help="calibrate on this text file (default: the train split)")
    p.add_argument("--damp_percent", type=finite_float, default=0.01, help="GPTQ: dampening, a fraction of mean(diag H)")
    p.add_argument("--act_order", action=BoolFlag, default=False, help="GPTQ: columns by decreasing Hessian diagonal")
    p.add_argument("--true_sequential", action=BoolFlag, default=True, help="GPTQ: quantize a block's layers in order")
    p.add_argument("--fp_target", action=BoolFlag, default=False, help="GPTQ: match the full-precision model's layer "
                   "outputs from the quantized model's inputs (asymmetric calibration, GPTAQ)")
    p.add_argument("--eval_tokens", type=int, default=0, help="score only this many validation tokens (0: all)")
    p.add_argument("--eval_batch_size", type=int, default=16, help="windows per forward pass when scoring")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    p.add_argument("--seed", type=int, default=0, help="random seed of the calibration draw and AutoRound")
    p.add_argument("--progress", action=BoolFlag, default=True, help="progress bars")
    p.add_argument("--overwrite", action=BoolFlag, default=False, help="replace an existing result")
    p.add_argument("--outlier_fraction", type=finite_float, default=0.0,
                   help="share of each weight kept full precision as sparse outliers, in [0, 0.5)")
    p.add_argument("--outlier_criterion", default="magnitude", choices=("magnitude", "sensitivity"),
                   help="outliers by |w|, or by |w| times the input channel's activation RMS on calibration data")
    p.add_argument("--awq_grid", type=int, default=20, help="AWQ: alphas tried per folding point (grid over [0, 1])")
    return p



def check_args(args):
    for name, low in (("group_size", 0), ("seqlen", 0), ("eval_tokens", 0), ("seed", 0)):
        if not low <= getattr(args, name) <= 2 ** 31 - 1:
            raise ValueError(f"{name}={getattr(args, name)}: must be an integer in {low}..{2 ** 31 - 1}")
    for name in ("lr", "damp_percent"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            raise ValueError(f"{name}={getattr(args, name)}: must be a finite number >= 0")
    try:
        check_device(args.device)
    except ValueError as e:
        raise ValueError(f"device={args.device}: {e}") from None
    if args.iters < 0:
        raise ValueError(f"iters={args.iters}: must be 0 (round to nearest) or more")
    if args.nsamples < 1:
        raise ValueError(f"nsamples={args.nsamples}: must be at least 1")
    if args.batch_size < 1:
        raise ValueError(f"batch_size={args.batch_size}: must be at least 1")
    if args.eval_batch_size < 1:
        raise ValueError(f"eval_batch_size={args.eval_batch_size}: must be at least 1")
    weight_spec(args.bits, args.group_size, args.sym)  # bits and group size
    if not 0.0 <= args.outlier_fraction < MAX_OUTLIER_FRACTION:
        raise ValueError(f"outlier_fraction={args.outlier_fraction}: must be a fraction in [0, {MAX_OUTLIER_FRACTION})")
    if args.awq_grid < 1:
        raise ValueError(f"awq_grid={args.awq_grid}: must be at least 1")



def load_full_precision(out_dir, device):
    """(model, checkpoint, tokenizer) of a full-precision checkpoint; ValueError if it is already quantized."""
    checkpoint = load_checkpoint(out_dir, device)
    args = checkpoint["model_args"]
    if is_packed(checkpoint):
        raise ValueError(f"{out_dir} is already quantized ({checkpoint['ptq'].get('method', 'ptq')}, "
                         f"{checkpoint['ptq'].get('bits', '?')} bits); quantize its full-precision original")
    variants = {v for v in args.get("linear_variants", {}).values()} - {"linear"}
    if variants or args.get("act_quant") or args.get("embedding_quant"):
        raise ValueError(f"{out_dir} is already quantized (trained with quantization: {', '.join(variants) or 'act'}); "
                         f"post-training quantization needs a full-precision checkpoint")
    model = GPT(GPTConfig(**args))
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    dataset = checkpoint_dataset(checkpoint)
    checkpoint["dataset"] = dataset
    return model, checkpoint, Tokenizer(load_meta(os.path.join(ROOT, "data", dataset)))



def calibration_tokens(args, checkpoint, tokenizer):
    if args.calib_file:
        return text_tokens(args.calib_file, tokenizer)
    return split_tokens(checkpoint["dataset"], "train")

