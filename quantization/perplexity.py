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
import torch.nn.functional as F
from tqdm.auto import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # run as a command (python quantization/<this>.py): import from the root, not from
    # quantization/ itself, whose kernels/ would shadow the `kernels` package that transformers looks for
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or os.curdir) != here]

from cli import BoolFlag, OneLineParser  # noqa: E402


def split_tokens(dataset, split="val", max_tokens=0):
    """The token stream of data/<dataset>/<split>.bin (only its first max_tokens when > 0)."""
    path = os.path.join(ROOT, "data", dataset, f"{split}.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (run python data/{dataset}/prepare.py first)")
    if os.path.getsize(path) % 2:
        raise ValueError(f"{path} has an odd size: not a file of uint16 tokens")
    return torch.from_numpy(np.fromfile(path, dtype=np.uint16, count=max_tokens or -1).astype(np.int64))


def text_tokens(path, tokenizer, max_tokens=0):
    """The tokens of a UTF-8 text file; with max_tokens > 0 only the first max_tokens, reading no more of the file
    than needed (a growing prefix, cut well before its last, possibly split, word)."""
    margin = 64  # tokens near the end of a prefix may merge differently once the text goes on
    with open(path, encoding="utf-8") as f:
        if not max_tokens:
            return torch.tensor(tokenizer.encode(f.read()), dtype=torch.long)
        text, size = "", 4 * (max_tokens + margin)
        while True:
            more = f.read(size - len(text))
            text += more
            ids = tokenizer.encode(text)
            if not more or len(ids) >= max_tokens + margin:
                return torch.tensor(ids[:max_tokens], dtype=torch.long)
            size *= 2


def hf_dataset_tokens(name, tokenizer, split="test", text_field="text", max_tokens=0):
    """Tokens of a `datasets` dataset ("name" or "name:config", e.g. wikitext:wikitext-2-raw-v1, or a local folder
    of text files), texts joined by blank lines. With max_tokens > 0 the dataset is streamed and read only until
    that many tokens are there. Whatever goes wrong in `datasets` (no network, no such dataset, split or config)
    comes back as one ValueError line."""
    try:
        import datasets
    except ImportError:
        raise ValueError("the `datasets` package is not installed (pip install datasets)") from None
    path, _, config = name.partition(":")

    def failed(e):  # the datasets library raises many kinds: network, hub, missing files, bad configs and splits
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else "no detail"
        return ValueError(f"could not load split '{split}' of dataset {name} ({type(e).__name__}: {first})")

    try:
        data = datasets.load_dataset(path, config or None, split=split, streaming=max_tokens > 0)
        columns = data.column_names if data.column_names is not None else list(next(iter(data), {}))
    except Exception as e:
        raise failed(e) from None
    if text_field not in columns:
        raise ValueError(f"dataset {name} has no column '{text_field}' (it has {', '.join(columns) or 'none'})")
    if not max_tokens:
        return torch.tensor(tokenizer.encode("\n\n".join(data[text_field])), dtype=torch.long)
    rows, texts, chars, need = iter(data), [], 0, 4 * max_tokens + 1024  # chars that likely hold max_tokens
    ids = None
    while ids is None or len(ids) < max_tokens:  # streamed: read until the texts so far encode to enough tokens
        try:
            row = next(rows, None)
        except Exception as e:
            raise failed(e) from None
        if row is not None:
            texts.append(row[text_field])
            chars += len(texts[-1]) + 2
            if chars < need:
                continue
            need *= 2
        ids = tokenizer.encode("\n\n".join(texts))
        if row is None:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


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
def evaluate(model, tokens, seqlen=None, stride=None, batch_size=8, max_tokens=0, device="cpu", progress=True,
             per_window=False):
    """{"loss": mean negative log-likelihood per token, "perplexity": exp(loss), "tokens": targets scored}.
    Each window holds `seqlen` tokens of context (default: the model's block_size); windows start every `stride`
    tokens (default seqlen: no overlap) and score only targets no earlier window scored. per_window: also
    "window_losses", each window's mean over the targets it scored (float64), to compare two models on the same
    windows (spin_quant.paired_gain)."""
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
    total, count, window_losses = 0.0, 0, []
    for b in tqdm(range(0, len(spans), batch_size), desc="perplexity", unit="batch", disable=not progress,
                  leave=False):
        batch = spans[b:b + batch_size]
        idx = torch.stack([tokens[s:s + seqlen + 1] for s, _ in batch])
        x, y = idx[:, :-1].clone(), idx[:, 1:].clone()
        for row, (_, first) in enumerate(batch):
            y[row, :first] = -1  # scored by an earlier window
        n = int((y != -1).sum())
        logits, loss = model(x.to(device), y.to(device))
        total += loss.double().item() * n
        count += n
        if per_window:
            nll = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-1,
                                  reduction="none").view(y.shape)
            window_losses.append(nll.double().sum(dim=1).cpu() / (y != -1).sum(dim=1))
    loss = total / count
    result = {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
    if per_window:
        result["window_losses"] = torch.cat(window_losses)
    return result


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
        return text_tokens(args.text_file, tokenizer, args.max_tokens)
    if args.hf_dataset:
        return hf_dataset_tokens(args.hf_dataset, tokenizer, args.hf_split, args.hf_text_field, args.max_tokens)
    return split_tokens(dataset, args.split, args.max_tokens)


def check_args(args):
    """The first bad flag as '--flag=value: what was expected', or None."""
    from safety import check_device
    for name, low in (("batch_size", 1), ("seqlen", 0), ("stride", 0), ("max_tokens", 0)):
        value = getattr(args, name)
        if not low <= value <= 2 ** 31 - 1:
            return f"--{name}={value}: must be an integer in {low}..{2 ** 31 - 1}"
    if args.text_file and args.hf_dataset:
        return "--text_file and --hf_dataset: give one of them"
    try:
        check_device(args.device)
    except ValueError as e:
        return f"--device={args.device}: {e}"
    return None


def main(argv=None):
    from inference import load_checkpoint
    from inference import load_model, resolve_device
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = "perplexity.py: error:"
    if check_args(args):
        parser.error(check_args(args))
    source_flag = (f"--text_file={args.text_file}" if args.text_file else
                   f"--hf_dataset={args.hf_dataset}" if args.hf_dataset else f"--split={args.split}")
    device, _ = resolve_device(args.device, "float32")
    results, tokens, first = [], None, None
    for flag, folder in (("out_dir", args.out_dir), ("quantized_dir", args.quantized_dir)):
        if folder is None:
            continue
        try:
            model, tokenizer = load_model(folder, device)
            if tokens is None:
                dataset = load_checkpoint(folder).get("dataset", "shakespeare_char")
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"{prog} --{flag}={folder}: {e}")
        if first is None:
            first = tokenizer.meta
        elif tokenizer.meta != first:  # perplexities over different token streams cannot be compared
            sys.exit(f"{prog} --{flag}={folder}: its tokenizer ({tokenizer.meta['tokenizer']}, vocabulary "
                     f"{tokenizer.meta['vocab_size']}) differs from that of --out_dir ({first['tokenizer']}, "
                     f"vocabulary {first['vocab_size']}); compare checkpoints of one tokenizer")
        try:
            if tokens is None:
                tokens = load_tokens(args, tokenizer, dataset)
            if len(tokens) and int(tokens.max()) >= model.config.vocab_size:
                raise ValueError(f"token id {int(tokens.max())} is beyond the model's vocabulary "
                                 f"of {model.config.vocab_size}")
        except (OSError, ValueError) as e:
            sys.exit(f"{prog} {source_flag}: {getattr(e, 'strerror', None) or e}")
        try:
            r = evaluate(model, tokens, args.seqlen, args.stride, args.batch_size, args.max_tokens, device,
                         args.progress)
        except ValueError as e:  # seqlen or stride against the model and the text
            sys.exit(f"{prog} --{e}" if str(e).startswith(("seqlen", "stride")) else f"{prog} {source_flag}: {e}")
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
