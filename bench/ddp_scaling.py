"""Multi-GPU training over NCCL, measured in one command (train.py under torchrun, as a user runs it):

    python bench/ddp_scaling.py --nproc=2 --results_dir=bench/results

1. env: `nvidia-smi topo -m`, GPUs, torch/NCCL versions, the NCCL settings the children get.
2. probe: a pure NCCL all-reduce of the GPT-2 124M model's gradients (fp32, bf16, and fp32 in 25 MB buckets),
   with the transport NCCL picked (NCCL_DEBUG=INFO lines "via ...").
3. throughput: the GPT-2 124M config (configs/gpt2_124m.toml on GPT-2 BPE Shakespeare, block 1024, batch 16 per
   GPU, torch.compile, bf16 autocast), full precision, W8 per-channel QAT and ternary QAT: tokens/s on one GPU
   (--nproc independent single-GPU runs at once, one per GPU, so the host is as loaded as in the DDP run) and on
   --nproc GPUs (torchrun, gradient accumulation --nproc, so every GPU does the same work per step as the single
   GPU), scaling, peak memory per GPU.
4. curve: one GPU with gradient accumulation --nproc against --nproc GPUs, the same global batch (train.py draws
   one global batch per step, shared by all processes), 500 steps through the warm-up -> quantization switch.
5. kill: a --nproc GPU run whose rank 1 gets SIGKILL after a checkpoint; then --init_from=resume on --nproc GPUs,
   compared with the uninterrupted run of part 4.

Parts run in priority order and each is skipped when --budget_s would be exceeded; the markdown table is
rewritten after every part (results_dir/ddp_scaling_<gpu>.md), every log goes to results_dir/ddp_scaling_logs/.
Checkpoints and run folders go to --work_dir (not copied back).
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# NVLink multicast (NVLS) off, as these machines need; every child inherits these
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "PYTHONUNBUFFERED": "1"}
VARIANTS = {
    "w8": ("W8 symmetric per-channel", ["--linear_variant_attn=quantized_linear",
                                        "--linear_variant_mlp=quantized_linear",
                                        "--quantize_linear_method=symmetric_quant", "--quantize_linear_bits=8",
                                        "--quantize_linear_granularity=per_channel"]),
    "ternary": ("ternary (absmean per-tensor)", ["--linear_variant_attn=quantized_linear",
                                                 "--linear_variant_mlp=quantized_linear",
                                                 "--quantize_linear_method=ternary_quant",
                                                 "--quantize_linear_granularity=per_tensor"]),
    "fp": ("full precision", []),
}
GPT2_FLAGS = ["--config=configs/gpt2_124m.toml", "--dataset=shakespeare", "--batch_size=16", "--block_size=1024",
              "--eval_interval=1000000", "--eval_iters=1", "--quantization_warmup_iters=0", "--compile=True"]
# the loss-curve model: nanoGPT's baby GPT shape (6 x 384, block 256) on char-level Shakespeare, eager, no dropout
# (dropout draws per process), ternary QAT switching on at step 250
CURVE_FLAGS = ["--dataset=shakespeare_char", "--n_layer=6", "--n_head=6", "--n_embd=384", "--block_size=256",
               "--batch_size=32", "--dropout=0.0", "--learning_rate=1e-3", "--warmup_iters=100", "--min_lr=1e-4",
               "--beta2=0.99", "--eval_interval=100", "--eval_iters=20", "--log_interval=1", "--compile=False",
               "--always_save_checkpoint", "--linear_variant_attn=quantized_linear",
               "--linear_variant_mlp=quantized_linear", "--quantize_linear_method=ternary_quant",
               "--quantize_linear_granularity=per_tensor"]


def worker_pid(torchrun_pid, rank):
    """The pid of the train.py process of `rank` that torchrun (pid torchrun_pid) started, or None."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != torchrun_pid:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def gpu_names():
    """The GPUs' names from nvidia-smi (asking torch would start a CUDA context in this process)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def read_log(out_dir):
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:  # a line train.py is still writing
                pass
    return records


def losses(records, key="loss"):
    return {r["iter"]: r[key] for r in records if key in r}


# ---------------------------------------------------------------------------------------------------------------
# the NCCL probe (runs under torchrun: python bench/ddp_scaling.py --probe_worker ...)

def probe_worker(numel, bucket_mb, out):
    import torch
    import torch.distributed as dist
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rows = []
    for label, dtype, bucket in (("fp32, one tensor", torch.float32, 0), ("bf16, one tensor", torch.bfloat16, 0),
                                 (f"fp32, {bucket_mb} MB buckets", torch.float32, bucket_mb)):
        x = torch.ones(numel, dtype=dtype, device="cuda")
        per = bucket * 2**20 // x.element_size() if bucket else numel
        chunks = list(x.split(per))

        def once():
            works = [dist.all_reduce(c, async_op=True) for c in chunks]
            for w in works:
                w.wait()
        for _ in range(3):
            once()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 10
        start.record()
        for _ in range(reps):
            once()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / reps
        nbytes = x.numel() * x.element_size()
        algbw = nbytes / (ms / 1000) / 1e9
        rows.append({"what": label, "MB": nbytes / 2**20, "ms": ms, "algbw_GBs": algbw,
                     "busbw_GBs": algbw * 2 * (world - 1) / world})
        del x, chunks
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "rows": rows}, f)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------

class GpuMemory:
    """Samples nvidia-smi's memory.used per GPU in the background; peak() since the last reset()."""

    def __init__(self):
        self.peaks, self.lock, self.stop = {}, threading.Lock(), False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        if shutil.which("nvidia-smi"):
            self.thread.start()

    def loop(self):
        while not self.stop:
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                with self.lock:
                    for line in out.strip().splitlines():
                        i, used = (int(v) for v in line.split(","))
                        self.peaks[i] = max(self.peaks.get(i, 0), used)
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            time.sleep(0.5)

    def reset(self):
        with self.lock:
            self.peaks = {}

    def peak(self):
        with self.lock:
            return dict(self.peaks)


class Bench:
    def __init__(self, args):
        self.args, self.t0 = args, time.time()
        self.logs = os.path.join(args.results_dir, "ddp_scaling_logs")
        os.makedirs(self.logs, exist_ok=True)
        self.work = args.work_dir or tempfile.mkdtemp(prefix="ddp_scaling_")
        os.makedirs(self.work, exist_ok=True)
        self.env = dict(os.environ, **CHILD_ENV)
        self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // (2 * args.nproc))))
        self.memory = GpuMemory()
        self.report = {"env": {}, "probe": None, "throughput": [], "curve": None, "kill": None, "skipped": [],
                       "durations": {}}
        self.gpu = (gpu_names() or ["cpu"])[0]

    def left(self):
        return self.args.budget_s - (time.time() - self.t0)

    def say(self, line):
        print(f"[{time.time() - self.t0:6.0f}s] {line}", flush=True)

    # -- processes ---------------------------------------------------------------------------------------------

    def torchrun(self, nproc):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]

    def start(self, name, cmd, env=None):
        log = open(os.path.join(self.logs, f"{name}.log"), "w")
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env or self.env,
                                start_new_session=True)
        proc.log_file, proc.name = log, name
        return proc

    def finish(self, proc, deadline):
        """Wait for proc until the wall-clock deadline; on timeout kill its whole session. Returns the exit code."""
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            proc.log_file.write("\n[ddp_scaling] killed: out of time budget\n")
            self.say(f"{proc.name}: out of time, killed")
        proc.log_file.close()
        return rc

    def output(self, name):
        with open(os.path.join(self.logs, f"{name}.log")) as f:
            return f.read()

    def keep_log(self, name, out_dir):
        src = os.path.join(out_dir, "log.jsonl")
        if os.path.exists(src):
            shutil.copy(src, os.path.join(self.logs, f"{name}.jsonl"))

    def prepare_data(self):
        for dataset in ("shakespeare", "shakespeare_char"):
            if not os.path.exists(os.path.join(ROOT, "data", dataset, "val.bin")):
                self.say(f"preparing data/{dataset}")
                done = subprocess.run([sys.executable, f"data/{dataset}/prepare.py"], cwd=ROOT, env=self.env)
                if done.returncode:  # the parts that need it fail on their own and say so in their logs
                    self.say(f"data/{dataset}/prepare.py failed (exit {done.returncode})")

    # -- parts -------------------------------------------------------------------------------------------------

    def part_env(self):
        import torch
        env = self.report["env"]
        env["gpus"] = gpu_names()
        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            version = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        env["child_env"] = {k: self.env[k] for k in sorted(self.env) if k.startswith(("NCCL", "TORCH_", "OMP"))}
        for key, cmd in (("topo", ["nvidia-smi", "topo", "-m"]), ("nvlink", ["nvidia-smi", "nvlink", "-s"])):
            try:
                env[key] = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
            except (OSError, subprocess.SubprocessError) as e:
                env[key] = f"({' '.join(cmd)} failed: {e})"
        print(env["topo"])
        print("child environment:", env["child_env"])

    def part_probe(self):
        from model import GPT, GPTConfig
        import torch
        with torch.device("meta"):
            numel = sum(p.numel() for p in GPT(GPTConfig(vocab_size=50257, bias=True)).parameters())
        out = os.path.join(self.work, "probe.json")
        env = dict(self.env, NCCL_DEBUG="INFO")
        proc = self.start("probe", self.torchrun(self.args.nproc) + [
            "bench/ddp_scaling.py", "--probe_worker", f"--numel={numel}",
            f"--bucket_mb={self.args.bucket_cap_mb}", f"--probe_out={out}"], env=env)
        rc = self.finish(proc, time.time() + min(120, self.left()))
        text = self.output("probe")
        transports = sorted({m.group(1).strip() for m in re.finditer(r"via ([A-Za-z0-9/_ .-]+)", text)})
        self.report["probe"] = {"rc": rc, "numel": numel, "transports": transports[:8],
                                "rows": json.load(open(out))["rows"] if rc == 0 and os.path.exists(out) else []}

    def throughput_runs(self, key, compress, overlap=None):
        """One task: the single-GPU runs (compress None) or the nproc-GPU run of one variant with train.py's
        --ddp_grad_compress=compress and --ddp_overlap=overlap (None: the fastest measured so far)."""
        label, flags = VARIANTS[key]
        n, iters = self.args.nproc, self.args.iters
        common = GPT2_FLAGS + flags + [f"--max_iters={iters}", f"--lr_decay_iters={iters}",
                                       f"--log_interval={self.args.log_interval}"] + self.args.train_flags.split()
        self.memory.reset()
        start = time.time()
        deadline = start + min(self.args.run_timeout_s, self.left())
        if compress is None:
            procs = []
            for gpu in range(self.args.single_runs or n):
                name = f"tp_{key}_1gpu_gpu{gpu}"
                out_dir = os.path.join(self.work, name)
                shutil.rmtree(out_dir, ignore_errors=True)
                env = dict(self.env, CUDA_VISIBLE_DEVICES=str(gpu))
                procs.append((name, out_dir, self.start(name, [sys.executable, "train.py", *common,
                                                               "--gradient_accumulation_steps=1",
                                                               f"--out_dir={out_dir}"], env=env)))
        else:
            overlap = overlap or self.best_overlap()
            name = f"tp_{key}_{n}gpu_{compress}_{overlap}"
            out_dir = os.path.join(self.work, name)
            shutil.rmtree(out_dir, ignore_errors=True)
            procs = [(name, out_dir, self.start(name, self.torchrun(n) + [
                "train.py", *common, f"--gradient_accumulation_steps={n}", f"--out_dir={out_dir}",
                f"--ddp_grad_compress={compress}", f"--ddp_bucket_cap_mb={self.args.bucket_cap_mb}",
                f"--ddp_overlap={overlap}"]))]
        results = []
        for name, out_dir, proc in procs:
            rc = self.finish(proc, deadline)
            self.keep_log(name, out_dir)
            steady = [r for r in read_log(out_dir) if "tok_per_s" in r and r["iter"] > self.args.skip_iters]
            text = self.output(name)
            alloc = [float(v) for v in re.findall(r"rank \d+: peak memory allocated ([0-9.]+) GiB", text)]
            ms = sum(r["ms"] for r in steady) / len(steady) if steady else float("nan")
            tokens = steady[0]["tok_per_s"] * steady[0]["ms"] / 1000 if steady else float("nan")
            results.append({"name": name, "rc": rc, "ms": ms, "tok_per_s": tokens / (ms / 1000) if steady else 0.0,
                            "alloc_gib": alloc, "steady_records": len(steady)})
        used = self.memory.peak()
        row = {"variant": key, "label": label, "gpus": 1 if compress is None else n, "compress": compress or "-",
               "overlap": overlap or "-",
               "runs": results, "smi_peak_gib": {i: v / 1024 for i, v in sorted(used.items())},
               "seconds": time.time() - start}
        self.report["throughput"].append(row)
        ok = all(r["rc"] == 0 and r["steady_records"] for r in results)
        shown = " / ".join(f"{r['tok_per_s']:,.0f}" for r in results)
        self.say(f"{row['label']}, {row['gpus']} GPU(s){'' if compress is None else f', {compress}, {overlap}'}: "
                 f"{shown} tok/s ({row['seconds']:.0f}s{'' if ok else ', FAILED: see logs'})")
        for _, out_dir, _ in procs:  # the checkpoints are not needed
            shutil.rmtree(out_dir, ignore_errors=True)

    def best_overlap(self):
        """The --ddp_overlap of the fastest multi-GPU row of the first variant measured (its ratio to its own
        single-GPU row), or the first of --overlap when none is."""
        single = {r["variant"]: r for r in self.report["throughput"] if r["gpus"] == 1}
        best, best_scale = self.args.overlap.split(",")[0], 0.0
        for row in self.report["throughput"]:
            ok = [r["tok_per_s"] for r in row["runs"] if r["rc"] == 0 and r["steady_records"]]
            base = [r["tok_per_s"] for r in single.get(row["variant"], {"runs": []})["runs"] if r["steady_records"]]
            if row["gpus"] > 1 and row["compress"] == "none" and ok and base:
                scale = sum(ok) / len(ok) / (sum(base) / len(base))
                if scale > best_scale:
                    best, best_scale = row["overlap"], scale
        return best

    def part_curve_and_kill(self):
        """The loss-curve runs (1 GPU with accumulation n, n GPUs) and the run to be killed, all at once."""
        n, iters = self.args.nproc, self.args.curve_iters
        common = CURVE_FLAGS + [f"--max_iters={iters}", f"--lr_decay_iters={iters}",
                                f"--quantization_warmup_iters={iters // 2}", f"--gradient_accumulation_steps={n}",
                                *self.args.train_flags.split()]
        dirs = {k: os.path.join(self.work, f"curve_{k}") for k in ("1gpu", "ngpu", "killed")}
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        deadline = time.time() + min(self.args.run_timeout_s, self.left())
        one = self.start("curve_1gpu", [sys.executable, "train.py", *common, f"--out_dir={dirs['1gpu']}"],
                         env=dict(self.env, CUDA_VISIBLE_DEVICES="0"))
        multi = self.start(f"curve_{n}gpu", self.torchrun(n) + ["train.py", *common, f"--out_dir={dirs['ngpu']}"])
        kill = None
        if "kill" in self.args.parts:
            kill = self.start("kill_run", self.torchrun(n) + ["train.py", *common, f"--out_dir={dirs['killed']}"])
            killed_at, victim = None, None
            while kill.poll() is None and time.time() < deadline:
                done = [r["iter"] for r in read_log(dirs["killed"]) if "loss" in r]
                if done and done[-1] >= self.args.kill_after:
                    victim = worker_pid(kill.pid, 1)
                    if victim:
                        os.kill(victim, signal.SIGKILL)
                        killed_at = done[-1]
                        self.say(f"kill: SIGKILL to rank 1 (pid {victim}) after iteration {killed_at}")
                    break
                time.sleep(0.1)
            t_kill = time.time()
            kill_rc = self.finish(kill, deadline)
            stop_s = time.time() - t_kill
        rcs = {"1gpu": self.finish(one, deadline), "ngpu": self.finish(multi, deadline)}
        for k, name in (("1gpu", "curve_1gpu"), ("ngpu", f"curve_{n}gpu")):
            self.keep_log(name, dirs[k])
        a, b = read_log(dirs["1gpu"]), read_log(dirs["ngpu"])
        self.report["curve"] = curve = {"rc": rcs, "iters": iters, "switch": iters // 2,
                                        **compare(losses(a), losses(b)),
                                        "val": {"1gpu": losses(a, "val_loss"), "ngpu": losses(b, "val_loss")}}
        plot_curves(losses(a), losses(b), n, iters // 2, os.path.join(self.args.results_dir,
                                                                      f"ddp_loss_curve_{slug(self.gpu)}.png"))
        self.say(f"curve: mean |loss difference| {curve['mean_abs']:.4f} (batch noise {curve['noise']:.4f})")
        if kill is None:
            return
        self.keep_log("kill_run", dirs["killed"])
        text = self.output("kill_run")
        notes = [line.strip() for line in text.splitlines() if "train.py: error" in line or "ChildFailedError" in line
                 or "FAILED" in line or "Signal 9" in line or "exitcode" in line][:8]
        ckpt_iter = max((r["iter"] for r in read_log(dirs["killed"]) if "val_loss" in r), default=None)
        kill_report = {"killed_after": killed_at, "rc": kill_rc, "stop_s": stop_s, "messages": notes,
                       "checkpoint_iter": ckpt_iter}
        self.report["kill"] = kill_report
        if killed_at is None or self.left() < 30:
            kill_report["resume"] = "not run (" + ("no kill happened" if killed_at is None else "out of time") + ")"
            return
        resume = self.start("kill_resume", self.torchrun(n) + ["train.py", *common, f"--out_dir={dirs['killed']}",
                                                               "--init_from=resume"])
        rc = self.finish(resume, time.time() + min(self.args.run_timeout_s, self.left()))
        self.keep_log("kill_resume", dirs["killed"])
        after = {i: v for i, v in losses(read_log(dirs["killed"])).items() if ckpt_iter is not None and i >= ckpt_iter}
        # the resumed run appended to the same log: its records are the last ones for each iteration >= ckpt
        kill_report.update(resume_rc=rc, **{f"resume_{k}": v for k, v in compare(losses(b), after).items()})
        self.say(f"kill: stopped in {stop_s:.1f}s (rc {kill_rc}); resumed from {ckpt_iter}: mean |loss difference| "
                 f"{kill_report.get('resume_mean_abs', float('nan')):.4f} against the uninterrupted run")

    # -- report ------------------------------------------------------------------------------------------------

    def write(self):
        md = render(self.report, self.args, self.gpu)
        path = os.path.join(self.args.results_dir, f"ddp_scaling_{slug(self.gpu)}.md")
        with open(path, "w") as f:
            f.write(md)
        with open(os.path.join(self.logs, "report.json"), "w") as f:
            json.dump(self.report, f, indent=1, default=str)
        return path


def compare(ref, other):
    """Mean and max |difference| of two {iter: loss} curves on their common iterations, and the batch-to-batch
    noise of ref (std of the loss around its 21-step moving average) as the scale to judge them by."""
    common = sorted(set(ref) & set(other))
    if not common:
        return {"n": 0, "mean_abs": float("nan"), "max_abs": float("nan"), "noise": float("nan")}
    diffs = [abs(ref[i] - other[i]) for i in common]
    its = sorted(ref)
    resid = []
    for j, i in enumerate(its):
        window = [ref[k] for k in its[max(0, j - 10):j + 11]]
        resid.append(ref[i] - sum(window) / len(window))
    noise = (sum(r * r for r in resid) / len(resid)) ** 0.5
    return {"n": len(common), "first": common[0], "mean_abs": sum(diffs) / len(diffs), "max_abs": max(diffs),
            "noise": noise}


def plot_curves(a, b, n, switch, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not a or not b:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sorted(a), [a[i] for i in sorted(a)], label=f"1 GPU, accumulation {n}", lw=1)
    ax.plot(sorted(b), [b[i] for i in sorted(b)], label=f"{n} GPUs", lw=1, ls="--")
    ax.axvline(switch, color="grey", lw=0.8, ls=":", label="quantization on")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (global batch)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def slug(gpu):
    m = re.search(r"\b([AHBL]\d{2,3}|MI\d{3}|cpu)\b", gpu)
    return (m.group(1) if m else re.sub(r"\W+", "_", gpu)).lower()


def render(rep, args, gpu):
    env = rep["env"]
    out = [f"# DDP scaling: {gpu} x {args.nproc}", "",
           f"`python bench/ddp_scaling.py --nproc={args.nproc}` (torch {env.get('torch', '?')}, NCCL "
           f"{env.get('nccl', '?')}; children's NCCL settings: {env.get('child_env', {})})", ""]
    if env.get("topo"):
        out += ["`nvidia-smi topo -m`:", "", "```", env["topo"], "```", ""]
    probe = rep["probe"]
    if probe:
        out += [f"## NCCL all-reduce of the 124M model's gradients ({probe['numel']:,} values), {args.nproc} GPUs", "",
                f"Transports NCCL chose: {', '.join(probe['transports']) or 'not reported'}", "",
                "| what | MB | ms | algbw GB/s | busbw GB/s |", "|---|---:|---:|---:|---:|"]
        out += [f"| {r['what']} | {r['MB']:.0f} | {r['ms']:.2f} | {r['algbw_GBs']:.1f} | {r['busbw_GBs']:.1f} |"
                for r in probe["rows"]]
        if probe["rc"] != 0:
            out.append(f"\nprobe failed (exit {probe['rc']}): see ddp_scaling_logs/probe.log")
        out.append("")
    if rep["throughput"]:
        out += ["## Throughput: GPT-2 124M, block 1024, batch 16 per GPU, compile, bf16 autocast",
                "",
                f"{args.iters} iterations per run, tokens/s over iterations {args.skip_iters + 1}..{args.iters - 1} "
                f"(train.py's own log). One GPU: {args.single_runs or args.nproc} independent single-GPU run(s) at "
                f"once, one per GPU "
                f"(each value listed); {args.nproc} GPUs: torchrun, gradient accumulation {args.nproc}, so each GPU "
                f"does the same work per step. Peak memory: torch's max allocated per process, and nvidia-smi's "
                f"largest memory.used per GPU.", "",
                "ms/step is per micro-step. Overlap: train.py --ddp_overlap (buckets: the compiled graph split at "
                "the gradient buckets so their all-reduce overlaps the backward pass; off: one compiled graph, "
                "all-reduce after it). Rows after the first variant's use the overlap that scaled best there.", "",
                "| weights | GPUs | grads on the wire | overlap | tokens/s | ms/step | scaling | efficiency "
                "| peak allocated GiB | nvidia-smi peak GiB |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        single = {}
        for row in rep["throughput"]:
            runs = [r for r in row["runs"] if r["rc"] == 0 and r["steady_records"]]
            if not runs:
                out.append(f"| {row['label']} | {row['gpus']} | {row['compress']} | {row.get('overlap', '-')} | failed "
                           f"| | | | | |")
                continue
            tps = [r["tok_per_s"] for r in runs]
            mean = sum(tps) / len(tps)
            ms = sum(r["ms"] for r in runs) / len(runs)
            alloc = " / ".join(f"{v:.2f}" for r in runs for v in r["alloc_gib"])
            smi = " / ".join(f"{v:.1f}" for v in row["smi_peak_gib"].values())
            if row["gpus"] == 1:
                single[row["variant"]] = mean
                shown = " / ".join(f"{v:,.0f}" for v in tps)
                out.append(f"| {row['label']} | 1 | - | - | {shown} | {ms:.1f} | 1.00 | 100% | {alloc} | {smi} |")
            else:
                base = single.get(row["variant"])
                scale = mean / base if base else float("nan")
                out.append(f"| {row['label']} | {row['gpus']} | {row['compress'].replace('none', 'fp32')} | "
                           f"{row.get('overlap', '-')} | {mean:,.0f} | {ms:.1f} | {scale:.2f}x | {scale / row['gpus']:.0%} | {alloc} | {smi} |")
        out.append("")
    curve = rep["curve"]
    if curve:
        out += [f"## Same global batch: 1 GPU (accumulation {args.nproc}) against {args.nproc} GPUs", "",
                f"Baby GPT shape (6 layers, 6 heads, 384 wide, block 256), char-level Shakespeare, batch 32 per "
                f"micro-step, {curve['iters']} steps, eager, ternary QAT from step {curve['switch']}; train.py "
                f"draws one global batch per step for all processes, so both see the same tokens. Batch noise: "
                f"the std of the 1-GPU loss around its 21-step moving average.", "",
                "| steps compared | mean abs loss difference | max abs loss difference | batch noise | exit codes |",
                "|---:|---:|---:|---:|---|",
                f"| {curve['n']} | {curve['mean_abs']:.4f} | {curve['max_abs']:.4f} | {curve['noise']:.4f} | "
                f"{curve['rc']} |", "", "| step | val loss, 1 GPU | val loss, " + f"{args.nproc} GPUs |",
                "|---:|---:|---:|"]
        v1, vn = curve["val"]["1gpu"], curve["val"]["ngpu"]
        out += [f"| {i} | {v1[i]:.4f} | {vn.get(i, float('nan')):.4f} |" for i in sorted(v1)]
        out.append("")
    kill = rep["kill"]
    if kill:
        out += [f"## Kill one rank, then resume on {args.nproc} GPUs", "",
                f"Rank 1 got SIGKILL after iteration {kill['killed_after']}; the job exited with code {kill['rc']} "
                f"{kill['stop_s']:.1f} s later. Its last checkpoint: iteration {kill['checkpoint_iter']}. "
                f"Messages:", "",
                "```", *kill["messages"], "```", ""]
        if "resume_mean_abs" in kill:
            out += [f"`--init_from=resume` (exit {kill['resume_rc']}) against the uninterrupted {args.nproc}-GPU run, "
                    f"from iteration {kill.get('resume_first')}:", "",
                    "| steps compared | mean abs loss difference | max abs loss difference |", "|---:|---:|---:|",
                    f"| {kill['resume_n']} | {kill['resume_mean_abs']:.4f} | {kill['resume_max_abs']:.4f} |", ""]
        else:
            out += [f"resume: {kill.get('resume')}", ""]
    if rep["skipped"]:
        out += ["Skipped (time budget): " + ", ".join(rep["skipped"]), ""]
    out += ["Part durations (s): " + ", ".join(f"{k} {v:.0f}" for k, v in rep["durations"].items()), ""]
    return "\n".join(out)


def main():
    sys.path.insert(0, ROOT)
    from safety import finite_float
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="GPUs to use (all of one host)")
    p.add_argument("--parts", default="env,probe,throughput,curve,kill", help="comma list of parts to run")
    p.add_argument("--variants", default="w8,fp,ternary", help=f"throughput variants, in order ({', '.join(VARIANTS)})")
    p.add_argument("--compress", default="none", help="gradient compressions of the multi-GPU throughput rows "
                   "(comma list of none, bf16, fp16)")
    p.add_argument("--overlap", default="off,buckets", help="train.py --ddp_overlap settings of the first "
                   "variant's multi-GPU rows (comma list of off, buckets); the other rows use the one that scaled best")
    p.add_argument("--compress_extra", default="w8:bf16", help="extra multi-GPU rows run last if time is left "
                   "(variant:compression, comma list; empty for none)")
    p.add_argument("--single_runs", type=int, default=0, help="single-GPU runs at once in the 1-GPU rows, one per "
                   "GPU (default --nproc: the host as loaded as in the DDP run; 1: GPU 0 alone)")
    p.add_argument("--bucket_cap_mb", type=int, default=25, help="train.py --ddp_bucket_cap_mb")
    p.add_argument("--iters", type=int, default=50, help="iterations per throughput run")
    p.add_argument("--skip_iters", type=int, default=15, help="iterations not timed (compile, warm-up)")
    p.add_argument("--log_interval", type=int, default=5, help="train.py --log_interval of throughput runs")
    p.add_argument("--curve_iters", type=int, default=500, help="steps of the loss-curve runs")
    p.add_argument("--kill_after", type=int, default=310, help="kill rank 1 once this iteration is logged")
    p.add_argument("--budget_s", type=finite_float, default=560, help="stop starting parts after this many seconds")
    p.add_argument("--run_timeout_s", type=finite_float, default=240, help="longest one part's processes may run")
    p.add_argument("--train_flags", default="", help="extra train.py flags for every run (they override the "
                   "bench's, e.g. a smaller model for a smoke run on the CPU)")
    p.add_argument("--results_dir", default=os.path.join(ROOT, "bench", "results"), help="markdown and logs go here")
    p.add_argument("--work_dir", default=None, help="run folders and checkpoints (default: a temporary folder)")
    p.add_argument("--probe_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--numel", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--bucket_mb", type=int, default=25, help=argparse.SUPPRESS)
    p.add_argument("--probe_out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe_worker:
        return probe_worker(args.numel, args.bucket_mb, args.probe_out)
    parts = set(args.parts.split(","))
    unknown = parts - {"env", "probe", "throughput", "curve", "kill"}
    bad_variants = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    bad_variants += [o for o in args.overlap.split(",") if o not in ("off", "buckets")]
    if unknown or bad_variants or args.nproc < 2:
        sys.exit(f"ddp_scaling.py: error: --parts={args.parts} / --variants={args.variants} / --overlap={args.overlap} / "
                 f"--nproc={args.nproc}: expected parts from env,probe,throughput,curve,kill, variants from "
                 f"{','.join(VARIANTS)}, overlap from off,buckets, nproc >= 2")
    args.parts = parts
    sys.path.insert(0, ROOT)
    os.environ.update(CHILD_ENV)
    bench = Bench(args)
    bench.prepare_data()
    n = args.nproc
    variants = [v for v in args.variants.split(",") if v]
    tasks = []  # (name, estimated seconds, function), in priority order
    if "env" in parts:
        tasks.append(("env", 5, bench.part_env))
    if "probe" in parts:
        tasks.append(("probe", 40, bench.part_probe))
    for i, key in enumerate(variants if "throughput" in parts else []):
        tasks.append((f"{key} 1 GPU", 90, lambda key=key: bench.throughput_runs(key, None)))
        for c in args.compress.split(","):
            for o in (args.overlap.split(",") if i == 0 else [None]):  # later variants: the best overlap measured
                tasks.append((f"{key} {n} GPUs {c}" + (f" {o}" if o else ""), 100,
                              lambda key=key, c=c, o=o: bench.throughput_runs(key, c, o)))
        if i == 0 and parts & {"curve", "kill"}:
            tasks.append(("curve+kill", 110, bench.part_curve_and_kill))
    if not ("throughput" in parts and variants) and parts & {"curve", "kill"}:
        tasks.append(("curve+kill", 110, bench.part_curve_and_kill))
    for extra in (args.compress_extra.split(",") if "throughput" in parts and args.compress_extra else []):
        key, c = extra.split(":")
        if key in variants:
            tasks.append((f"{key} {n} GPUs {c}", 100, lambda key=key, c=c: bench.throughput_runs(key, c)))
    measured, path = [], bench.write()
    for name, estimate, fn in tasks:
        # a throughput task is estimated by the slowest one measured so far, once there is one
        if "GPU" in name and measured:
            estimate = max(measured)
        if bench.left() < estimate:
            bench.report["skipped"].append(name)
            bench.say(f"skipped {name}: {bench.left():.0f}s left, needs about {estimate:.0f}s")
            continue
        bench.say(f"start {name}")
        t = time.time()
        try:
            fn()
        except Exception as e:  # one failed part must not lose the others' results
            bench.say(f"{name} failed: {type(e).__name__}: {e}")
            bench.report["skipped"].append(f"{name} (failed: {type(e).__name__}: {e})")
        bench.report["durations"][name] = time.time() - t
        if "GPU" in name:
            measured.append(time.time() - t)
        path = bench.write()
    bench.memory.stop = True
    print(open(path).read())
    print(f"written: {path} (logs in {bench.logs}); {time.time() - bench.t0:.0f}s in all")


if __name__ == "__main__":
    main()
