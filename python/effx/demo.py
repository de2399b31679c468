"""``effx demo``: every effx method built so far, on one machine, in one table.

The model runner (a small Llama-architecture model generating with each method) is still to
come; until then the demo drives what exists on synthetic data with random values (fixed
seed): the KV caches through a decode loop of one attention layer, and the quantization
primitive on a KV-cache-shaped tensor. Methods not built yet are listed as such.
"""

from __future__ import annotations

import time

import torch

from effx import kv, ops
from effx.bench.harness import median_time

# Methods of the model runner that have not landed yet; each row says so plainly.
_PENDING = ["sparse MLP (DejaVu)", "offload (FlexGen)"]

BATCH, KV_HEADS, Q_HEADS, HEAD_DIM, PROMPT, STEPS = 1, 8, 32, 128, 1024, 64


def _decode(cache: kv.KVCache, qs, ks, vs):
    """Prefill then one token per step through ``cache``; returns (outputs, decode seconds)."""
    cache.attend(0, qs[0], ks[0], vs[0])
    outs = []
    start = time.perf_counter()
    for q, k, v in zip(qs[1:], ks[1:], vs[1:]):
        outs.append(cache.attend(0, q, k, v))
    if qs[0].is_cuda:
        torch.cuda.synchronize()
    return torch.cat(outs, 2), time.perf_counter() - start


def cache_rows(device: torch.device, dtype: torch.dtype) -> list[str]:
    g = torch.Generator().manual_seed(0)

    def rand(h, t):
        return torch.randn(BATCH, h, t, HEAD_DIM, generator=g).to(device=device, dtype=dtype)

    lens = [PROMPT] + [1] * STEPS
    qs, ks, vs = [rand(Q_HEADS, t) for t in lens], [rand(KV_HEADS, t) for t in lens], [rand(KV_HEADS, t) for t in lens]
    capacity = PROMPT + STEPS
    caches = {
        "dense KV cache": kv.DenseCache(1, BATCH, KV_HEADS, HEAD_DIM, capacity, dtype=dtype, device=device),
        "KIVI-4": kv.KIVICache(1, BATCH, KV_HEADS, HEAD_DIM, capacity, bits=4, dtype=dtype, device=device),
        "KIVI-2": kv.KIVICache(1, BATCH, KV_HEADS, HEAD_DIM, capacity, bits=2, dtype=dtype, device=device),
        # 20% of the prompt (10% heavy + 10% recent); the prompt is scored and evicted in
        # chunks of 128 so the storage never exceeds the budget plus one chunk.
        "H2O 20% (streamed prefill)": kv.H2OCache(1, BATCH, KV_HEADS, HEAD_DIM, PROMPT // 5 + 128, heavy=0.1,
                                                 recent=0.1, dtype=dtype, device=device, prefill_chunk=128),
    }
    rows, reference = [], None
    for name, cache in caches.items():
        out, seconds = _decode(cache, qs, ks, vs)
        if reference is None:
            reference, dense_bytes = out.double(), cache.nbytes()
        err = ((out.double() - reference).norm() / reference.norm()).item()
        cos = torch.nn.functional.cosine_similarity(out.double().flatten(1), reference.flatten(1)).min().item()
        rows.append(f"{name:<26} {STEPS / seconds:>10.1f} {cache.nbytes():>12,} {dense_bytes / cache.nbytes():>7.2f}x "
                    f"{err:>11.2e} {cos:>8.4f}")
    return rows


def quant_rows(device: torch.device, dtype: torch.dtype) -> list[str]:
    torch.manual_seed(0)
    x = torch.randn(4, 8, 1024, 128, device=device, dtype=dtype)
    fp16_bytes = x.numel() * 2
    rows = []
    for bits in (8, 4, 2):
        for group in (128, 32):
            codes, scale, zero = ops.quantize(x, bits, group)
            back = ops.dequantize(codes, scale, zero, bits, group, dtype)
            held = codes.nbytes + scale.nbytes + zero.nbytes
            err = ((back.double() - x.double()).norm() / x.double().norm()).item()
            tq = median_time(lambda: ops.quantize(x, bits, group), device, runs=10)
            td = median_time(lambda: ops.dequantize(codes, scale, zero, bits, group, dtype), device, runs=10)
            name = f"quantize {bits}-bit, G={group}"
            rows.append(f"{name:<26} {held:>11,} {fp16_bytes / held:>7.2f}x {err:>11.2e} {tq * 1e3:>9.3f} {td * 1e3:>11.3f}")
    return rows


def run_demo(device: torch.device) -> int:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(f"effx demo on {device} ({dtype}); synthetic data with random values (seed 0)\n")
    print(f"KV caches: one attention layer, batch {BATCH}, {KV_HEADS} kv-heads, {Q_HEADS} query heads, "
          f"head_dim {HEAD_DIM}, prompt {PROMPT}, {STEPS} decode steps; error and cosine vs dense outputs")
    print(f"{'method':<26} {'steps/s':>10} {'KV bytes':>12} {'smaller':>8} {'rel. error':>11} {'min cos':>8}")
    for row in cache_rows(device, dtype):
        print(row)
    print(f"\nquantization of a [4, 8, 1024, 128] float16 tensor (the KV-cache compressor)")
    print(f"{'method':<26} {'bytes':>11} {'vs fp16':>8} {'rel. error':>11} {'quant ms':>9} {'dequant ms':>11}")
    for row in quant_rows(device, torch.float16):
        print(row)
    print()
    from effx.monarch import monarch_demo_row

    print(f"{'structured layer':<26} {'bytes':>11} {'vs dense':>8} {'rel. error':>11} {'ms':>9} {'dense ms':>11}")
    print(monarch_demo_row(device))
    print()
    from effx.spec import spec_demo_rows

    print("tree speculation: random 8-layer model (dim 512, vocab 2048), draft = its first layer; greedy, 48 tokens")
    print(f"{'method':<26} {'tok/step':>10} {'tok/s':>10} {'speedup':>9} {'= greedy':>9}")
    for row in spec_demo_rows(device):
        print(row)
    print()
    for name in _PENDING:
        print(f"{name:<26} not built yet")
    return 0
