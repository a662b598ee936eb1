"""GGUF export checked by llama.cpp itself (through llama-cpp-python): a small GPT-2 BPE model on data/shakespeare,
trained in full precision, exported to GGUF (f32), fine-tuned from that file with QAT at W8 (Q8_0), W4 group 32
(Q4_0) and ternary (TQ2_0), and quantized by AutoRound at W4 group 32 asymmetric (Q4_1). Each model is exported
with --type=auto, loaded in llama.cpp and compared with ours: weight error, perplexity of the same validation
windows, greedy tokens from the same prompt, file size and llama.cpp's CPU decode speed.

    python data/shakespeare/prepare.py
    pip install llama-cpp-python            # compiles llama.cpp
    python demos/gguf_llamacpp.py           # models under out-gguf-demo/, table in bench/results/gguf_llamacpp.md
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from inference import load_checkpoint  # noqa: E402
from quantization.gguf_export import checkpoint_weights, export  # noqa: E402
from quantization.perplexity import split_tokens  # noqa: E402
from tokenizer import Tokenizer, load_meta  # noqa: E402
from safety import check_output_file, write_text_atomic  # noqa: E402

# the model: 256 wide so that every linear's input width is a multiple of TQ2_0's 256-value blocks
MODEL = ["--dataset=shakespeare", "--n_layer=2", "--n_head=4", "--n_embd=256", "--block_size=96", "--batch_size=4",
         "--device=cpu", "--dtype=float32", "--gelu_approximate=tanh", "--eval_iters=5", "--log_interval=25"]
# QAT: the embedding (global flags) at 8 bits per channel, the linears (per-kind flags) on the grid of each row
QAT = {
    "qat-w8": ["--quantize_linear_method_attn=symmetric_quant", "--quantize_linear_method_mlp=symmetric_quant"],
    "qat-w4g32": ["--quantize_linear_bits_attn=4", "--quantize_linear_bits_mlp=4",
                  "--quantize_linear_granularity_attn=per_group", "--quantize_linear_granularity_mlp=per_group"],
    "qat-ternary": ["--quantize_linear_method_attn=ternary_quant", "--quantize_linear_method_mlp=ternary_quant",
                    "--quantize_linear_granularity_attn=per_tensor", "--quantize_linear_granularity_mlp=per_tensor"],
}
QAT_COMMON = ["--linear_variant_attn=quantized_linear", "--linear_variant_mlp=quantized_linear",
              "--quantize_embedding", "--quantize_linear_fp16_scale", "--quantization_warmup_iters=0",
              "--quantize_linear_group_size=32"]


def run(*cmd):
    print("$", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)


def build_models(work, fp_iters, qat_iters, autoround_iters):
    """{name: out_dir} of the five models, each trained or quantized unless its checkpoint already exists."""
    dirs = {name: os.path.join(work, name) for name in ("fp", *QAT, "autoround-w4g32")}
    if not os.path.exists(os.path.join(dirs["fp"], "ckpt.pt")):
        run("train.py", f"--out_dir={dirs['fp']}", *MODEL, f"--max_iters={fp_iters}", f"--lr_decay_iters={fp_iters}",
            f"--eval_interval={fp_iters}", "--warmup_iters=20")
    fp_gguf = os.path.join(work, "fp.gguf")
    if not os.path.exists(fp_gguf):
        export(load_checkpoint(dirs["fp"]), fp_gguf, "f32")
    for name, flags in QAT.items():
        if not os.path.exists(os.path.join(dirs[name], "ckpt.pt")):
            run("train.py", f"--out_dir={dirs[name]}", *MODEL, f"--init_from={fp_gguf}", *QAT_COMMON, *flags,
                f"--max_iters={qat_iters}", f"--lr_decay_iters={qat_iters}", f"--eval_interval={qat_iters}",
                "--warmup_iters=5", "--learning_rate=3e-4", "--min_lr=3e-5")
    if not os.path.exists(os.path.join(dirs["autoround-w4g32"], "ckpt.pt")):
        run("demos/autoround_ptq.py", f"--out_dir={dirs['fp']}", f"--quantized_dir={dirs['autoround-w4g32']}",
            "--bits=4", "--group_size=32", "--no-sym", f"--iters={autoround_iters}", "--nsamples=16",
            "--eval_tokens=4096", "--device=cpu", "--no-progress")
    return dirs


def our_model(out_dir):
    checkpoint = load_checkpoint(out_dir)
    model, _ = checkpoint_weights(checkpoint)
    return model


@torch.no_grad()
def our_window_logits(model, window):
    x = torch.tensor(window)[None]
    wte = model.token_embedding_weight()
    b = model.transformer
    h = b.drop(torch.nn.functional.embedding(x, wte) + b.wpe(torch.arange(x.shape[1])))
    for block in b.h:
        h = block(h)
    return torch.nn.functional.linear(b.ln_f(h), wte)[0].double()


def nll(logits, targets):
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(targets), reduction="sum"))


@torch.no_grad()
def our_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(our_window_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]


def llama_window_logits(llm, window):
    llm.reset()
    llm.eval(window)
    return torch.from_numpy(np.array(llm.scores[:len(window)], dtype=np.float64))


def llama_greedy(llm, prompt, n):
    llm.reset()
    llm.eval(prompt)
    out = []
    t0 = time.perf_counter()
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out, n / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=os.path.join(ROOT, "out-gguf-demo"), help="folder for the models and GGUF files")
    p.add_argument("--fp_iters", type=int, default=80)
    p.add_argument("--qat_iters", type=int, default=20)
    p.add_argument("--autoround_iters", type=int, default=30)
    p.add_argument("--windows", type=int, default=16, help="validation windows (block_size tokens each) scored")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "gguf_llamacpp.md"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --results file")
    args = p.parse_args(argv)
    try:
        check_output_file(args.results, overwrite=args.overwrite)
    except ValueError as e:
        sys.exit(f"gguf_llamacpp.py: error: --results={args.results}: {e}")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dirs = build_models(args.work, args.fp_iters, args.qat_iters, args.autoround_iters)
    try:
        from llama_cpp import Llama
        import llama_cpp
    except ImportError:
        sys.exit("gguf_llamacpp.py: error: llama_cpp is not importable: pip install llama-cpp-python")

    val = split_tokens("shakespeare", "val")
    block = load_checkpoint(dirs["fp"])["model_args"]["block_size"]
    windows = [val[i * block:(i + 1) * block + 1].tolist() for i in range(args.windows)]
    prompt = val[-1000:-1000 + 16].tolist()
    tokenizer = Tokenizer(load_meta(os.path.join(ROOT, "data", "shakespeare")))
    lines = [f"llama-cpp-python {llama_cpp.__version__}; {args.windows} validation windows of {block} tokens; "
             f"greedy decoding of {args.new_tokens} tokens from a {len(prompt)}-token prompt; {args.threads} threads "
             f"(tok/s: the best of 3 decodes)", ""]
    header = ("| model | GGUF types (linears) | file MB | max weight error | our ppl | llama.cpp ppl | ppl diff "
              "| greedy tokens equal | llama.cpp tok/s |")
    rows = [header, "|---" * (header.count("|") - 1) + "|"]
    tokenizer_checked = False
    for name, out_dir in dirs.items():
        path = os.path.join(args.work, f"{name}.gguf")
        print(f"== {name}: export to {path}", flush=True)
        report = export(load_checkpoint(out_dir), path, "auto")
        linear_types = sorted({t for n, t, *_ in report if n.startswith("blk.") and n.endswith("weight") and t != "f32"})
        quantized = [(err, steps) for n, t, err, steps, note in report if "exact" in note and t != "f32"]
        max_err = max((err for err, _ in quantized), default=0.0)
        model = our_model(out_dir)
        llm = Llama(model_path=path, n_ctx=block, n_batch=block, n_threads=args.threads, logits_all=True,
                    verbose=False)
        if not tokenizer_checked:
            text = tokenizer.decode(val[:2000].tolist())
            same = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tokenizer.encode(text)
            lines.append(f"llama.cpp tokenizes {len(text)} characters of the validation text "
                         f"{'the same as' if same else 'DIFFERENTLY from'} tiktoken")
            lines.append("")
            tokenizer_checked = True
        ours_nll = theirs_nll = count = 0
        for w in windows:
            ours_nll += nll(our_window_logits(model, w[:-1]), w[1:])
            theirs_nll += nll(llama_window_logits(llm, w[:-1]), w[1:])
            count += len(w) - 1
        ours_ppl, theirs_ppl = np.exp(ours_nll / count), np.exp(theirs_nll / count)
        ours_tokens = our_greedy(model, prompt, args.new_tokens)
        # the best of 3 decodes: the cores are shared, and a busy moment should not read as llama.cpp's speed
        runs = [llama_greedy(llm, prompt, args.new_tokens) for _ in range(3)]
        theirs_tokens, speed = runs[0][0], max(r[1] for r in runs)
        first_diff = next((i for i, (a, b) in enumerate(zip(ours_tokens, theirs_tokens)) if a != b), None)
        equal = f"{args.new_tokens}/{args.new_tokens}" if first_diff is None else f"first {first_diff}"
        rows.append(f"| {name} | {', '.join(linear_types) or 'f32'} | {os.path.getsize(path) / 1e6:.1f} | "
                    f"{max_err:.2g} | {ours_ppl:.3f} | {theirs_ppl:.3f} | {100 * (theirs_ppl / ours_ppl - 1):+.3f}% | "
                    f"{equal} | {speed:.0f} |")
        print(rows[-1], flush=True)
        del llm
    lines += rows
    lines += ["", "max weight error: the largest |llama.cpp's weight - ours| over the tensors stored exactly from their "
              "grid (0 when the scales are fp16, as --quantize_linear_fp16_scale trains them)."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text_atomic(args.results, text)


if __name__ == "__main__":
    main()
