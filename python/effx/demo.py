"""``effx demo``: every effx method built so far, on one machine, in one table.

So far effx has its quantization primitive; the demo applies it to a KV-cache-shaped tensor
(the use KIVI and the offload compressor make of it) and lists the methods still to come.
"""

from __future__ import annotations

import torch

from effx import ops
from effx.bench.harness import median_time

# Methods of the model runner that have not landed yet; each row says so plainly.
_PENDING = ["dense KV cache", "KIVI-2", "KIVI-4", "H2O 20%", "sparse MLP (DejaVu)",
            "tree speculation", "offload (FlexGen)"]


def run_demo(device: torch.device) -> int:
    torch.manual_seed(0)
    dtype = torch.float16
    # A KV-cache-shaped tensor: batch 4, 8 kv-heads, 1024 tokens, head_dim 128, values per token.
    kv = torch.randn(4, 8, 1024, 128, device=device, dtype=dtype)
    fp16_bytes = kv.numel() * 2
    print(f"effx demo on {device} ({dtype}), tensor [4, 8, 1024, 128] (random values, seed 0)\n")
    print(f"{'method':<26} {'bytes':>11} {'vs fp16':>8} {'rel. error':>11} {'quant ms':>9} {'dequant ms':>11}")
    print(f"{'fp16 reference':<26} {fp16_bytes:>11,} {1.0:>7.2f}x {0.0:>11.2e} {'-':>9} {'-':>11}")
    for bits in (8, 4, 2):
        for group in (128, 32):
            codes, scale, zero = ops.quantize(kv, bits, group)
            back = ops.dequantize(codes, scale, zero, bits, group, dtype)
            held = codes.nbytes + scale.nbytes + zero.nbytes
            err = ((back.double() - kv.double()).norm() / kv.double().norm()).item()
            tq = median_time(lambda: ops.quantize(kv, bits, group), device, runs=10)
            td = median_time(lambda: ops.dequantize(codes, scale, zero, bits, group, dtype), device, runs=10)
            name = f"quantize {bits}-bit, G={group}"
            print(f"{name:<26} {held:>11,} {fp16_bytes / held:>7.2f}x {err:>11.2e} {tq * 1e3:>9.3f} {td * 1e3:>11.3f}")
    print()
    from effx.monarch import monarch_demo_row

    print(f"{'structured layer':<26} {'bytes':>11} {'vs dense':>8} {'rel. error':>11} {'ms':>9} {'dense ms':>11}")
    print(monarch_demo_row(device))
    print()
    for name in _PENDING:
        print(f"{name:<26} not built yet")
    return 0
