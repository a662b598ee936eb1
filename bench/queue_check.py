"""The one-row kernel through its queue against its plain grid on a GPU: the 6.7B layer shapes and a small one,
equal outputs and counters back at 0 (bench/results/pdl_queue_h100/check.txt)."""
import sys
sys.path.insert(0, '.')
import torch
from quantization.kernels import PackedLinear, ops
from quantization.quantizers import QuantSpec
torch.manual_seed(0)
spec = QuantSpec("affine_quant", 4, "per_group", 128)
bad = 0
for k, n, cfg, act in [(4096, 12288, (32, 32, 2, 8, 1), 0), (4096, 4096, (32, 32, 0, 8, 1, 1), 0),
                       (4096, 16384, (32, 32, 2, 8, 1), 1), (16384, 4096, (32, 32, 2, 8, 1), 0),
                       (256, 100, (64, 4, 16, 4, 0), 1)]:
    layer = PackedLinear.from_float(torch.randn(n, k, device="cuda") * 0.02, spec).cuda()
    q = torch.zeros(ops.QUEUE_COUNTERS, device="cuda", dtype=torch.int32)
    c = layer.split_counters[:-ops.QUEUE_COUNTERS]
    for rep in range(3):
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        args = (x, layer.qweight, layer.scale, layer.zero, None, layer.bits, ops.blocks_of(128, k), layer.zero_const, cfg)
        plain = ops.stream_gemv(*args, counters=c, activation=act, pdl=False)
        queued = ops.stream_gemv(*args, counters=c, activation=act, pdl=True, queue=q, cap=1 if rep == 2 else None)
        torch.cuda.synchronize()
        diff = float((plain.float() - queued.float()).abs().max())
        left = int(q.abs().sum()) + int(c.abs().sum())
        bad += diff != 0 or left != 0
        print(f"{k}x{n} {cfg} rep {rep}: max diff {diff}, counters left {left}")
print("queue check:", "passed" if bad == 0 else f"FAILED ({bad})")
