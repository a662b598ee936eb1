"""Calibration: windows of tokens to quantize with, and the inputs each transformer block sees on them, computed
once and cached (the model's forward is stopped at the first block)."""
import numpy as np
import torch


def calibration_samples(tokens, nsamples, seqlen, seed=0):
    """nsamples non-overlapping windows of seqlen tokens, drawn at random from a 1-D token array: (nsamples, seqlen)."""
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    if seqlen <= 0:
        raise ValueError(f"seqlen={seqlen}: must be at least 1")
    available = len(tokens) // seqlen
    if nsamples <= 0 or nsamples > available:
        raise ValueError(f"nsamples={nsamples}: the calibration data has {len(tokens):,} tokens, enough for "
                         f"1..{available} samples of seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(available, generator=g)[:nsamples] * seqlen
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def prepare_samples(model, calibration, nsamples, seqlen=None, seed=0):
    """(nsamples, seqlen) token ids for a model: windows drawn from a 1-D token array, or the first rows of a
    ready 2-D tensor. seqlen defaults to the model's block_size and may not exceed it."""
    seqlen = seqlen or model.config.block_size
    if seqlen > model.config.block_size:
        raise ValueError(f"seqlen={seqlen}: longer than the model's block_size {model.config.block_size}")
    calibration = torch.as_tensor(calibration)
    if calibration.dim() == 2:
        if nsamples > calibration.size(0):
            raise ValueError(f"nsamples={nsamples}: only {calibration.size(0)} calibration samples were given")
        return calibration[:nsamples, :seqlen].long()
    return calibration_samples(calibration, nsamples, seqlen, seed)


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model, samples, batch_size, device):
    """The hidden states entering the first block for each calibration sample: (nsamples, seqlen, n_embd)."""
    cache = []

    def hook(module, args):
        cache.append(args[0].detach())
        raise _Stop

    handle = model.transformer.h[0].register_forward_pre_hook(hook)
    try:
        for batch in samples.split(batch_size):
            try:
                model(batch.to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(cache)


@torch.no_grad()
def run_block(block, inputs, batch_size):
    """A block's outputs over cached inputs, in batches."""
    return torch.cat([block(x) for x in inputs.split(batch_size)])
