"""Spread launches give the same outputs as plain PDL ones (the shared memory asked for is unused)."""
import sys
import torch
sys.path.insert(0, ".")
from quantization.kernels import PackedLinear, ops
from quantization.quantizers import QuantSpec
print("shared memory (per multiprocessor, optin):", ops._shared_memory(0), "multiprocessors:",
      ops.multiprocessors(torch.device("cuda")))
spec = QuantSpec("affine_quant", 4, "per_group", 128)
for k, n in ((4096, 12288), (4096, 4096), (4096, 16384), (16384, 4096), (768, 3072)):
    layer = PackedLinear.from_float(torch.randn(n, k, device="cuda") * 0.02, spec).cuda()
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    args = (x, layer.qweight, layer.scale, layer.zero, None, layer.bits, ops.blocks_of(layer.group_size, k),
            layer.zero_const)
    config = ops.one_row_config(args, layer.group_size, k, layer.split_counters)
    outs = [ops.stream_gemv(*args, config, counters=layer.split_counters, pdl=True, spread=s) for s in (False, True)]
    ref = x.float() @ layer.dequantized_weight().float().T
    torch.cuda.synchronize()
    tiles, split, _ = ops.stream_grid(1, n, k, config, x.device)
    print(f"{k}x{n} config {config} programs {tiles * split}: spread equals plain "
          f"{torch.equal(outs[0], outs[1])}, max |plain - float| {(outs[0].float() - ref).abs().max().item():.3e}")
