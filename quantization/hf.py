"""Hugging Face GPT-2 interop: import GPT-2 weights (a local transformers folder, or the hub for users with a
network) into model.py's GPT, and export one of our checkpoints (full precision or packed quantized) to a folder
that `transformers.GPT2LMHeadModel.from_pretrained` loads with the same logits.

HF GPT-2 differs from model.py in layout only: q, k and v are fused into one `c_attn` Conv1D (weights stored
transposed, in x out), every linear and LayerNorm has a bias, and the MLP uses the tanh GELU ("gelu_new").

    python quantization/hf.py import --hf=path/to/gpt2 --out_dir=out-gpt2     # or --hf=gpt2 with a network
    python quantization/hf.py export --out_dir=out-autoround --hf=hf-out
"""
import json
import os
import pickle
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # run as a command (python quantization/<this>.py): import from the root, not from
    # quantization/ itself, whose kernels/ would shadow the `kernels` package that transformers looks for
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or os.curdir) != here]

from checkpoint import save_checkpoint  # noqa: E402
from cli import OneLineParser  # noqa: E402
from inference import from_checkpoint, load_model  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from safety import check_output_file, same_file, safe_name, write_text_atomic  # noqa: E402

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}
# our linear sites <-> HF's per-block Conv1D modules (q, k and v share c_attn)
LINEARS = {"attn.attn_proj": "attn.c_proj", "mlp.mlp_up": "mlp.c_fc", "mlp.mlp_down": "mlp.c_proj"}


HF_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")


def _read_hf_folder(folder):
    config_path = os.path.join(folder, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{config_path} not found (not a Hugging Face model folder)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    safetensors_path = os.path.join(folder, "model.safetensors")
    bin_path = os.path.join(folder, "pytorch_model.bin")
    try:
        if os.path.exists(safetensors_path):
            from safetensors.torch import load_file
            path, state = safetensors_path, load_file(safetensors_path)
        elif os.path.exists(bin_path):
            path, state = bin_path, torch.load(bin_path, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    except pickle.UnpicklingError:
        raise ValueError(f"{bin_path} was refused: it is not a plain file of tensors (it may ask for code); "
                         f"nothing in it was run") from None
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:  # truncated or foreign files
        raise ValueError(f"{safetensors_path if os.path.exists(safetensors_path) else bin_path} is unreadable "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a dict of tensors")
    prefix = "transformer."
    return config, {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def gpt_config_from_hf(config, block_size=None):
    if config.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"model_type '{config.get('model_type')}' is not gpt2")
    activation = config.get("activation_function", "gelu_new")
    if activation not in GELU:
        raise ValueError(f"activation_function '{activation}' is not supported (expected {', '.join(GELU)})")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if config.get(flag):
            raise ValueError(f"{flag}=true is not supported")
    if not config.get("scale_attn_weights", True) or abs(config.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise ValueError("only GPT-2's default attention scaling and layer_norm_epsilon=1e-5 are supported")
    n_positions = config.get("n_positions", config.get("n_ctx", 1024))
    for key in ("n_layer", "n_head", "n_embd", "vocab_size"):
        if type(config.get(key)) is not int or config[key] < 1:
            raise ValueError(f"config.json lacks a valid '{key}' (a positive integer)")
    if type(n_positions) is not int or n_positions < 1:
        raise ValueError("config.json lacks a valid 'n_positions' (a positive integer)")
    return dict(n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                block_size=min(block_size or n_positions, n_positions), vocab_size=config["vocab_size"],
                bias=True, dropout=0.0, gelu_approximate=GELU[activation])


def state_from_hf(hf_state, model_args):
    """model.py's state_dict from HF GPT-2 tensors (prefix-free keys)."""
    C, state = model_args["n_embd"], {}
    state["transformer.wte.weight"] = hf_state["wte.weight"]
    state["transformer.wpe.weight"] = hf_state["wpe.weight"][:model_args["block_size"]]
    for name in ("weight", "bias"):
        state[f"transformer.ln_f.{name}"] = hf_state[f"ln_f.{name}"]
    for i in range(model_args["n_layer"]):
        ours, theirs = f"transformer.h.{i}", f"h.{i}"
        for ln in ("ln_1", "ln_2"):
            for name in ("weight", "bias"):
                state[f"{ours}.{ln}.{name}"] = hf_state[f"{theirs}.{ln}.{name}"]
        qkv_w, qkv_b = hf_state[f"{theirs}.attn.c_attn.weight"].t(), hf_state[f"{theirs}.attn.c_attn.bias"]
        for j, site in enumerate(("q", "k", "v")):
            state[f"{ours}.attn.{site}.weight"] = qkv_w[j * C:(j + 1) * C]
            state[f"{ours}.attn.{site}.bias"] = qkv_b[j * C:(j + 1) * C]
        for site, hf_name in LINEARS.items():
            state[f"{ours}.{site}.weight"] = hf_state[f"{theirs}.{hf_name}.weight"].t()
            state[f"{ours}.{site}.bias"] = hf_state[f"{theirs}.{hf_name}.bias"]
    return {k: v.float().contiguous() for k, v in state.items()}


def load_hf_gpt2(name_or_folder, block_size=None, dropout=0.0, **overrides):
    """(GPT, model_args) of GPT-2 weights from a local transformers folder, or from the hub by name (gpt2,
    gpt2-medium, gpt2-large, gpt2-xl), which needs a network. block_size may shorten the context; `overrides`
    are further GPTConfig fields (e.g. train.py's linear_variants, weight_quant, act_quant for QAT fine-tuning:
    the weights then load into the quantized layers' latent weights)."""
    if os.path.isdir(name_or_folder):
        config, hf_state = _read_hf_folder(name_or_folder)
    else:
        if name_or_folder not in HUB_MODELS:
            raise ValueError(f"'{name_or_folder}' is neither a folder nor one of {', '.join(HUB_MODELS)}")
        try:
            from transformers import GPT2LMHeadModel
            hf = GPT2LMHeadModel.from_pretrained(name_or_folder)
        except ImportError:
            raise ValueError("loading GPT-2 from the hub needs the transformers package") from None
        except OSError as e:
            raise ValueError(f"could not fetch '{name_or_folder}' from the Hugging Face hub (no network?): "
                             f"download it where there is one and pass its folder instead "
                             f"({str(e).splitlines()[0]})") from None
        config = hf.config.to_dict()
        hf_state = {k[len("transformer."):]: v for k, v in hf.state_dict().items() if k.startswith("transformer.")}
    try:
        model_args = {**gpt_config_from_hf(config, block_size), "dropout": dropout, **overrides}
    except ValueError as e:
        raise ValueError(f"{name_or_folder}: {e}") from None
    try:
        from inference import check_model_args
        check_model_args(model_args)
        converted = state_from_hf(hf_state, model_args)
    except KeyError as e:
        raise ValueError(f"{name_or_folder}: the weights lack tensor {e}") from None
    model = GPT(GPTConfig(**model_args))
    names = set(model.state_dict())
    state = {}
    for key, value in converted.items():
        latent = key[:-len("weight")] + "parametrizations.weight.original"  # a QuantizedLinear's weight
        state[latent if key not in names and latent in names else key] = value
    wrong = [k for k, v in state.items() if k in names and v.shape != model.state_dict()[k].shape]
    if wrong:
        raise ValueError(f"{name_or_folder}: tensor {wrong[0]} has shape {list(state[wrong[0]].shape)}, "
                         f"config.json gives {list(model.state_dict()[wrong[0]].shape)}")
    model.load_state_dict(state)
    return model, model_args


def from_pretrained(name_or_folder, **overrides):
    """A GPT from a checkpoint train.py (or a PTQ script) wrote (its folder or file), a local Hugging Face GPT-2
    folder, or a GPT-2 name (gpt2, gpt2-medium, ...: downloaded, needs a network). `overrides` (block_size,
    dropout, config fields) apply to the Hugging Face import."""
    path = os.path.join(name_or_folder, "ckpt.pt") if os.path.isdir(name_or_folder) else name_or_folder
    if os.path.isfile(path):
        return from_checkpoint(path)
    return load_hf_gpt2(name_or_folder, **overrides)[0]


def import_checkpoint(name_or_folder, out_dir, dataset="shakespeare", block_size=None):
    """Write GPT-2 weights as one of our full-precision checkpoints (dataset names the GPT-2 BPE tokenizer's
    data folder, used by sample.py and perplexity.py)."""
    model, model_args = load_hf_gpt2(name_or_folder, block_size)
    path = os.path.join(out_dir, "ckpt.pt")
    save_checkpoint(path, {"model": model.state_dict(), "model_args": model_args, "iter_num": 0,
                           "best_val_loss": None, "config": {"init_from": name_or_folder}, "dataset": dataset,
                           "quantization_enabled": True})
    return path


def export_checkpoint(out_dir, hf_dir):
    """Write our checkpoint (full precision, or packed quantized: its dequantized weights) as a transformers
    GPT-2 folder: config.json and model.safetensors."""
    from safetensors.torch import save_file

    model, _ = load_model(out_dir, "cpu")
    cfg = model.config
    if any(v != "linear" for v in cfg.linear_variants.values()) or cfg.act_quant or cfg.embedding_quant:
        raise ValueError("checkpoints trained with quantizers on cannot be exported (GPT-2 has no quantizers); "
                         "export a full-precision or PTQ checkpoint")
    if cfg.norm != "layernorm" or not cfg.tied_head or cfg.online_transforms:
        raise ValueError("rotated checkpoints (RMSNorm, untied head, online transforms) cannot be exported: "
                         "GPT-2 has LayerNorm and a tied head")
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    C = cfg.n_embd

    def bias(key, n):
        return sd.get(key, torch.zeros(n))  # bias=False models: GPT-2 always has biases, zero ones change nothing

    out = {"wte.weight": sd["transformer.wte.weight"], "wpe.weight": sd["transformer.wpe.weight"],
           "ln_f.weight": sd["transformer.ln_f.weight"], "ln_f.bias": bias("transformer.ln_f.bias", C)}
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}", f"h.{i}"
        for ln in ("ln_1", "ln_2"):
            out[f"{theirs}.{ln}.weight"] = sd[f"{ours}.{ln}.weight"]
            out[f"{theirs}.{ln}.bias"] = bias(f"{ours}.{ln}.bias", C)
        out[f"{theirs}.attn.c_attn.weight"] = torch.cat([sd[f"{ours}.attn.{s}.weight"] for s in "qkv"]).t()
        out[f"{theirs}.attn.c_attn.bias"] = torch.cat([bias(f"{ours}.attn.{s}.bias", C) for s in "qkv"])
        for site, hf_name in LINEARS.items():
            weight = sd[f"{ours}.{site}.weight"]
            out[f"{theirs}.{hf_name}.weight"] = weight.t()
            out[f"{theirs}.{hf_name}.bias"] = bias(f"{ours}.{site}.bias", weight.shape[0])
    os.makedirs(hf_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=hf_dir, prefix=".model-", suffix=".tmp")  # written whole, then renamed
    os.close(fd)
    try:
        save_file({f"transformer.{k}": v.contiguous() for k, v in out.items()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(hf_dir, "model.safetensors"))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    eot = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>; char models have none
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
              "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": C, "n_layer": cfg.n_layer,
              "n_head": cfg.n_head, "n_inner": None, "layer_norm_epsilon": 1e-5,
              "activation_function": "gelu_new" if cfg.gelu_approximate == "tanh" else "gelu",
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True,
              "scale_attn_weights": True, "bos_token_id": eot, "eos_token_id": eot}
    write_text_atomic(os.path.join(hf_dir, "config.json"), json.dumps(config, indent=2))
    return hf_dir


def check_paths(args):
    """The first reason not to go ahead (a bad flag, an output that is a source or exists), or None."""
    if not 0 <= args.block_size <= 2 ** 31 - 1:
        return f"--block_size={args.block_size}: must be 0 (the model's own) or more"
    if not args.hf or not args.out_dir:
        return "--hf and --out_dir must not be empty"
    if same_file(args.hf, args.out_dir):
        return f"--out_dir={args.out_dir} and --hf={args.hf} are one folder; write the result to another"
    try:
        if args.direction == "import":
            try:
                if safe_name(args.dataset) != args.dataset:
                    raise ValueError
            except ValueError:
                return f"--dataset={args.dataset}: expected the name of a folder under data/"
            meta = os.path.join(ROOT, "data", args.dataset, "meta.json")
            if os.path.exists(meta):
                from tokenizer import load_meta
                if load_meta(os.path.dirname(meta))["tokenizer"] != "gpt2":
                    return f"--dataset={args.dataset}: not a GPT-2 BPE dataset (GPT-2 weights need its tokenizer)"
            sources = [os.path.join(args.hf, f) for f in HF_FILES]
            check_output_file(os.path.join(args.out_dir, "ckpt.pt"), sources, args.overwrite)
        else:
            source = args.out_dir if not os.path.isdir(args.out_dir) else os.path.join(args.out_dir, "ckpt.pt")
            for name in ("config.json", "model.safetensors"):
                check_output_file(os.path.join(args.hf, name), [source], args.overwrite)
    except ValueError as e:
        return f"--{'out_dir' if args.direction == 'import' else 'hf'}: {e}"
    return None


def main(argv=None):
    p = OneLineParser(prog="hf.py", description="Import GPT-2 weights from Hugging Face, or export to it.")
    p.add_argument("direction", choices=("import", "export"))
    p.add_argument("--hf", required=True, help="import: a transformers folder or gpt2*; export: the folder to write")
    p.add_argument("--out_dir", required=True, help="import: where to write ckpt.pt; export: the checkpoint folder")
    p.add_argument("--dataset", default="shakespeare", help="import: data folder of the GPT-2 tokenizer (meta.json)")
    p.add_argument("--block_size", type=int, default=0, help="import: shorten the context (0: the model's own)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint (import) or files (export)")
    args = p.parse_args(argv)
    error = check_paths(args)
    if error:
        p.error(error)
    try:
        if args.direction == "import":
            print(f"wrote {import_checkpoint(args.hf, args.out_dir, args.dataset, args.block_size or None)}")
        else:
            print(f"wrote {export_checkpoint(args.out_dir, args.hf)}")
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"hf.py: error: {e}")


if __name__ == "__main__":
    main()
