"""
Train a GPT with quantization-aware training: full precision for --quantization_warmup_iters iterations,
then with every configured weight and activation quantizer on (straight-through estimator).

One process:       python train.py --linear_variant_attn=quantized_linear --quantize_linear_method=ternary_quant
Several (DDP):     torchrun --standalone --nproc_per_node=4 train.py --config=configs/gpt2_124m.toml
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import load_checkpoint, save_checkpoint, stored_activations, restore_activations
from configurator import ConfigError, model_quant_config, parse_args
from model import GPT, GPTConfig
from tokenizer import load_meta

ROOT = os.path.dirname(os.path.abspath(__file__))


def resolve_device(device, dtype):
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


def autocast_context(device, dtype):
    """Mixed precision for float16/bfloat16, nothing for float32."""
    if dtype == "float32":
        return nullcontext()
    ptdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return torch.amp.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=ptdtype)


def main(argv=None):
    args = parse_args(argv)
    try:
        quant = model_quant_config(args)
    except ConfigError as e:
        sys.exit(f"train.py: error: {e}")
    from_gpt2 = args.init_from not in ("scratch", "resume") and (
        args.init_from.startswith("gpt2") or os.path.isdir(args.init_from) or args.init_from.endswith(".gguf"))
    if args.init_from not in ("scratch", "resume") and not from_gpt2:
        sys.exit(f"train.py: error: --init_from={args.init_from}: expected 'scratch', 'resume', a GPT-2 name "
                 f"(gpt2, gpt2-medium, ...), a local Hugging Face GPT-2 folder or a GPT-2 .gguf file")

    # distributed setup: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    ddp = int(os.environ.get("RANK", -1)) != -1
    device, dtype = resolve_device(args.device, args.dtype)
    if ddp:
        backend = args.backend if args.backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
        init_process_group(backend=backend)
        rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
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
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    tokens_per_iter = grad_accum * world_size * args.batch_size * args.block_size
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        print(f"tokens per iteration: {tokens_per_iter:,}" + (f" (world size {world_size})" if ddp else ""))
    torch.manual_seed(args.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ctx = autocast_context(device, dtype)

    # data: flat uint16 token files, memory-mapped anew per batch (avoids numpy's memmap leak)
    data_dir = os.path.join(ROOT, "data", args.dataset)
    for split in ("train", "val"):
        if not os.path.exists(os.path.join(data_dir, f"{split}.bin")):
            sys.exit(f"train.py: error: --dataset={args.dataset}: {data_dir}/{split}.bin not found "
                     f"(run python data/{args.dataset}/prepare.py first)")
    meta = load_meta(data_dir)

    def get_batch(split):
        data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - args.block_size, (args.batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + args.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + args.block_size].astype(np.int64)) for i in ix])
        if device_type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    # model
    iter_num, best_val_loss, checkpoint = 0, 1e9, None
    model_args = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                      bias=args.bias, vocab_size=meta["vocab_size"], dropout=args.dropout,
                      gelu_approximate=args.gelu_approximate, **quant)
    if args.init_from == "resume":
        ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
        try:
            checkpoint = load_checkpoint(ckpt_path, device)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"train.py: error: --init_from=resume: {e}")
        model_args = checkpoint["model_args"]  # a resumed run keeps the architecture it was started with
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
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        restore_activations(model, checkpoint.get("activations", {}))
    model.to(device)
    if master:
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
        model = torch.compile(model)
    eval_model = model  # evaluation runs on rank 0 alone, outside DDP
    if ddp:  # buffers are constants (the causal mask) or per-process records (stored activations): no broadcast
        model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None,
                    broadcast_buffers=False)

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
        import wandb
        wandb.init(project=args.wandb_project, name=args.wandb_run_name, config=vars(args))
    if checkpoint is not None:  # each process continues from its own random state
        rng = checkpoint["rng"][rank] if rank < len(checkpoint["rng"]) else checkpoint["rng"][0]
        torch.set_rng_state(rng["cpu"])
        if device_type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
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
            "activations": stored_activations(raw_model), "rng": rng})

    t0 = time.time()
    while True:
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr
        quantized = set_phase(iter_num)
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
                if losses["val"] < best_val_loss or args.always_save_checkpoint or last:
                    best_val_loss = min(best_val_loss, losses["val"])
                    decision = [iter_num > 0]
            if ddp:
                torch.distributed.broadcast_object_list(decision, src=0)
            if decision[0]:
                rng = rng_states()
                if master:
                    save(iter_num, best_val_loss, rng)
                    print(f"saved checkpoint to {args.out_dir}/ckpt.pt")
        resumed = False
        if last or (iter_num == 0 and args.eval_only):
            break

        for micro_step in range(grad_accum):
            X, Y = get_batch("train")
            if ddp:  # only sync gradients on the last micro-step
                model.require_backward_grad_sync = micro_step == grad_accum - 1
            with ctx:
                _, loss = model(X, Y)
                loss = loss / grad_accum
            scaler.scale(loss).backward()
        if args.grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        if iter_num % args.log_interval == 0 and master:
            if device_type == "cuda":
                torch.cuda.synchronize()
            t1 = time.time()
            dt, t0 = (t1 - t0) / (args.log_interval if iter_num > 0 else 1), t1
            lossf = loss.item() * grad_accum
            print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, time {dt * 1000:.1f}ms, "
                  f"{tokens_per_iter / dt:,.0f} tok/s{', quantized' if quantized else ''}")
            log({"iter": iter_num, "loss": lossf, "lr": lr, "ms": dt * 1000, "tok_per_s": tokens_per_iter / dt,
                 "quantized": quantized})
        iter_num += 1

    if ddp:  # wait for rank 0's last checkpoint before tearing the group down
        torch.distributed.barrier()
        destroy_process_group()


if __name__ == "__main__":
    main()
