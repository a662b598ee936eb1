"""Perplexity and validation loss of a checkpoint, or of a base and a quantized one side by side, with a sliding
window over a token stream: a split of the checkpoint's dataset (default val), any text file, or a Hugging Face
`datasets` dataset (needs the optional `datasets` package).

    python quantization/perplexity.py --out_dir=out --quantized_dir=out-autoround
    python quantization/perplexity.py --out_dir=out --text_file=notes.txt --stride=32
"""
import math
import os
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configurator import BoolFlag, OneLineParser  # noqa: E402


def split_tokens(dataset, split="val"):
    """The token stream of data/<dataset>/<split>.bin."""
    path = os.path.join(ROOT, "data", dataset, f"{split}.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (run python data/{dataset}/prepare.py first)")
    return torch.from_numpy(np.fromfile(path, dtype=np.uint16).astype(np.int64))


def text_tokens(path, tokenizer):
    with open(path, encoding="utf-8") as f:
        return torch.tensor(tokenizer.encode(f.read()), dtype=torch.long)


def hf_dataset_tokens(name, tokenizer, split="test", text_field="text"):
    """Tokens of a `datasets` dataset ("name" or "name:config", e.g. wikitext:wikitext-2-raw-v1), texts joined
    by blank lines."""
    try:
        import datasets
    except ImportError:
        raise ValueError("the `datasets` package is not installed (pip install datasets)") from None
    path, _, config = name.partition(":")
    data = datasets.load_dataset(path, config or None, split=split)
    if text_field not in data.column_names:
        raise ValueError(f"dataset {name} has no column '{text_field}' (it has {', '.join(data.column_names)})")
    return torch.tensor(tokenizer.encode("\n\n".join(data[text_field])), dtype=torch.long)


def windows(n, seqlen, stride):
    """(start, first target to score) of each window over n tokens, so that every target 1..n-1 is scored once:
    a window scores the targets after those its predecessors scored; the last is aligned to the stream's end."""
    out, scored, start = [], 0, 0  # targets 1..scored are done
    while scored < n - 1:
        start = min(start, n - 1 - seqlen)
        out.append((start, max(0, scored - start)))
        scored, start = start + seqlen, start + stride
    return out


@torch.no_grad()
def evaluate(model, tokens, seqlen=None, stride=None, batch_size=8, max_tokens=0, device="cpu", progress=True):
    """{"loss": mean negative log-likelihood per token, "perplexity": exp(loss), "tokens": targets scored}.
    Each window holds `seqlen` tokens of context (default: the model's block_size); windows start every `stride`
    tokens (default seqlen: no overlap) and score only targets no earlier window scored."""
    tokens = torch.as_tensor(tokens).long()
    if max_tokens:
        tokens = tokens[:max_tokens]
    seqlen = min(seqlen or model.config.block_size, len(tokens) - 1)
    stride = stride or seqlen
    if seqlen < 1:
        raise ValueError("the text is too short to score (fewer than 2 tokens)")
    if seqlen > model.config.block_size:
        raise ValueError(f"seqlen={seqlen}: longer than the model's block_size {model.config.block_size}")
    if not 1 <= stride <= seqlen:
        raise ValueError(f"stride={stride}: must be between 1 and seqlen={seqlen}")
    model.eval()
    spans = windows(len(tokens), seqlen, stride)
    total, count = 0.0, 0
    for b in tqdm(range(0, len(spans), batch_size), desc="perplexity", unit="batch", disable=not progress,
                  leave=False):
        batch = spans[b:b + batch_size]
        idx = torch.stack([tokens[s:s + seqlen + 1] for s, _ in batch])
        x, y = idx[:, :-1].clone(), idx[:, 1:].clone()
        for row, (_, first) in enumerate(batch):
            y[row, :first] = -1  # scored by an earlier window
        n = int((y != -1).sum())
        _, loss = model(x.to(device), y.to(device))
        total += loss.double().item() * n
        count += n
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def build_parser():
    p = OneLineParser(prog="perplexity.py", description="Perplexity of a checkpoint, or a base and a quantized one.")
    p.add_argument("--out_dir", default="out", help="folder holding the (base) ckpt.pt")
    p.add_argument("--quantized_dir", default=None, help="folder of a quantized checkpoint to compare with")
    p.add_argument("--split", default="val", choices=("train", "val"), help="split of the checkpoint's dataset")
    p.add_argument("--text_file", default=None, help="score this text file instead of a split")
    p.add_argument("--hf_dataset", default=None, help="score a `datasets` dataset, name or name:config")
    p.add_argument("--hf_split", default="test", help="split of --hf_dataset")
    p.add_argument("--hf_text_field", default="text", help="text column of --hf_dataset")
    p.add_argument("--seqlen", type=int, default=0, help="window length (0: the model's block_size)")
    p.add_argument("--stride", type=int, default=0, help="tokens between window starts (0: seqlen, no overlap)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--max_tokens", type=int, default=0, help="score only the first this many tokens (0: all)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    p.add_argument("--progress", action=BoolFlag, default=True, help="show a progress bar")
    return p


def load_tokens(args, tokenizer, dataset):
    if args.text_file:
        return text_tokens(args.text_file, tokenizer)
    if args.hf_dataset:
        return hf_dataset_tokens(args.hf_dataset, tokenizer, args.hf_split, args.hf_text_field)
    return split_tokens(dataset, args.split)


def main(argv=None):
    from checkpoint import load_checkpoint
    from inference import load_model, resolve_device
    args = build_parser().parse_args(argv)
    prog = "perplexity.py: error:"
    if args.batch_size < 1:
        sys.exit(f"{prog} --batch_size={args.batch_size}: must be at least 1")
    device, _ = resolve_device(args.device, "float32")
    results, tokens = [], None
    for flag, folder in (("out_dir", args.out_dir), ("quantized_dir", args.quantized_dir)):
        if folder is None:
            continue
        try:
            model, tokenizer = load_model(folder, device)
            if tokens is None:
                dataset = load_checkpoint(folder).get("dataset", "shakespeare_char")
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"{prog} --{flag}={folder}: {e}")
        try:
            if tokens is None:
                tokens = load_tokens(args, tokenizer, dataset)
            r = evaluate(model, tokens, args.seqlen, args.stride, args.batch_size, args.max_tokens, device,
                         args.progress)
        except (OSError, ValueError) as e:
            sys.exit(f"{prog} {e}")
        results.append((folder, r))
        del model
    source = args.text_file or args.hf_dataset or f"{dataset} {args.split}"
    print(f"{source}: {results[0][1]['tokens']:,} tokens scored")
    print("| checkpoint | loss | perplexity |")
    print("|---|---|---|")
    for folder, r in results:
        print(f"| {folder} | {r['loss']:.4f} | {r['perplexity']:.2f} |")
    return results


if __name__ == "__main__":
    main()
