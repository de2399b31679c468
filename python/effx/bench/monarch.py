"""Benchmark suite ``monarch``: effx's Monarch matmul (forward, and forward+backward) against
nn.Linear of the same size (the dense layer it replaces) and against the unfused PyTorch way
(two batched matmuls with the permutations as reshapes/transposes, autograd for backward).
The op column names the baseline: ``fwd:linear``, ``fwd:2bmm``, ``f+b:linear``, ``f+b:2bmm``."""

from __future__ import annotations

import itertools

import torch

from effx.bench.harness import Record, measure_roofs, median_time
from effx.monarch import monarch_matmul


def torch_monarch(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Monarch with two torch.bmm and reshapes (the research code's way; the baseline)."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    t = x.reshape(-1, k, p).transpose(0, 1)  # (k, t, p)
    out1 = torch.bmm(t, w1.transpose(1, 2))  # (k, t, q)
    out1 = out1.transpose(0, 1).reshape(-1, r, l).transpose(1, 2).transpose(0, 1)  # (l, t, r)
    out2 = torch.bmm(out1, w2.transpose(1, 2))  # (l, t, s)
    return out2.permute(1, 2, 0).reshape(*x.shape[:-1], s * l)


def _cases(device: torch.device, quick: bool):
    if quick:
        yield 1024, 16, 16
        yield 1024, 16, 1024
        return
    sizes = (1024, 4096, 8192)
    tokens = (16, 1024, 16384) if device.type == "cuda" else (16, 1024)
    for n in sizes:
        for nblocks in (4, 16, 64):
            for t in tokens:
                if device.type == "cpu" and n * n * t > 4096 * 4096 * 1024:
                    continue  # a dense baseline over a second per call on a few cores
                yield n, nblocks, t


def run(device: torch.device, quick: bool = False) -> list[Record]:
    roofs = measure_roofs(device)
    # CPUs: fp32, and bf16 too where the CPU has bf16 units (AVX512_BF16 or AMX)
    dtypes = [torch.bfloat16] if device.type == "cuda" else (
        [torch.float32] + ([torch.bfloat16] if roofs.bf16_dot_tflops or roofs.amx_tflops else []))
    runs = 20 if device.type == "cuda" else 5
    records = []
    for (n, nblocks, tokens), dtype in itertools.product(_cases(device, quick), dtypes):
        name = str(dtype).replace("torch.", "")
        b = n // nblocks
        x = torch.randn(tokens, n, device=device, dtype=dtype)
        w1 = torch.randn(nblocks, b, b, device=device, dtype=dtype) / b**0.5
        w2 = torch.randn(nblocks, b, b, device=device, dtype=dtype) / b**0.5
        dense = torch.nn.Linear(n, n, bias=False, device=device, dtype=dtype)
        shape = {"n": n, "blocks": nblocks, "tokens": tokens}
        flops = 4.0 * tokens * n * b
        moved = (2 * tokens * n + 2 * nblocks * b * b) * x.element_size()
        with torch.no_grad():
            t = median_time(lambda: monarch_matmul(x, w1, w2), device, runs=runs)
            t_dense = median_time(lambda: dense(x), device, runs=runs)
            t_bmm = median_time(lambda: torch_monarch(x, w1, w2), device, runs=runs)
        records.append(Record("monarch", "fwd:linear", shape, name, roofs.device, t, moved, flops, "nn.Linear", t_dense, roofs))
        records.append(Record("monarch", "fwd:2bmm", shape, name, roofs.device, t, moved, flops, "two bmm", t_bmm, roofs))

        xg, w1g, w2g = (v.clone().requires_grad_() for v in (x, w1, w2))
        grad = torch.randn_like(x)

        def train(fn):
            fn().backward(grad)

        t = median_time(lambda: train(lambda: monarch_matmul(xg, w1g, w2g)), device, runs=runs)
        t_dense = median_time(lambda: train(lambda: dense(xg)), device, runs=runs)
        t_bmm = median_time(lambda: train(lambda: torch_monarch(xg, w1g, w2g)), device, runs=runs)
        records.append(Record("monarch", "f+b:linear", shape, name, roofs.device, t, 3 * moved, 3 * flops, "nn.Linear",
                              t_dense, roofs))
        records.append(Record("monarch", "f+b:2bmm", shape, name, roofs.device, t, 3 * moved, 3 * flops, "two bmm",
                              t_bmm, roofs))
        del x, w1, w2, dense, xg, w1g, w2g, grad
    return records
