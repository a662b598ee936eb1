"""
Train a GPT with quantization-aware training: full precision for --quantization_warmup_iters iterations,
then with every configured weight and activation quantizer on (straight-through estimator).

One process:       python train.py --linear_variant_attn=quantized_linear --quantize_linear_method=ternary_quant
Several (DDP):     torchrun --standalone --nproc_per_node=4 train.py --config=configs/gpt2_124m.toml
"""
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.utils._pytree import tree_map

import distributed
from checkpoint import save_checkpoint
from quantization.layers import restore_activations, stored_activations
from configurator import ConfigError, apply_resume, model_quant_config, parse_args_given
from inference import autocast_context, load_checkpoint, resolve_device
from model import GPT, GPTConfig
import quantization.spin_quant as spin_quant
import quantization.spin_quant_qat as spin_quant_qat
from quantization.spin_quant import is_rotated, paired_gain, sample_losses
from quantization.spin_quant_qat import RotatedQAT, check_qat, qat_lr, rotate_for_qat
from safety import check_out_dir, clean_stale_tmp, wandb_needs_offline
from tokenizer import load_dataset

ROOT = os.path.dirname(os.path.abspath(__file__))


def check_start(args, given):
    """(quantization config, checkpoint to resume or None, whether GPT-2 weights start it): every flag, the out_dir
    and a resumed checkpoint checked before anything is written; one line naming the flag otherwise."""
    try:
        quant = model_quant_config(args)
    except ConfigError as e:
        sys.exit(f"train.py: error: {e}")
    from_gpt2 = args.init_from not in ("scratch", "resume") and (
        args.init_from.startswith("gpt2") or os.path.isdir(args.init_from) or args.init_from.endswith(".gguf"))
    if args.init_from not in ("scratch", "resume") and not from_gpt2:
        sys.exit(f"train.py: error: --init_from={args.init_from}: expected 'scratch', 'resume', a GPT-2 name "
                 f"(gpt2, gpt2-medium, ...), a local Hugging Face GPT-2 folder or a GPT-2 .gguf file")
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    try:
        check_out_dir(args.out_dir)
    except ValueError as e:
        sys.exit(f"train.py: error: --out_dir={args.out_dir}: {e}")
    if args.init_from != "resume" and os.path.lexists(ckpt_path) and not args.overwrite:
        sys.exit(f"train.py: error: --out_dir={args.out_dir} holds a checkpoint; continue it with --init_from=resume "
                 f"or replace it with --overwrite")
    checkpoint = None
    if args.init_from == "resume":
        try:
            checkpoint = load_checkpoint(ckpt_path, "cpu")
            missing = [k for k in ("optimizer", "iter_num", "best_val_loss", "rng") if k not in checkpoint]
            if missing:
                raise ValueError(f"{ckpt_path} is not a training checkpoint (it lacks {', '.join(missing)}); "
                                 f"fine-tune from it in a new --out_dir instead")
            apply_resume(args, given, checkpoint)
            quant = model_quant_config(args)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"train.py: error: --init_from=resume: {e}")
    return quant, checkpoint, from_gpt2


def batch_loader(args, data_dir, device):
    """get_batch(split, ix=None, generator=None): inputs and targets of block_size tokens at offsets ix (without,
    random offsets drawn from generator), from the flat uint16 token files, memory-mapped anew per batch (avoids
    numpy's memmap leak)."""
    def get_batch(split, ix=None, generator=None):
        data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
        if ix is None:  # train windows end before the --calib_tokens kept for calibration
            held = args.calib_tokens if split == "train" else 0
            ix = torch.randint(len(data) - held - args.block_size, (args.batch_size,), generator=generator)
        x = torch.stack([torch.from_numpy(data[i:i + args.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + args.block_size].astype(np.int64)) for i in ix])
        if device.startswith("cuda"):
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)
    return get_batch


def build_model(args, quant, meta, from_gpt2):
    """(model, model_args) of a new run: GPT-2 weights (into the quantized layers' latent weights when QAT is on)
    or a fresh GPT."""
    model_args = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                      bias=args.bias, vocab_size=meta["vocab_size"], dropout=args.dropout,
                      gelu_approximate=args.gelu_approximate, **quant)
    if not from_gpt2:
        try:
            return GPT(GPTConfig(**model_args)), model_args
        except ValueError as e:
            sys.exit(f"train.py: error: {e}")
    if meta["vocab_size"] != 50257:
        sys.exit(f"train.py: error: --init_from={args.init_from} needs a GPT-2 BPE dataset "
                 f"(e.g. --dataset=shakespeare), not --dataset={args.dataset}")
    if args.init_from.endswith(".gguf"):
        from quantization.gguf_export import load_gguf_gpt2 as load_pretrained
    else:
        from quantization.hf import load_hf_gpt2 as load_pretrained
    try:
        return load_pretrained(args.init_from, block_size=args.block_size, dropout=args.dropout, **quant)
    except (OSError, ValueError) as e:
        sys.exit(f"train.py: error: --init_from={args.init_from}: {e}")


def probe_supported():
    """--spinquant_probe needs the weights trained in their own basis with fixed rotations (the defaults)."""
    return spin_quant_qat.QAT_BASIS == "original" and not spin_quant_qat.QAT_LEARN_ROTATIONS


def probe_iters(args, iter_num):
    """How many QAT iterations --spinquant_probe runs each branch for, from a switch at iter_num: the flag, or with
    -1 (the default) a third of the iterations left (none where the QAT settings do not support a probe)."""
    if args.spinquant_probe >= 0:
        return args.spinquant_probe
    return (args.max_iters - iter_num) // 3 if probe_supported() else 0


def check_spinquant(args, model_args):
    try:
        check_qat(model_args)
    except ValueError as e:
        sys.exit(f"train.py: error: {e}")
    if args.spinquant_probe > 0 and not probe_supported():
        sys.exit(f"train.py: error: --spinquant_probe={args.spinquant_probe}: needs the weights trained in their own "
                 f"basis with fixed rotations (spin_quant_qat.QAT_BASIS 'original', QAT_LEARN_ROTATIONS 0)")
    for flag, low in (("spinquant_steps", 0), ("spinquant_nsamples", 1)):
        if getattr(args, flag) < low:
            sys.exit(f"train.py: error: --{flag}={getattr(args, flag)}: must be at least {low}")
    if args.spinquant_lr <= 0:
        sys.exit(f"train.py: error: --spinquant_lr={args.spinquant_lr}: must be positive")


def spinquant_rotate(args, qat_model, model_args, get_batch, iter_num, optimizer, lr, device_type):
    """Learn R1/R2 with the QAT quantizers on training sequences (weights frozen), once, when quantization
    switches on, and keep them only when they clearly beat no rotation on as many other training sequences:
    (the model QAT goes on with, its model_args, its optimizer, the choice, the probe: None, or where the rotations
    were kept and --spinquant_probe asks for one, (the unrotated model, its model_args, held-out sequences for the
    probe's choice); spin_quant_qat.rotate_for_qat)."""
    def draw(n):
        batches = []
        while sum(b.shape[0] for b in batches) < n:
            X, Y = get_batch("train")
            batches.append(torch.cat([X, Y[:, -1:]], dim=1))
        return torch.cat(batches)[:n]

    t = time.time()
    # the draws below (batches, random starts) come from a forked random state: training goes on with the random
    # numbers (dropout masks) it would have had without --spinquant, so keeping no rotation changes nothing
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device_type == "cuda" else []):
        learn, heldout = draw(args.spinquant_nsamples), draw(max(2, args.spinquant_nsamples))
        model, new_args, info, new_optimizer = rotate_for_qat(
            qat_model, model_args, learn, args.spinquant_steps, args.spinquant_lr, args.seed, optimizer=optimizer,
            heldout=heldout, optimizer_args=dict(weight_decay=args.weight_decay, learning_rate=lr,
                                                 betas=(args.beta1, args.beta2), device_type=device_type))
        probe = None
        if info["kept"] == "rotations" and probe_iters(args, iter_num) and iter_num < args.max_iters:
            probe = (qat_model, model_args, draw(max(2, args.spinquant_nsamples)))
    losses = info["losses"]
    print(f"iter {iter_num}: spinquant rotations learned in {time.time() - t:.1f}s, quantized loss "
          f"{losses[0] if losses else float('nan'):.4f} -> {losses[-1] if losses else float('nan'):.4f}; held-out "
          f"quantized loss without rotation {info['none']:.4f}, rotated {info['rotated']:.4f} ({info['z']:.1f} "
          f"standard errors); kept {info['kept']}")
    return model, new_args, new_optimizer, info["kept"], probe


class SpinQuantProbe:
    """--spinquant_probe: once the switch has kept the rotations, QAT runs N iterations with them and then the same
    N again without them, from the same weights, optimizer state and random state (the same batches and dropout
    masks), and keeps the rotations only if they are still CLEAR_Z standard errors better on held-out training
    sequences (per sequence, spin_quant.paired_gain), as the switch's own choice. The run then goes on from the kept
    branch's state, exactly as a run that had taken that branch from the switch. Nothing is evaluated or saved
    inside the probe. It holds two more copies of the weights and the optimizer state (the start, and the end of
    the rotated branch), in CPU memory."""

    def __init__(self, start, end, rotated, rotated_args, plain, plain_args, heldout, optimizer, scaler, data_rng,
                 device_type):
        self.start, self.end, self.heldout = start, end, heldout
        self.branches = {"rotations": (rotated, rotated_args), "no rotation": (plain, plain_args)}
        self.trained, self.optimizer, self.scaler, self.data_rng = plain, optimizer, scaler, data_rng
        self.device_type, self.branch, self.losses = device_type, "rotations", {}
        self.at_start = self.snapshot()

    def snapshot(self):
        """The training state, its tensors copied to CPU memory (the GPU holds only the model being trained)."""
        cuda = self.device_type == "cuda"
        return {"model": {k: v.detach().to("cpu", copy=True) for k, v in self.trained.state_dict().items()},
                "optimizer": tree_map(lambda v: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v,
                                      self.optimizer.state_dict()),
                "scaler": self.scaler.state_dict(),
                "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state() if cuda else None,
                "data_rng": self.data_rng.get_state()}

    def restore(self, state):
        self.trained.load_state_dict(state["model"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # it would keep the snapshot's tensors
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        self.data_rng.set_state(state["data_rng"])

    def score(self, model, device):
        training = model.training
        model.eval()
        self.losses[self.branch] = sample_losses(model, self.heldout, device)
        model.train(training)

    def next(self, device):
        """At the probe's end: (the model to train, its model_args, the iteration to go on from, the choice, or
        None while the other branch still has to run)."""
        self.score(self.branches[self.branch][0], device)
        if self.branch == "rotations":
            self.after_rotations = self.snapshot()
            self.restore(self.at_start)
            self.branch = "no rotation"
            return (*self.branches["no rotation"], self.start, None)
        _, z = paired_gain(self.losses["no rotation"], self.losses["rotations"])
        kept = "rotations" if z >= spin_quant.CLEAR_Z else "no rotation"
        if kept == "rotations":
            self.restore(self.after_rotations)
        print(f"iter {self.end}: spinquant probe after {self.end - self.start} QAT iterations each: held-out "
              f"quantized loss without rotation {self.losses['no rotation'].mean().item():.4f}, rotated "
              f"{self.losses['rotations'].mean().item():.4f} ({z:.1f} standard errors); kept {kept}")
        return (*self.branches[kept], self.end, kept)


def model_entries(raw_model, model_args):
    """The checkpoint's model entries. A RotatedQAT (--spinquant) is saved baked (an ordinary rotated QAT model,
    which sample.py and the tools load), with what a resumed run rebuilds it from under `spinquant_qat`."""
    if isinstance(raw_model, RotatedQAT):
        model_args, state = raw_model.checkpoint_state()
        return {"model": state, "model_args": model_args, "activations": stored_activations(raw_model.rotated),
                "spinquant_qat": raw_model.resume_state()}
    return {"model": raw_model.state_dict(), "model_args": model_args, "activations": stored_activations(raw_model)}


def get_lr(args, it):
    """Linear warm-up, then cosine decay to min_lr."""
    if not args.decay_lr:
        return args.learning_rate
    if it < args.warmup_iters:
        return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
    if it > args.lr_decay_iters:
        return args.min_lr
    ratio = (it - args.warmup_iters) / max(1, args.lr_decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.learning_rate - args.min_lr)


@torch.no_grad()
def estimate_loss(model, get_batch, ctx, eval_iters, seed):
    """Mean loss over eval_iters random batches of each split, drawn from a generator of their own seeded by `seed`:
    an evaluation never moves the random state training draws from (dropout masks on the CPU), so a run that
    evaluates less often (inside a --spinquant_probe) trains on exactly the same numbers, and two runs with the same
    seed score an iteration on the same batches."""
    out = {}
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    for split in ("train", "val"):
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split, generator=generator)
            with ctx:
                _, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def start_wandb(args):
    if wandb_needs_offline():
        os.environ["WANDB_MODE"] = "offline"
        print("wandb: no WANDB_API_KEY and no login: logging offline (wandb sync uploads it later)")
    try:
        import wandb
    except ImportError:
        sys.exit("train.py: error: --wandb_log: the wandb package is not installed (pip install wandb)")
    wandb.init(project=args.wandb_project, name=args.wandb_run_name, config=vars(args))
    return wandb


def main(argv=None):
    args, given = parse_args_given(argv)
    if not args.deterministic:
        return train(args, given)
    # deterministic kernels for this run only (main may run in a process that goes on: the tests)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it when it starts
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        return train(args, given)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


def train(args, given):
    quant, checkpoint, from_gpt2 = check_start(args, given)  # nothing is written before this
    ckpt_path, log_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "log.jsonl")
    procs = distributed.setup(args, resolve_device)  # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    device, (_, dtype), master = procs.device, resolve_device(args.device, args.dtype), procs.master
    if args.spinquant and procs.ddp:
        sys.exit("train.py: error: --spinquant: not supported with several processes (DDP); train on one")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    tokens_per_iter = procs.grad_accum * procs.world_size * args.batch_size * args.block_size
    if master:
        print(f"tokens per iteration: {tokens_per_iter:,}" + (f" (world size {procs.world_size})" if procs.ddp else ""))
    torch.manual_seed(args.seed + procs.rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ctx = autocast_context(device, dtype)

    data_dir = os.path.join(ROOT, "data", args.dataset)
    try:
        meta = load_dataset(data_dir, args.block_size)
    except FileNotFoundError as e:
        sys.exit(f"train.py: error: --dataset={args.dataset}: {e} (run python data/{args.dataset}/prepare.py first)")
    except ValueError as e:
        sys.exit(f"train.py: error: --dataset={args.dataset}: {e}")
    get_batch = batch_loader(args, data_dir, device)
    # Training batches come from one generator seeded alike on every process: each step draws the whole global
    # batch (grad_accum x world_size micro-batches) and each process takes its own micro-batches, so N processes
    # train on exactly the batches of one process with N times the gradient accumulation.
    data_rng = torch.Generator().manual_seed(args.seed)
    train_tokens = len(np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.uint16, mode="r"))
    if train_tokens - args.calib_tokens - args.block_size < 1:
        sys.exit(f"train.py: error: --calib_tokens={args.calib_tokens}: --dataset={args.dataset}'s train.bin has "
                 f"{train_tokens} tokens; keeping that many out leaves no training window of --block_size="
                 f"{args.block_size}")

    iter_num, best_val_loss = 0, 1e9
    if checkpoint is not None:
        model_args = checkpoint["model_args"]  # a resumed run keeps the architecture it was started with
        if meta["vocab_size"] > model_args["vocab_size"]:
            sys.exit(f"train.py: error: --init_from=resume: the dataset's vocabulary ({meta['vocab_size']}) is larger "
                     f"than the checkpoint's ({model_args['vocab_size']})")
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        if master:
            print(f"resuming from {ckpt_path} at iteration {iter_num}")
        try:
            model = GPT(GPTConfig(**model_args))
        except ValueError as e:
            sys.exit(f"train.py: error: {e}")
    else:
        model, model_args = build_model(args, quant, meta, from_gpt2)
    if args.spinquant:
        check_spinquant(args, model_args)
    elif args.spinquant_probe > 0:
        sys.exit(f"train.py: error: --spinquant_probe={args.spinquant_probe}: probes --spinquant's rotations; add "
                 f"--spinquant (or leave the flag out)")
    # --spinquant decides once, when quantization switches on (None until then); a resumed run keeps the decision
    spinquant_choice = None if args.spinquant else "off"
    if args.spinquant and checkpoint is not None:
        spinquant_choice = "rotations" if is_rotated(model_args) else checkpoint.get("spinquant_choice")
        if spinquant_choice == "off":  # saved by a run without --spinquant
            if iter_num > args.quantization_warmup_iters:
                sys.exit(f"train.py: error: --spinquant: {ckpt_path} was trained quantized without it from "
                         f"iteration {args.quantization_warmup_iters} to {iter_num}; resume a checkpoint saved at or "
                         f"before the switch (--quantization_warmup_iters), or leave the flag out")
            spinquant_choice = None  # nothing trained quantized yet: decide at the switch, as a --spinquant run does
    if checkpoint is not None and "spinquant_qat" in checkpoint:  # QAT in the original basis after the rotation
        if procs.ddp:
            sys.exit(f"train.py: error: --init_from=resume: {ckpt_path} trains through SpinQuant rotations "
                     f"(--spinquant), which runs on one process only; resume it without torchrun")
        model = RotatedQAT.from_resume_state(checkpoint["spinquant_qat"])
    elif checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        restore_activations(model, checkpoint.get("activations", {}))
    model.to(device)
    if master:
        try:
            os.makedirs(args.out_dir, exist_ok=True)
        except OSError as e:
            sys.exit(f"train.py: error: --out_dir={args.out_dir}: cannot be created ({e.strerror or e})")
        clean_stale_tmp(args.out_dir)
        if args.init_from != "resume" and os.path.exists(ckpt_path):  # --overwrite: a new run, a new log
            open(log_path, "w").close()
        print(f"parameters: {model.get_num_params() / 1e6:.2f}M")
        sites = {s: v for s, v in model_args["linear_variants"].items() if v != "linear"}
        if sites or model_args["act_quant"]:
            print(f"quantized linear sites: {sites or 'none'}; activation sites: "
                  f"{sorted(model_args['act_quant']) or 'none'}; quantization starts at iteration "
                  f"{args.quantization_warmup_iters}")

    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    trained = model.base if isinstance(model, RotatedQAT) else model  # RotatedQAT trains its base's parameters
    optimizer = trained.configure_optimizers(args.weight_decay, args.learning_rate, (args.beta1, args.beta2), device_type)
    if isinstance(model, RotatedQAT) and model.rotation_group() is not None:  # learned rotations (a resumed run)
        optimizer.add_param_group(model.rotation_group())
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
    raw_model = model
    if args.compile:
        if procs.ddp:  # dynamo's DDPOptimizer: one compiled graph per gradient bucket (overlap) or one graph (fusion)
            torch._dynamo.config.optimize_ddp = args.ddp_overlap == "buckets"
        model = torch.compile(model)
    eval_model = model  # evaluation runs on rank 0 alone, outside DDP
    if procs.ddp:
        model = distributed.wrap(model, args, device_type)
    has_quantizers = raw_model.embedding_spec is not None or any(
        hasattr(m, "enabled") and getattr(m, "spec", None) is not None for m in raw_model.modules())
    wandb = start_wandb(args) if args.wandb_log and master else None

    def log(record):
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb is not None:
            wandb.log(record)

    if checkpoint is not None:  # each process continues from its own random state
        rng = checkpoint["rng"][procs.rank] if procs.rank < len(checkpoint["rng"]) else checkpoint["rng"][0]
        torch.set_rng_state(rng["cpu"].cpu())  # loaded onto the device; random states are CPU byte tensors
        if device_type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"].cpu())
        if "data_rng" in checkpoint:
            data_rng.set_state(checkpoint["data_rng"].cpu())
        checkpoint = None  # free the memory
    resumed = args.init_from == "resume"
    nonfinite = torch.tensor(-1, device=device)  # the first iteration whose loss was nan or inf (checked lazily)
    probe = None  # --spinquant_probe under way (SpinQuantProbe)
    t0 = time.time()
    while True:
        if probe is not None and iter_num == probe.end:  # one branch of the probe done
            raw_model, model_args, iter_num, kept = probe.next(device)
            if kept is None:
                print(f"iter {probe.end}: spinquant probe: again without the rotations, from iteration {probe.start}")
            else:
                spinquant_choice, probe = kept, None
            model = eval_model = torch.compile(raw_model) if args.compile else raw_model
        lr = get_lr(args, iter_num)
        quantize = iter_num >= args.quantization_warmup_iters  # the full-precision warm-up ends here
        if quantize != raw_model.quantization_enabled:
            raw_model.set_quantization(quantize)
            if master and quantize and has_quantizers:
                print(f"iter {iter_num}: quantization on")
        quantized = quantize and has_quantizers
        if spinquant_choice is None and raw_model.quantization_enabled:
            raw_model, model_args, optimizer, spinquant_choice, race = spinquant_rotate(
                args, raw_model, model_args, get_batch, iter_num, optimizer, lr, device_type)
            model = eval_model = torch.compile(raw_model) if args.compile else raw_model
            if race is not None:
                end = min(iter_num + probe_iters(args, iter_num), args.max_iters)
                probe = SpinQuantProbe(iter_num, end, raw_model, model_args, *race, optimizer, scaler, data_rng,
                                       device_type)
                print(f"iter {iter_num}: spinquant probe: QAT with the rotations to iteration {end}, then the same "
                      f"iterations without them")
        if args.spinquant and is_rotated(model_args):  # the lr after the rotation (QAT_REWARM)
            lr = qat_lr(lr, iter_num, args.quantization_warmup_iters, args.warmup_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        last = iter_num >= args.max_iters
        # evaluate and checkpoint; a resumed run does not repeat the evaluation its checkpoint was written after
        # (rank 0 evaluates and decides; every process hands it its random state for the checkpoint)
        if (iter_num % args.eval_interval == 0 or last) and not resumed and probe is None:
            decision = [False]
            if master:
                losses = estimate_loss(eval_model, get_batch, ctx, args.eval_iters, seed=args.seed * 1_000_003 + iter_num)
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                log({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr,
                     "quantized": quantized})
                if not all(map(math.isfinite, losses.values())):
                    decision = [None]  # a model that computes nan or inf is never saved
                elif losses["val"] < best_val_loss or args.always_save_checkpoint or last:
                    best_val_loss = min(best_val_loss, losses["val"])
                    decision = [iter_num > 0]
            if procs.ddp:
                torch.distributed.broadcast_object_list(decision, src=0)
            if decision[0] is None:
                sys.exit(f"train.py: error: iter {iter_num}: the evaluated loss is not finite; nothing saved "
                         f"(try a lower --learning_rate)")
            if decision[0]:
                rng = distributed.rng_states(procs, device_type)
                if master:
                    save_checkpoint(ckpt_path, {
                        **model_entries(raw_model, model_args), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "iter_num": iter_num,
                        "best_val_loss": best_val_loss, "config": vars(args), "dataset": args.dataset,
                        "quantization_enabled": raw_model.quantization_enabled, "spinquant_choice": spinquant_choice,
                        "rng": rng, "data_rng": data_rng.get_state()})
                    print(f"saved checkpoint to {args.out_dir}/ckpt.pt")
        resumed = False
        if last or (iter_num == 0 and args.eval_only):
            break

        step_ix = torch.randint(train_tokens - args.calib_tokens - args.block_size,
                                (procs.grad_accum * procs.world_size, args.batch_size), generator=data_rng)
        step_loss = 0.0
        for micro_step in range(procs.grad_accum):
            X, Y = get_batch("train", step_ix[micro_step * procs.world_size + procs.rank])
            if procs.ddp:  # only sync gradients on the last micro-step
                model.require_backward_grad_sync = micro_step == procs.grad_accum - 1
            with ctx:
                _, loss = model(X, Y)
                loss = loss / procs.grad_accum
            scaler.scale(loss).backward()
            step_loss += loss.detach()
            nonfinite = torch.where((nonfinite < 0) & ~torch.isfinite(loss.detach()), iter_num, nonfinite)
        if args.grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        if iter_num % args.log_interval == 0 and procs.ddp:  # the logged loss is the whole global batch's
            torch.distributed.all_reduce(step_loss)
        if iter_num % args.log_interval == 0 and nonfinite.item() >= 0:
            sys.exit(f"train.py: error: iter {nonfinite.item()}: the training loss is not finite (nan or inf); stopped, "
                     f"nothing saved after the last checkpoint (try a lower --learning_rate or --grad_clip)")
        if iter_num % args.log_interval == 0 and master:
            if device_type == "cuda":
                torch.cuda.synchronize()
            t1 = time.time()
            dt, t0 = (t1 - t0) / (args.log_interval if iter_num > 0 else 1), t1
            lossf = step_loss.item() / procs.world_size
            branch = {} if probe is None else {"probe": probe.branch}
            print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, time {dt * 1000:.1f}ms, "
                  f"{tokens_per_iter / dt:,.0f} tok/s{', quantized' if quantized else ''}"
                  + (f", probe: {probe.branch}" if probe else ""))
            log({"iter": iter_num, "loss": lossf, "lr": lr, "ms": dt * 1000, "tok_per_s": tokens_per_iter / dt,
                 "quantized": quantized, **branch})
        iter_num += 1

    if device_type == "cuda":
        print(f"rank {procs.rank}: peak memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if wandb is not None:
        wandb.finish()
    distributed.finish(procs)


if __name__ == "__main__":
    distributed.run(main)
