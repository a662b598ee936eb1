"""How precise a LayerNorm fused into the packed layer after it is, by the dtype of its input u = r * gain, on a
trained checkpoint's own residual streams (on the CPU: float64 math, no kernels, no GPU).

    python bench/fused_norm_precision.py --out_dir=out                  # the quickstart's model
    python bench/fused_norm_precision.py --out_dir=out --tokens=8192 --out=fused_norm_precision.md

On wide models a decode step fuses each LayerNorm into the layer after it (inference.fuse_norms): the one-row kernel
computes W LN(r) as rstd (W u - mean W gain) + W beta from u = r * gain, which the residual kernel before it writes
in the residual stream's dtype (bfloat16 in a bfloat16 model). A bfloat16 u rounds relative to |r|, where the layer
needs r - mean; a model without the fusion rounds the LayerNorm's output instead. For every LayerNorm of the model
(ln_1 before q/k/v, ln_2 before the MLP's up projection), over --tokens validation tokens, with r rounded to
bfloat16 as a bfloat16 model holds it and the layer's own weights, this prints the relative error (Frobenius norm,
against float64 math on the same r) of the layer's output computed
- unfused: the LayerNorm's output rounded to bfloat16, then the layer;
- fused from a float32 u, and from a bfloat16 u (the kernel's arithmetic, in float64 after u's rounding);
and the rows' sqrt(1 + mean^2 / var) (median, largest), the factor by which a bfloat16 u's error can exceed the
unfused one's.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from safety import table_file_or_exit, write_text_atomic  # noqa: E402


def layer_errors(r, norm, weight):
    """(unfused, fused float32 u, fused bfloat16 u) relative errors of weight @ norm(r) and the rows' factors
    sqrt(1 + mean^2 / var), for r (rows, n) as a bfloat16 model holds it, norm an nn.LayerNorm, weight (out, n)."""
    r = r.to(torch.bfloat16).double()
    w = weight.double()
    gain = norm.weight.detach().double()
    beta = norm.bias.detach().double() if norm.bias is not None else torch.zeros_like(gain)
    mean = r.mean(1, keepdim=True)
    var = r.var(1, unbiased=False, keepdim=True)
    rstd = 1 / (var + norm.eps).sqrt()
    normed = (r - mean) * rstd * gain + beta
    exact = normed @ w.T

    def rel(y):
        return ((y - exact).norm() / exact.norm()).item()
    unfused = normed.to(torch.bfloat16).double() @ w.T

    def fused(u):
        return rstd * (u @ w.T - mean * (gain @ w.T)) + beta @ w.T
    u = r * gain
    errors = (rel(unfused), rel(fused(u.float().double())), rel(fused(u.to(torch.bfloat16).double())))
    return errors, (1 + mean.squeeze(1) ** 2 / var.squeeze(1)).sqrt()


def residual_streams(model, tokens, block_size, batch):
    """Each LayerNorm of the blocks with its input rows over `tokens` (windows of block_size) and the weight of
    the layer after it: [(name, norm, rows, weight)]."""
    hooks, inputs = [], {}
    for i, block in enumerate(model.transformer.h):
        for name, norm in ((f"h{i}.ln_1", block.ln_1), (f"h{i}.ln_2", block.ln_2)):
            inputs[name] = []
            hooks.append(norm.register_forward_hook(
                lambda module, args, out, name=name: inputs[name].append(args[0].detach().flatten(0, -2))))
    windows = tokens[: len(tokens) // block_size * block_size].view(-1, block_size)
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            model(windows[start:start + batch])
    for hook in hooks:
        hook.remove()
    out = []
    for i, block in enumerate(model.transformer.h):
        attn, mlp = block.attn, block.mlp
        qkv = torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]).detach()
        out.append((f"h{i}.ln_1", block.ln_1, torch.cat(inputs[f"h{i}.ln_1"]), qkv))
        out.append((f"h{i}.ln_2", block.ln_2, torch.cat(inputs[f"h{i}.ln_2"]), mlp.mlp_up.weight.detach()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="the checkpoint's folder (or its .pt file)")
    p.add_argument("--tokens", type=int, default=4096, help="validation tokens whose residual streams are used")
    p.add_argument("--out", default="", help="also write the table here (a .md)")
    args = p.parse_args(argv)
    prog = "fused_norm_precision.py"
    if args.tokens < 1:
        sys.exit(f"{prog}: error: --tokens={args.tokens}: expected a positive number of tokens")
    if args.out:
        table_file_or_exit(args.out, "--out", prog)
    from checkpoint import checkpoint_dataset
    from inference import from_checkpoint, load_checkpoint
    from quantization.perplexity import split_tokens
    try:
        checkpoint = load_checkpoint(args.out_dir)
        model = from_checkpoint(checkpoint).eval().float()
        tokens = split_tokens(checkpoint_dataset(checkpoint), "val", args.tokens)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"{prog}: error: {e}")
    if not all(isinstance(b.ln_1, torch.nn.LayerNorm) and isinstance(b.ln_2, torch.nn.LayerNorm)
               for b in model.transformer.h):
        sys.exit(f"{prog}: error: {args.out_dir}: expected LayerNorms before attention and the MLP")
    block_size = min(model.config.block_size, len(tokens))
    flags = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Fused LayerNorm precision by the dtype of u: {args.out_dir}, {len(tokens)} validation tokens",
             "", f"command: python bench/fused_norm_precision.py {flags}",
             "", "| norm | unfused (bf16 output) | fused, float32 u | fused, bf16 u | sqrt(1 + mean^2/var), median | "
             "largest |", "|---|---:|---:|---:|---:|---:|"]
    for name, norm, rows, weight in residual_streams(model, tokens, block_size, batch=8):
        (unfused, u32, u16), factor = layer_errors(rows, norm, weight)
        lines.append(f"| {name} | {unfused:.2e} | {u32:.2e} | {u16:.2e} | {factor.median().item():.3f} | "
                     f"{factor.max().item():.3f} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        write_text_atomic(args.out, text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
