"""train.py's flags: nanoGPT's training flags, plus quantization flags generated from model.py's site tables.

Precedence: built-in defaults < a preset given with --config (a TOML file of flag = value) < the command line.
A site's own flag beats its layer kind's flag (attn or mlp), which beats the global flag.
"""
import argparse
import math
import re
import sys
import tomllib

from model import ACT_SITES, LINEAR_SITES, GPTConfig
from quantization.layers import LINEAR_VARIANTS
from quantization.quantizers import (GRANULARITIES, MAX_BINARY_TERMS, MAX_BITS, MAX_OUTLIER_FRACTION, METHODS, MIN_BITS,
                                     QuantSpec, misfit)
from cli import BoolFlag, OneLineParser  # noqa: F401 (BoolFlag: re-exported)
from safety import check_device, finite_float, safe_name

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
    ("overwrite", False, "allow a run that does not resume to replace the checkpoint in out_dir"),
    ("wandb_log", False, "log to Weights & Biases (set WANDB_MODE=offline to log without a network)"),
    ("wandb_project", "nanoqat", "wandb project"),
    ("wandb_run_name", "run", "wandb run name"),
    # data
    ("dataset", "shakespeare_char", "folder under data/ holding train.bin, val.bin and meta.json"),
    ("gradient_accumulation_steps", 1, "micro-batches per optimizer step (summed over all processes)"),
    ("batch_size", 12, "sequences per micro-batch"),
    ("block_size", 64, "context length in tokens"),
    ("calib_tokens", 0, "leave the last this many tokens of train.bin out of training (and of the train loss), for "
     "calibration: SpinQuant (demos/spinquant_*.py) draws its calibration and held-out windows from them"),
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
    ("ddp_bucket_cap_mb", 25, "DDP gradient bucket size in MB (each bucket's all-reduce starts once it is ready)"),
    ("ddp_grad_compress", "none", "DDP gradients on the wire: none (float32), bf16 or fp16 (half the bytes)"),
    ("ddp_overlap", "off", "DDP under --compile: off (one compiled graph, all-reduce after the backward pass; "
     "faster over NVLink) or buckets (graph split at the gradient buckets, all-reduce overlaps the backward pass)"),
    ("ddp_timeout", 600, "seconds a DDP collective may wait for the other processes before the job stops"),
    ("device", "auto", "cpu, cuda, cuda:N, mps, or auto (cuda when available)"),
    ("dtype", "auto", "float32, bfloat16 or float16 autocast; auto: bfloat16 on CUDA that has it, else float32"),
    ("compile", False, "torch.compile the model"),
    ("seed", 1337, "random seed"),
    ("deterministic", False, "deterministic kernels (torch.use_deterministic_algorithms, warning on ops that have "
     "none; slower): runs that differ in one flag then differ by that flag alone, not by the GPU's atomics"),
    # quantization, global
    ("quantization_warmup_iters", 100, "iterations of full-precision training before the quantizers switch on "
                                      "(a resumed run keeps its checkpoint's unless given)"),
    ("quantize_linear_method", "symmetric_quant", f"weight quantizer: {', '.join(METHODS)}"),
    ("quantize_linear_bits", 8, f"weight bits ({MIN_BITS}..{MAX_BITS}; ternary and binary ignore it)"),
    ("quantize_linear_granularity", "per_channel", "weight scale per_tensor, per_channel or per_group"),
    ("quantize_linear_group_size", 32, "input columns per group when granularity is per_group"),
    ("quantize_linear_binary_terms", 2, f"residual_binary_quant: sign matrices summed per weight (1..{MAX_BINARY_TERMS})"),
    ("quantize_linear_outlier_fraction", 0.0, "share of each weight kept full precision as sparse outliers, in [0, 0.5)"),
    ("stochastic_grid", "symmetric", "grid stochastic_quant rounds onto: symmetric or affine"),
    ("quantize_linear_fp16_scale", False, "round weight scales to float16 (GGUF stores them so: an exact export)"),
    ("quantize_embedding", False, "also quantize the tied token embedding / lm_head with the global weight flags"),
    ("activations_quant_method", "symmetric_quant", "activation quantizer: symmetric_quant, affine_quant, stochastic_quant"),
    ("activations_quant_granularity", "per_tensor", "activation range per_tensor or per_token (dynamic)"),
    ("store_activations", False, "keep the last quantized activation of each active site (saved with checkpoints)"),
    # SpinQuant rotations in QAT (quantization/spin_quant_qat.py)
    ("spinquant", False, "learn SpinQuant rotations when quantization switches on and keep them only if they clearly "
                         "beat no rotation on held-out training text; the weights train in their own basis "
                         "(docs/spinquant.md; measured: docs/results.md#spinquant)"),
    ("spinquant_steps", 100, "Cayley SGD steps of --spinquant"),
    ("spinquant_lr", 1.5, "Cayley SGD learning rate of --spinquant (cosine-decayed)"),
    ("spinquant_nsamples", 128, "training sequences --spinquant learns the rotations on"),
    ("spinquant_probe", -1, "with --spinquant: where the switch keeps the rotations, run this many QAT iterations "
                            "with them and the same again without them (same batches), and keep them only if still "
                            "clearly better on held-out training text; -1: a third of the iterations left at the "
                            "switch; 0: decide at the switch only"),
    ("gelu_approximate", "none", "GELU of the MLP: none (exact) or tanh (GPT-2's and llama.cpp's approximation)"),
]

# the per-site weight quantization flags: quantize_linear_<field>[_<kind or site>]
WEIGHT_FIELDS = {"method": str, "bits": int, "granularity": str, "group_size": int, "binary_terms": int,
                 "outlier_fraction": float}
CHOICES = {"method": METHODS, "granularity": GRANULARITIES[:3], "variant": tuple(LINEAR_VARIANTS),
           "activations_quant_method": METHODS[:3], "activations_quant_granularity": ACT_GRANULARITIES,
           "stochastic_grid": ("symmetric", "affine"), "gelu_approximate": ("none", "tanh"), "quantize_linear_method": METHODS,
           "quantize_linear_granularity": GRANULARITIES[:3], "dtype": ("auto", "float32", "bfloat16", "float16"),
           "ddp_grad_compress": ("none", "bf16", "fp16"),
           "ddp_overlap": ("buckets", "off"), "backend": ("auto", "nccl", "gloo")}

# the smallest value of each integer flag (every integer flag is at most MAX_INT); per-site group sizes are >= 1
INT_MIN = {"eval_interval": 1, "log_interval": 1, "eval_iters": 1, "gradient_accumulation_steps": 1,
           "batch_size": 1, "block_size": 1, "n_layer": 1, "n_head": 1, "n_embd": 1, "max_iters": 0,
           "warmup_iters": 0, "lr_decay_iters": 0, "seed": 0, "quantization_warmup_iters": 0,
           "quantize_linear_group_size": 1, "ddp_bucket_cap_mb": 1, "ddp_timeout": 1, "spinquant_steps": 0,
           "spinquant_nsamples": 1, "spinquant_probe": -1, "calib_tokens": 0}
MAX_INT = 2 ** 31 - 1
# float flags: (lowest, highest, whether the lowest itself is allowed); all must be finite
FLOAT_RANGES = {"learning_rate": (0.0, math.inf, True), "min_lr": (0.0, math.inf, True),
                "weight_decay": (0.0, math.inf, True), "beta1": (0.0, 1.0, True), "beta2": (0.0, 1.0, True),
                "grad_clip": (0.0, math.inf, True), "dropout": (0.0, 1.0, True),
                "spinquant_lr": (0.0, math.inf, False)}
MAX_PARAMS = 10 ** 12  # a model above this many parameters is a typo, not a plan


def add_flag(parser, name, default, help, type_=None):
    if isinstance(default, bool) or type_ is bool:
        parser.add_argument(f"--{name}", action=BoolFlag, default=default, help=help)
    else:
        type_ = type_ or type(default)
        type_ = finite_float if type_ is float else type_  # nan and inf refused as the flag is parsed
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
    """A TOML preset's settings, each checked for type and choices as the command line checks a flag."""
    try:
        with open(path, "rb") as f:
            preset = tomllib.load(f)
    except (FileNotFoundError, IsADirectoryError):
        parser.error(f"--config {path}: no such file")
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"--config {path}: unreadable ({e})")
    except tomllib.TOMLDecodeError as e:
        parser.error(f"--config {path}: not valid TOML ({e})")
    actions = {a.dest: a for a in parser._actions}
    for key, value in preset.items():
        if key not in actions or key in ("config", "help"):
            parser.error(f"--config {path}: unknown setting '{key}'")
        action = actions[key]
        expected = (bool if isinstance(action, BoolFlag) else (int, float) if action.type in (float, finite_float)
                    else action.type or str)
        if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
            name = {bool: "true or false", int: "an integer", str: "a string"}.get(expected, "a number")
            parser.error(f"--config {path}: {key} = {value!r}: expected {name}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"--config {path}: {key} = {value!r}: expected one of {', '.join(action.choices)}")
    return preset


def check_args(args):
    """ConfigError naming the flag unless every training flag is in its range (the same for the command line and
    presets; the quantizers' fields are checked by model_quant_config)."""
    for name, value in vars(args).items():
        if type(value) is int:
            low = INT_MIN.get(name, 1 if name.startswith("quantize_linear_group_size_") else None)
            if low is not None and value < low:
                raise ConfigError(f"--{name}={value}: must be at least {low}")
            if abs(value) > MAX_INT:
                raise ConfigError(f"--{name}={value}: must be at most {MAX_INT}")
        if name in FLOAT_RANGES:
            low, high, low_ok = FLOAT_RANGES[name]
            if not (math.isfinite(value) and (low <= value if low_ok else low < value) and value < high):
                interval = f"{'[' if low_ok else '('}{low:g}, {high:g})"
                raise ConfigError(f"--{name}={value}: must be a finite number in {interval}")
    if args.n_embd % args.n_head:
        raise ConfigError(f"--n_embd={args.n_embd} must be divisible by --n_head={args.n_head}")
    params = 12 * args.n_layer * args.n_embd ** 2 + 50304 * args.n_embd
    if params > MAX_PARAMS:
        raise ConfigError(f"--n_layer={args.n_layer} --n_embd={args.n_embd}: about {params:.1e} parameters, "
                          f"more than the {MAX_PARAMS:.0e} this accepts")
    if args.batch_size * args.block_size > MAX_INT:
        raise ConfigError(f"--batch_size={args.batch_size} x --block_size={args.block_size}: too many tokens per batch")
    for name in ("out_dir", "dataset", "wandb_project", "wandb_run_name", "init_from"):
        if not getattr(args, name):
            raise ConfigError(f"--{name}: must not be empty")
    try:
        if safe_name(args.dataset) != args.dataset:
            raise ValueError("not a plain folder name")
    except ValueError:
        raise ConfigError(f"--dataset={args.dataset}: expected the name of a folder under data/") from None
    try:
        check_device(args.device)
    except ValueError as e:
        raise ConfigError(f"--device={args.device}: {e}") from None


def parse_args(argv=None, prog="train.py"):
    return parse_args_given(argv, prog)[0]


def parse_args_given(argv=None, prog="train.py"):
    """(parsed and checked flags, the names of those set explicitly on the command line or by the preset)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    preset = {}
    if args.config:
        preset = load_preset(args.config, parser)
        parser.set_defaults(**preset)
        args = parser.parse_args(argv)
    # parsed again over a namespace of markers: a flag still holding its marker was not on the command line
    marker = object()
    given = parser.parse_args(argv, argparse.Namespace(**{a.dest: marker for a in parser._actions}))
    command_line = {k for k, v in vars(given).items() if v is not marker}
    explicit = command_line | set(preset)
    try:
        check_args(args)
    except ConfigError as e:
        parser.error(preset_origin(str(e), args.config, set(preset) - command_line))
    if set(preset) - command_line:
        # a preset's quantizer fields are checked here, where the preset file can still be named
        try:
            model_quant_config(args)
        except ConfigError as e:
            if preset_origin(str(e), args.config, set(preset) - command_line) != str(e):
                parser.error(preset_origin(str(e), args.config, set(preset) - command_line))
    return args, explicit


def preset_origin(message, path, preset_keys):
    """A refusal of a value that came from the preset file (not overridden on the command line) names the file:
    '--config <path>: <message>'; other messages are returned as they are."""
    named = re.findall(r"--([A-Za-z0-9_]+)", message)
    if path and any(name in preset_keys for name in named):
        return f"--config {path}: {message}"
    return message


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
    for name, value in vars(args).items():  # every bits flag, used or not: a bad value is never ignored
        if (name.endswith("_bits") or "_bits_" in name) and value is not None and not MIN_BITS <= value <= MAX_BITS:
            raise ConfigError(f"--{name}: bits={value} is out of range; expected {MIN_BITS}..{MAX_BITS}")
        if name.startswith("quantize_linear_outlier_fraction") and value is not None and \
                not (math.isfinite(value) and 0.0 <= value < MAX_OUTLIER_FRACTION):
            raise ConfigError(f"--{name}: outlier_fraction={value} is out of range; expected a fraction in "
                              f"[0, {MAX_OUTLIER_FRACTION})")
        if name.startswith("quantize_linear_binary_terms") and value is not None and not 1 <= value <= MAX_BINARY_TERMS:
            raise ConfigError(f"--{name}: binary_terms={value} is out of range; expected 1..{MAX_BINARY_TERMS}")
    variants, weight_quant, act_quant = {}, {}, {}
    for site, kind in LINEAR_SITES.items():
        variants[site] = _resolve(args, "linear_variant", kind, site)[0] or "linear"
        fields, flags = {"stochastic_grid": args.stochastic_grid}, {}
        if args.quantize_linear_fp16_scale:
            fields["fp16_scale"] = True
        for fld in WEIGHT_FIELDS:
            fields[fld], flags[fld] = _resolve(args, f"quantize_linear_{fld}", kind, site)
        if fields["granularity"] != "per_group":
            fields["group_size"] = 0
        if variants[site] != "linear":
            weight_quant[site] = _spec(fields, flags)
            in_features = 4 * args.n_embd if site == "mlp_down" else args.n_embd
            why = misfit(QuantSpec(**weight_quant[site]), in_features)
            if why:
                raise ConfigError(f"--{flags['group_size']}={fields['group_size']} {why} of the {site} site")
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
                  "granularity": "per_channel", "stochastic_grid": args.stochastic_grid,
                  "binary_terms": args.quantize_linear_binary_terms}
        if args.quantize_linear_fp16_scale:
            fields["fp16_scale"] = True
        embedding_quant = _spec(fields, {"bits": "quantize_linear_bits", "method": "quantize_linear_method",
                                         "binary_terms": "quantize_linear_binary_terms"})
    return dict(linear_variants=variants, weight_quant=weight_quant, act_quant=act_quant,
                store_activations=args.store_activations, embedding_quant=embedding_quant)


# what a resumed run keeps from its checkpoint: these model_args, the dataset, and the quantization flags
RESUME_KEPT = ("n_layer", "n_head", "n_embd", "block_size", "bias", "dropout")
QUANT_FLAG_PREFIXES = ("linear_variant_", "quantize_linear_", "quantize_attn_act", "quantize_mlp_act",
                       "quantize_embedding", "activations_quant_", "stochastic_grid", "store_activations")


def apply_resume(args, given, checkpoint):
    """A resumed run keeps its dataset, architecture, quantization and --quantization_warmup_iters: a flag left out
    takes the checkpoint's value; a flag given (command line or preset) that contradicts the checkpoint's dataset,
    architecture or quantization raises ConfigError."""
    model_args = checkpoint["model_args"]
    saved = {k: model_args[k] for k in RESUME_KEPT if k in model_args}
    saved["dataset"] = checkpoint.get("dataset") or checkpoint.get("config", {}).get("dataset")
    for name, value in saved.items():
        if value is None:
            continue
        if name in given and getattr(args, name) != value:
            raise ConfigError(f"--{name}={getattr(args, name)} contradicts the checkpoint being resumed "
                              f"({name}={value}); leave the flag out, or train anew with --overwrite")
        setattr(args, name, value)
    # ... and the tokens it kept out of training (calibration text must stay unseen)
    calib = checkpoint.get("config", {}).get("calib_tokens", 0)
    if "calib_tokens" in given and args.calib_tokens != calib:
        raise ConfigError(f"--calib_tokens={args.calib_tokens} contradicts the checkpoint being resumed "
                          f"(calib_tokens={calib}); leave the flag out, or train anew with --overwrite")
    args.calib_tokens = calib
    # ... and its schedule: the warm-up a QAT run was started with, unless given (the default would switch the
    # quantizers off again, or on early)
    warmup = checkpoint.get("config", {}).get("quantization_warmup_iters")
    if warmup is not None and "quantization_warmup_iters" not in given:
        args.quantization_warmup_iters = warmup
    quant_flags = sorted(n for n in given if n.startswith(QUANT_FLAG_PREFIXES))
    if quant_flags:
        quant = model_quant_config(args)
        defaults = GPTConfig()
        if any(value != model_args.get(k, getattr(defaults, k)) for k, value in quant.items()):
            raise ConfigError(f"--{quant_flags[0]}: the quantization flags contradict those of the checkpoint being "
                              f"resumed; leave them out, or train anew with --overwrite")
