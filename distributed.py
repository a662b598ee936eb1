"""The processes of a torchrun (DDP) job, for train.py: joining the group, wrapping the model, sharing random states,
and leaving in one line when another process fails. One process (no RANK in the environment) passes through."""
import faulthandler
import os
import signal
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

STOPPING = threading.Lock()  # taken by whichever says first why this process stops (one line, not two)


@dataclass
class Processes:
    ddp: bool
    rank: int
    world_size: int
    grad_accum: int  # micro-batches of this process per optimizer step
    device: str

    @property
    def master(self):
        return self.rank == 0


def setup(args, resolve_device):
    """Join the torchrun job the environment describes (RANK, LOCAL_RANK, WORLD_SIZE), or stand alone. Exits with
    one line naming the flag when the job cannot run as asked."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp and args.device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # before CUDA starts: no stray context on GPU 0
    device, _ = resolve_device(args.device, args.dtype)
    if not ddp:
        return Processes(False, 0, 1, args.gradient_accumulation_steps, device)
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
    return Processes(True, rank, world_size, args.gradient_accumulation_steps // world_size, device)


def wrap(model, args, device_type):
    """The model as DDP trains it. Buffers are constants (the causal mask) or per-process records (stored
    activations): no broadcast. gradient_as_bucket_view: the gradients live in the all-reduce buckets (no copy,
    one gradient-sized buffer less). Under torch.compile with --ddp_overlap=buckets, dynamo's DDPOptimizer splits
    the compiled graph at these buckets' boundaries, so each bucket's all-reduce starts while the backward pass of
    earlier layers still runs; --ddp_overlap=off keeps one graph (fuses more) and all-reduces after it."""
    model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None,
                broadcast_buffers=False, bucket_cap_mb=args.ddp_bucket_cap_mb, gradient_as_bucket_view=True)
    if args.ddp_grad_compress != "none":  # half the bytes on the wire; the optimizer still sees fp32
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        model.register_comm_hook(None, getattr(default_hooks, f"{args.ddp_grad_compress}_compress_hook"))
    return model


def rng_states(procs, device_type):
    """Every process's random state (rank order), gathered on all of them."""
    rng = {"cpu": torch.get_rng_state()}
    if device_type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    if not procs.ddp:
        return [rng]
    states = [None] * procs.world_size
    torch.distributed.all_gather_object(states, rng)
    return states


def finish(procs):
    """The end of a run: a DDP process waits for rank 0's last checkpoint, tears the group down and leaves at once
    (leave_ddp_process): returning would free the training loop's DDP model on the way out, and the reducer's
    teardown could then block with the work done and saved (seen as a resumed 2-process test run that never
    exited)."""
    if procs.ddp:
        torch.distributed.barrier()
        destroy_process_group()
        leave_ddp_process(0)


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


def run(main):
    """Run main() as one process, or as a process of a torchrun job (leaving in one line if another fails)."""
    if "RANK" not in os.environ:
        return main()
    try:
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
