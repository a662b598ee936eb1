"""train.py's flags: nanoGPT's training flags, plus quantization flags generated from model.py's site tables.

Precedence: built-in defaults < a preset given with --config (a TOML file of flag = value) < the command line.
A site's own flag beats its layer kind's flag (attn or mlp), which beats the global flag.
"""
import argparse
import sys
import tomllib

from model import ACT_SITES, LINEAR_SITES
from quantization.layers import LINEAR_VARIANTS
from quantization.quantizers import GRANULARITIES, MAX_BITS, METHODS, MIN_BITS, QuantSpec

KINDS = ("attn", "mlp")
ACT_GRANULARITIES = ("per_tensor", "per_token")

# (flag, default, help) for everything that is not a quantization site
TRAINING_FLAGS = [
    # I/O
    ("out_dir", "out", "folder for checkpoints and the log"),
    ("eval_interval", 250, "evaluate (and maybe checkpoint) every this many iterations"),
    ("log_interval", 10, "print a training line every this many iterations"),
    ("eval_iters", 20, "batches per split when estimating the loss"),
    ("eval_only", False, "evaluate once and exit"),
    ("always_save_checkpoint", False, "checkpoint at every evaluation, not only on improvement"),
    ("init_from", "scratch", "'scratch', 'resume' (the checkpoint in out_dir), gpt2* or a local HF GPT-2 folder"),
    ("wandb_log", False, "log to Weights & Biases (set WANDB_MODE=offline to log without a network)"),
    ("wandb_project", "nanoqat", "wandb project"),
    ("wandb_run_name", "run", "wandb run name"),
    # data
    ("dataset", "shakespeare_char", "folder under data/ holding train.bin, val.bin and meta.json"),
    ("gradient_accumulation_steps", 1, "micro-batches per optimizer step (summed over all processes)"),
    ("batch_size", 12, "sequences per micro-batch"),
    ("block_size", 64, "context length in tokens"),
    # model
    ("n_layer", 4, "transformer blocks"),
    ("n_head", 4, "attention heads"),
    ("n_embd", 128, "embedding width"),
    ("dropout", 0.0, "dropout probability"),
    ("bias", False, "biases in linear layers and LayerNorms"),
    # optimizer
    ("learning_rate", 1e-3, "peak learning rate"),
    ("max_iters", 2000, "total optimizer steps"),
    ("weight_decay", 1e-1, "AdamW weight decay of matrices"),
    ("beta1", 0.9, "AdamW beta1"),
    ("beta2", 0.99, "AdamW beta2"),
    ("grad_clip", 1.0, "clip gradients to this norm (0 disables)"),
    # learning rate schedule
    ("decay_lr", True, "cosine decay of the learning rate"),
    ("warmup_iters", 100, "iterations of linear learning-rate warm-up"),
    ("lr_decay_iters", 2000, "iterations over which the cosine decays (usually max_iters)"),
    ("min_lr", 1e-4, "learning rate at the end of the decay"),
    # system
    ("backend", "auto", "DDP backend: nccl, gloo, or auto (nccl on CUDA, gloo otherwise)"),
    ("device", "auto", "cpu, cuda, cuda:N, mps, or auto (cuda when available)"),
    ("dtype", "auto", "float32, bfloat16 or float16 autocast; auto: bfloat16 on CUDA that has it, else float32"),
    ("compile", False, "torch.compile the model"),
    ("seed", 1337, "random seed"),
    # quantization, global
    ("quantization_warmup_iters", 100, "iterations of full-precision training before the quantizers switch on"),
    ("quantize_linear_method", "symmetric_quant", f"weight quantizer: {', '.join(METHODS)}"),
    ("quantize_linear_bits", 8, f"weight bits ({MIN_BITS}..{MAX_BITS}; ternary and binary ignore it)"),
    ("quantize_linear_granularity", "per_channel", "weight scale per_tensor, per_channel or per_group"),
    ("quantize_linear_group_size", 32, "input columns per group when granularity is per_group"),
    ("quantize_linear_outlier_fraction", 0.0, "share of each weight kept full precision as sparse outliers, in [0, 0.5)"),
    ("stochastic_grid", "symmetric", "grid stochastic_quant rounds onto: symmetric or affine"),
    ("quantize_embedding", False, "also quantize the tied token embedding / lm_head with the global weight flags"),
    ("activations_quant_method", "symmetric_quant", "activation quantizer: symmetric_quant, affine_quant, stochastic_quant"),
    ("activations_quant_granularity", "per_tensor", "activation range per_tensor or per_token (dynamic)"),
    ("store_activations", False, "keep the last quantized activation of each active site (saved with checkpoints)"),
]

# the per-site weight quantization flags: quantize_linear_<field>[_<kind or site>]
WEIGHT_FIELDS = {"method": str, "bits": int, "granularity": str, "group_size": int, "outlier_fraction": float}
CHOICES = {"method": METHODS, "granularity": GRANULARITIES[:3], "variant": tuple(LINEAR_VARIANTS),
           "activations_quant_method": METHODS[:3], "activations_quant_granularity": ACT_GRANULARITIES,
           "stochastic_grid": ("symmetric", "affine"), "quantize_linear_method": METHODS,
           "quantize_linear_granularity": GRANULARITIES[:3], "dtype": ("auto", "float32", "bfloat16", "float16")}


def str2bool(value):
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got '{value}'")


class BoolFlag(argparse.Action):
    """--flag, --flag=False and --no-flag alike."""

    def __init__(self, option_strings, dest, **kwargs):
        name = option_strings[0][2:]
        super().__init__([f"--{name}", f"--no-{name}"], dest, nargs="?", type=str2bool, metavar="BOOL", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string.startswith("--no-"):
            if value is not None:
                parser.error(f"{option_string} takes no value")
            value = False
        setattr(namespace, self.dest, True if value is None else value)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line (the usage of hundreds of flags is --help's job)."""

    def error(self, message):
        sys.exit(f"{self.prog}: error: {message}")


def add_flag(parser, name, default, help, type_=None):
    if isinstance(default, bool) or type_ is bool:
        parser.add_argument(f"--{name}", action=BoolFlag, default=default, help=help)
    else:
        type_ = type_ or type(default)
        parser.add_argument(f"--{name}", type=type_, default=default, choices=CHOICES.get(name), help=help)


def build_parser(prog="train.py"):
    parser = OneLineParser(prog=prog, description="Train a GPT with quantization-aware training.")
    parser.add_argument("--config", default=None, help="a TOML preset of flag = value lines (e.g. configs/cpu_char.toml)")
    for name, default, help in TRAINING_FLAGS:
        add_flag(parser, name, default, help)
    # linear sites: variant per kind and per site, weight quantizer fields per kind and per site
    for scope in KINDS + tuple(LINEAR_SITES):
        what = f"{scope} layers" if scope in KINDS else f"the {scope} site"
        parser.add_argument(f"--linear_variant_{scope}", default=None, choices=CHOICES["variant"],
                            help=f"linear variant of {what} ({', '.join(LINEAR_VARIANTS)})")
        for fld, type_ in WEIGHT_FIELDS.items():
            parser.add_argument(f"--quantize_linear_{fld}_{scope}", type=type_, default=None, choices=CHOICES.get(fld),
                                help=f"{fld.replace('_', ' ')} of the weight quantizer of {what}")
    # activation sites: switch and bits per kind and per site
    for kind in KINDS:
        add_flag(parser, f"quantize_{kind}_act", False, f"quantize every activation site of the {kind} layers")
        add_flag(parser, f"quantize_{kind}_act_bits", 8, f"activation bits of the {kind} sites ({MIN_BITS}..{MAX_BITS})")
        for site in ACT_SITES[kind]:
            add_flag(parser, f"quantize_{kind}_act_{site}", None, f"quantize the {kind} {site} activation", type_=bool)
            add_flag(parser, f"quantize_{kind}_act_{site}_bits", None,
                     f"bits of the {kind} {site} activation (default: --quantize_{kind}_act_bits)", type_=int)
    return parser


def load_preset(path, parser):
    try:
        with open(path, "rb") as f:
            preset = tomllib.load(f)
    except FileNotFoundError:
        parser.error(f"--config {path}: no such file")
    except tomllib.TOMLDecodeError as e:
        parser.error(f"--config {path}: not valid TOML ({e})")
    known = {a.dest for a in parser._actions}
    for key in preset:
        if key not in known or key == "config":
            parser.error(f"--config {path}: unknown setting '{key}'")
    return preset


def parse_args(argv=None, prog="train.py"):
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**load_preset(args.config, parser))
        args = parser.parse_args(argv)
    return args


class ConfigError(ValueError):
    pass


def _resolve(args, field, kind, site):
    """The value of a per-site setting and the flag it came from: site flag, then kind flag, then global flag."""
    for flag in (f"{field}_{site}", f"{field}_{kind}"):
        if getattr(args, flag) is not None:
            return getattr(args, flag), flag
    return getattr(args, field, None), field


def _spec(fields, flags):
    """A QuantSpec's fields, checked; an error names the flag that gave the bad value."""
    try:
        QuantSpec(**fields)
    except ValueError as e:
        bad = next((f for k, f in flags.items() if str(e).startswith(k)), next(iter(flags.values())))
        raise ConfigError(f"--{bad}: {e}") from None
    return fields


def model_quant_config(args):
    """The quantization part of GPTConfig (linear_variants, weight_quant, act_quant, ...) from parsed flags."""
    variants, weight_quant, act_quant = {}, {}, {}
    for site, kind in LINEAR_SITES.items():
        variants[site] = _resolve(args, "linear_variant", kind, site)[0] or "linear"
        fields, flags = {"stochastic_grid": args.stochastic_grid}, {}
        for fld in WEIGHT_FIELDS:
            fields[fld], flags[fld] = _resolve(args, f"quantize_linear_{fld}", kind, site)
        if fields["granularity"] != "per_group":
            fields["group_size"] = 0
        if variants[site] != "linear":
            weight_quant[site] = _spec(fields, flags)
            in_features = 4 * args.n_embd if site == "mlp_down" else args.n_embd
            if fields["group_size"] and in_features % fields["group_size"]:
                raise ConfigError(f"--{flags['group_size']}={fields['group_size']} does not divide the input width "
                                  f"{in_features} of the {site} site")
    for kind in KINDS:
        for site in ACT_SITES[kind]:
            on = getattr(args, f"quantize_{kind}_act_{site}")
            if not (on if on is not None else getattr(args, f"quantize_{kind}_act")):
                continue
            bits_flag = f"quantize_{kind}_act_{site}_bits"
            if getattr(args, bits_flag) is None:
                bits_flag = f"quantize_{kind}_act_bits"
            fields = {"method": args.activations_quant_method, "bits": getattr(args, bits_flag),
                      "granularity": args.activations_quant_granularity, "stochastic_grid": args.stochastic_grid}
            act_quant[f"{kind}_{site}"] = _spec(fields, {"bits": bits_flag, "method": "activations_quant_method"})
    embedding_quant = None
    if args.quantize_embedding:
        fields = {"method": args.quantize_linear_method, "bits": args.quantize_linear_bits,
                  "granularity": "per_channel", "stochastic_grid": args.stochastic_grid}
        embedding_quant = _spec(fields, {"bits": "quantize_linear_bits", "method": "quantize_linear_method"})
    return dict(linear_variants=variants, weight_quant=weight_quant, act_quant=act_quant,
                store_activations=args.store_activations, embedding_quant=embedding_quant)
