"""
Train a GPT with quantization-aware training: full precision for --quantization_warmup_iters iterations,
then with every configured weight and activation quantizer on (straight-through estimator).

One process:       python train.py --linear_variant_attn=quantized_linear --quantize_linear_method=ternary_quant
Several (DDP):     torchrun --standalone --nproc_per_node=4 train.py --config=configs/gpt2_124m.toml
"""
import faulthandler
import json
import math
import os
import signal
import sys
import threading
import time
from datetime import timedelta

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import load_checkpoint, save_checkpoint, stored_activations, restore_activations
from configurator import ConfigError, apply_resume, model_quant_config, parse_args_given
from inference import autocast_context, resolve_device
from model import GPT, GPTConfig
from quantization.spin_quant import is_rotated
from safety import check_out_dir, clean_stale_tmp, wandb_needs_offline
from tokenizer import load_dataset

ROOT = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    args, given = parse_args_given(argv)
    try:
        quant = model_quant_config(args)
    except ConfigError as e:
        sys.exit(f"train.py: error: {e}")
    from_gpt2 = args.init_from not in ("scratch", "resume") and (
        args.init_from.startswith("gpt2") or os.path.isdir(args.init_from) or args.init_from.endswith(".gguf"))
    if args.init_from not in ("scratch", "resume") and not from_gpt2:
        sys.exit(f"train.py: error: --init_from={args.init_from}: expected 'scratch', 'resume', a GPT-2 name "
                 f"(gpt2, gpt2-medium, ...), a local Hugging Face GPT-2 folder or a GPT-2 .gguf file")
    # nothing is written before every flag, the data and any checkpoint have been checked
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

    # distributed setup: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp and args.device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # before CUDA starts: no stray context on GPU 0
    device, dtype = resolve_device(args.device, args.dtype)
    if ddp:
        if args.ddp_bucket_cap_mb <= 0 or args.ddp_timeout <= 0:
            bad = "ddp_bucket_cap_mb" if args.ddp_bucket_cap_mb <= 0 else "ddp_timeout"
            sys.exit(f"train.py: error: --{bad}={getattr(args, bad)}: expected a positive number")
        backend = args.backend if args.backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
        if args.ddp_grad_compress == "bf16" and backend != "nccl":
            sys.exit(f"train.py: error: --ddp_grad_compress=bf16 needs the nccl backend (got {backend}); "
                     f"use fp16 or none")
        init_process_group(backend=backend, timeout=timedelta(seconds=args.ddp_timeout))
        rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        exit_on_sigterm(rank)
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid>: where a stuck process waits
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        if args.gradient_accumulation_steps % world_size:
            sys.exit(f"train.py: error: --gradient_accumulation_steps={args.gradient_accumulation_steps} "
                     f"must be divisible by the number of processes ({world_size})")
        grad_accum = args.gradient_accumulation_steps // world_size
    else:
        rank, world_size, grad_accum = 0, 1, args.gradient_accumulation_steps
    master = rank == 0
    if args.spinquant and ddp:
        sys.exit("train.py: error: --spinquant: not supported with several processes (DDP); train on one")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    tokens_per_iter = grad_accum * world_size * args.batch_size * args.block_size
    if master:
        print(f"tokens per iteration: {tokens_per_iter:,}" + (f" (world size {world_size})" if ddp else ""))
    torch.manual_seed(args.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ctx = autocast_context(device, dtype)

    # data: flat uint16 token files, memory-mapped anew per batch (avoids numpy's memmap leak)
    data_dir = os.path.join(ROOT, "data", args.dataset)
    try:
        meta = load_dataset(data_dir, args.block_size)
    except FileNotFoundError as e:
        sys.exit(f"train.py: error: --dataset={args.dataset}: {e} (run python data/{args.dataset}/prepare.py first)")
    except ValueError as e:
        sys.exit(f"train.py: error: --dataset={args.dataset}: {e}")

    # Training batches come from one generator seeded alike on every process: each step draws the whole global
    # batch (grad_accum x world_size micro-batches) and each process takes its own micro-batches, so N processes
    # train on exactly the batches of one process with N times the gradient accumulation.
    data_rng = torch.Generator().manual_seed(args.seed)
    train_tokens = len(np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.uint16, mode="r"))

    def get_batch(split, ix=None):
        data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
        if ix is None:
            ix = torch.randint(len(data) - args.block_size, (args.batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + args.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + args.block_size].astype(np.int64)) for i in ix])
        if device_type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    # model
    iter_num, best_val_loss = 0, 1e9
    model_args = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                      bias=args.bias, vocab_size=meta["vocab_size"], dropout=args.dropout,
                      gelu_approximate=args.gelu_approximate, **quant)
    if checkpoint is not None:
        model_args = checkpoint["model_args"]  # a resumed run keeps the architecture it was started with
        if meta["vocab_size"] > model_args["vocab_size"]:
            sys.exit(f"train.py: error: --init_from=resume: the dataset's vocabulary ({meta['vocab_size']}) is larger "
                     f"than the checkpoint's ({model_args['vocab_size']})")
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        if master:
            print(f"resuming from {ckpt_path} at iteration {iter_num}")
    if from_gpt2:  # GPT-2 weights (into the quantized layers' latent weights when QAT is on)
        if meta["vocab_size"] != 50257:
            sys.exit(f"train.py: error: --init_from={args.init_from} needs a GPT-2 BPE dataset "
                     f"(e.g. --dataset=shakespeare), not --dataset={args.dataset}")
        if args.init_from.endswith(".gguf"):
            from quantization.gguf_export import load_gguf_gpt2 as load_pretrained
        else:
            from quantization.hf import load_hf_gpt2 as load_pretrained
        try:
            model, model_args = load_pretrained(args.init_from, block_size=args.block_size, dropout=args.dropout, **quant)
        except (OSError, ValueError) as e:
            sys.exit(f"train.py: error: --init_from={args.init_from}: {e}")
    else:
        try:
            model = GPT(GPTConfig(**model_args))
        except ValueError as e:
            sys.exit(f"train.py: error: {e}")
    if args.spinquant:
        from quantization.spin_quant import check_qat
        try:
            check_qat(model_args)
        except ValueError as e:
            sys.exit(f"train.py: error: {e}")
        for flag, low in (("spinquant_steps", 0), ("spinquant_nsamples", 1)):
            if getattr(args, flag) < low:
                sys.exit(f"train.py: error: --{flag}={getattr(args, flag)}: must be at least {low}")
        if args.spinquant_lr <= 0:
            sys.exit(f"train.py: error: --spinquant_lr={args.spinquant_lr}: must be positive")
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        restore_activations(model, checkpoint.get("activations", {}))
    model.to(device)
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        clean_stale_tmp(args.out_dir)
        if args.init_from != "resume" and os.path.exists(ckpt_path):  # --overwrite: a new run, a new log
            open(os.path.join(args.out_dir, "log.jsonl"), "w").close()
        print(f"parameters: {model.get_num_params() / 1e6:.2f}M")
        sites = {s: v for s, v in model_args["linear_variants"].items() if v != "linear"}
        if sites or model_args["act_quant"]:
            print(f"quantized linear sites: {sites or 'none'}; activation sites: "
                  f"{sorted(model_args['act_quant']) or 'none'}; quantization starts at iteration "
                  f"{args.quantization_warmup_iters}")

    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    optimizer = model.configure_optimizers(args.weight_decay, args.learning_rate, (args.beta1, args.beta2), device_type)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
    raw_model = model
    if args.compile:
        if ddp:  # dynamo's DDPOptimizer: one compiled graph per gradient bucket (overlap) or one graph (fusion)
            torch._dynamo.config.optimize_ddp = args.ddp_overlap == "buckets"
        model = torch.compile(model)
    eval_model = model  # evaluation runs on rank 0 alone, outside DDP
    if ddp:  # buffers are constants (the causal mask) or per-process records (stored activations): no broadcast
        # gradient_as_bucket_view: the gradients live in the all-reduce buckets (no copy, one gradient-sized
        # buffer less). Under torch.compile with --ddp_overlap=buckets, dynamo's DDPOptimizer splits the compiled graph
        # at these buckets' boundaries, so each bucket's all-reduce starts while the backward pass of earlier layers
        # still runs; --ddp_overlap=off keeps one graph (fuses more) and all-reduces after the backward pass.
        model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None,
                    broadcast_buffers=False, bucket_cap_mb=args.ddp_bucket_cap_mb, gradient_as_bucket_view=True)
        if args.ddp_grad_compress != "none":  # half the bytes on the wire; the optimizer still sees fp32
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
            model.register_comm_hook(None, getattr(default_hooks, f"{args.ddp_grad_compress}_compress_hook"))

    has_quantizers = raw_model.embedding_spec is not None or any(
        hasattr(m, "enabled") and getattr(m, "spec", None) is not None for m in raw_model.modules())

    def set_phase(it):
        """Switch the quantizers on at quantization_warmup_iters; returns whether the model now computes quantized."""
        quantize = it >= args.quantization_warmup_iters
        if quantize != raw_model.quantization_enabled:
            raw_model.set_quantization(quantize)
            if master and quantize and has_quantizers:
                print(f"iter {it}: quantization on")
        return quantize and has_quantizers

    @torch.no_grad()
    def estimate_loss():
        out = {}
        eval_model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(args.eval_iters)
            for k in range(args.eval_iters):
                X, Y = get_batch(split)
                with ctx:
                    _, loss = eval_model(X, Y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        eval_model.train()
        return out

    def get_lr(it):
        if not args.decay_lr:
            return args.learning_rate
        if it < args.warmup_iters:
            return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
        if it > args.lr_decay_iters:
            return args.min_lr
        ratio = (it - args.warmup_iters) / max(1, args.lr_decay_iters - args.warmup_iters)
        return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.learning_rate - args.min_lr)

    log_path = os.path.join(args.out_dir, "log.jsonl")

    def log(record):
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if args.wandb_log:
            wandb.log(record)

    if args.wandb_log and master:
        if wandb_needs_offline():
            os.environ["WANDB_MODE"] = "offline"
            print("wandb: no WANDB_API_KEY and no login: logging offline (wandb sync uploads it later)")
        try:
            import wandb
        except ImportError:
            sys.exit("train.py: error: --wandb_log: the wandb package is not installed (pip install wandb)")
        wandb.init(project=args.wandb_project, name=args.wandb_run_name, config=vars(args))
    if checkpoint is not None:  # each process continues from its own random state
        rng = checkpoint["rng"][rank] if rank < len(checkpoint["rng"]) else checkpoint["rng"][0]
        # the checkpoint was loaded onto the device; random states are CPU byte tensors
        torch.set_rng_state(rng["cpu"].cpu())
        if device_type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"].cpu())
        if "data_rng" in checkpoint:
            data_rng.set_state(checkpoint["data_rng"].cpu())
        checkpoint = None  # free the memory
    resumed = args.init_from == "resume"

    def rng_states():
        """Every process's random state (rank order), gathered on all of them."""
        rng = {"cpu": torch.get_rng_state()}
        if device_type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        if not ddp:
            return [rng]
        states = [None] * world_size
        torch.distributed.all_gather_object(states, rng)
        return states

    def save(it, val_loss, rng):
        save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), {
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "model_args": model_args, "iter_num": it, "best_val_loss": val_loss, "config": vars(args),
            "dataset": args.dataset, "quantization_enabled": raw_model.quantization_enabled,
            "activations": stored_activations(raw_model), "rng": rng, "data_rng": data_rng.get_state()})

    def spinquant_rotate(qat_model):
        """Learn R1/R2 with the QAT quantizers on training sequences (weights frozen), once, when quantization
        switches on; QAT then trains the rotated weights with qat_optimizer's AdamW (see spin_quant.py's QAT_*)."""
        from quantization.spin_quant import rotate_for_qat
        batches = []
        while sum(b.shape[0] for b in batches) < args.spinquant_nsamples:
            X, Y = get_batch("train")
            batches.append(torch.cat([X, Y[:, -1:]], dim=1))
        t = time.time()
        rotated, new_args, losses, new_optimizer = rotate_for_qat(
            qat_model, model_args, torch.cat(batches)[:args.spinquant_nsamples], args.spinquant_steps,
            args.spinquant_lr, args.seed, optimizer=optimizer, optimizer_args=dict(weight_decay=args.weight_decay,
                learning_rate=lr, betas=(args.beta1, args.beta2), device_type=device_type))
        if master:
            print(f"iter {iter_num}: spinquant rotations learned in {time.time() - t:.1f}s, quantized loss "
                  f"{losses[0] if losses else float('nan'):.4f} -> {losses[-1] if losses else float('nan'):.4f}")
        return rotated, new_args, new_optimizer

    nonfinite = torch.tensor(-1, device=device)  # the first iteration whose loss was nan or inf (checked lazily)
    t0 = time.time()
    while True:
        lr = get_lr(iter_num)
        quantized = set_phase(iter_num)
        if args.spinquant and raw_model.quantization_enabled and not is_rotated(model_args):
            raw_model, model_args, optimizer = spinquant_rotate(raw_model)
            model = eval_model = torch.compile(raw_model) if args.compile else raw_model
        if args.spinquant and is_rotated(model_args):  # the lr after the rotation (QAT_REWARM)
            from quantization.spin_quant import qat_lr
            lr = qat_lr(lr, iter_num, args.quantization_warmup_iters, args.warmup_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        last = iter_num >= args.max_iters
        # evaluate and checkpoint; a resumed run does not repeat the evaluation its checkpoint was written after
        # (rank 0 evaluates and decides; every process hands it its random state for the checkpoint)
        if (iter_num % args.eval_interval == 0 or last) and not resumed:
            decision = [False]
            if master:
                losses = estimate_loss()
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                log({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr,
                     "quantized": quantized})
                if not all(map(math.isfinite, losses.values())):
                    decision = [None]  # a model that computes nan or inf is never saved
                elif losses["val"] < best_val_loss or args.always_save_checkpoint or last:
                    best_val_loss = min(best_val_loss, losses["val"])
                    decision = [iter_num > 0]
            if ddp:
                torch.distributed.broadcast_object_list(decision, src=0)
            if decision[0] is None:
                sys.exit(f"train.py: error: iter {iter_num}: the evaluated loss is not finite; nothing saved "
                         f"(try a lower --learning_rate)")
            if decision[0]:
                rng = rng_states()
                if master:
                    save(iter_num, best_val_loss, rng)
                    print(f"saved checkpoint to {args.out_dir}/ckpt.pt")
        resumed = False
        if last or (iter_num == 0 and args.eval_only):
            break

        step_ix = torch.randint(train_tokens - args.block_size, (grad_accum * world_size, args.batch_size),
                                generator=data_rng)
        step_loss = 0.0
        for micro_step in range(grad_accum):
            X, Y = get_batch("train", step_ix[micro_step * world_size + rank])
            if ddp:  # only sync gradients on the last micro-step
                model.require_backward_grad_sync = micro_step == grad_accum - 1
            with ctx:
                _, loss = model(X, Y)
                loss = loss / grad_accum
            scaler.scale(loss).backward()
            step_loss += loss.detach()
            nonfinite = torch.where((nonfinite < 0) & ~torch.isfinite(loss.detach()), iter_num, nonfinite)
        if args.grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        if iter_num % args.log_interval == 0 and ddp:  # the logged loss is the whole global batch's
            torch.distributed.all_reduce(step_loss)
        if iter_num % args.log_interval == 0 and nonfinite.item() >= 0:
            sys.exit(f"train.py: error: iter {nonfinite.item()}: the training loss is not finite (nan or inf); stopped, "
                     f"nothing saved after the last checkpoint (try a lower --learning_rate or --grad_clip)")
        if iter_num % args.log_interval == 0 and master:
            if device_type == "cuda":
                torch.cuda.synchronize()
            t1 = time.time()
            dt, t0 = (t1 - t0) / (args.log_interval if iter_num > 0 else 1), t1
            lossf = step_loss.item() / world_size
            print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, time {dt * 1000:.1f}ms, "
                  f"{tokens_per_iter / dt:,.0f} tok/s{', quantized' if quantized else ''}")
            log({"iter": iter_num, "loss": lossf, "lr": lr, "ms": dt * 1000, "tok_per_s": tokens_per_iter / dt,
                 "quantized": quantized})
        iter_num += 1

    if device_type == "cuda":
        print(f"rank {rank}: peak memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if args.wandb_log and master:
        wandb.finish()
    if ddp:  # wait for rank 0's last checkpoint before tearing the group down
        torch.distributed.barrier()
        destroy_process_group()


STOPPING = threading.Lock()  # taken by whichever says first why this process stops (one line, not two)


def exit_on_sigterm(rank):
    """torchrun sends SIGTERM to the other processes when one fails: say so in one line and exit, also while this
    process waits inside a collective (where a Python signal handler would not run until the wait returns)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # Python's C-level handler writes the signal number
    signal.set_wakeup_fd(write_fd)                              # to write_fd at once, whatever the main thread does

    def watch():
        while os.read(read_fd, 1) != bytes([signal.SIGTERM]):
            pass
        if STOPPING.acquire(blocking=False):
            print(f"train.py: error: rank {rank} stopped by torchrun (SIGTERM: another process of the job failed, or "
                  f"the job was interrupted); continue from the last checkpoint with --init_from=resume",
                  file=sys.stderr, flush=True)
        os._exit(1)  # also when the main thread is already stopping: its exit may wait on a broken process group
    threading.Thread(target=watch, daemon=True).start()


def lost_peer(e):
    """Whether an error is a collective failing because another process of a DDP job died or timed out."""
    text = str(e).lower()
    return "RANK" in os.environ and (isinstance(e, torch.distributed.DistError) or any(
        w in text for w in ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout")))


def leave_ddp_process(code):
    """A DDP process leaves without the interpreter's shutdown. DDP's reducer keeps the process group alive past
    destroy_process_group, so without this the group would be destroyed during finalization, when its worker
    threads can no longer take the GIL: the process aborts ("terminate called without an active exception") or
    blocks, after its work is done and saved (checkpoints are written by rename, logs line by line)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__" and "RANK" not in os.environ:
    main()
elif __name__ == "__main__":
    try:  # a process of a torchrun job
        main()
        leave_ddp_process(0)
    except SystemExit as e:  # train.py's own one-line errors: printed as sys.exit would, then leave
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        leave_ddp_process(e.code if isinstance(e.code, int) else 0 if e.code is None else 1)
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        if STOPPING.acquire(blocking=False):
            print(f"train.py: error: rank {os.environ['RANK']}: lost contact with another process of the job "
                  f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no detail'}); "
                  f"continue from the last checkpoint with --init_from=resume", file=sys.stderr, flush=True)
        leave_ddp_process(1)  # not sys.exit: shutting the interpreter down with a broken process group can block
