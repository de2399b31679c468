"""Benchmark suite ``sparse``: the DejaVu sparse MLP (gathered up/gate and down projections)
against the dense PyTorch MLP and against the plain-PyTorch way of computing the same sparse
MLP (``index_select`` of the selected rows, then matmuls).

Each call gets the next index set of a rotating pool of random sets (sorted, distinct, as
top-k gives them), as decoding does, so the gathered rows are not served from the cache
the previous call warmed. ``bytes`` is the gathered weight bytes (up, gate and down rows)
plus the activations; GB/s and the roof fraction are measured on those. The effx call skips
the host-side index validation (``check_indices=False``), as a caller with top-k indices does.

On CUDA every timed call (effx and both baselines) is a CUDA-graph replay, as a decode loop
runs it: at batch 1 a sparse MLP takes a few microseconds of GPU time, less than the Python
and dispatcher time of launching it, which would otherwise be what is measured.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from effx import ops
from effx.bench.harness import Record, measure_roofs, median_time

_POOL = 8
_TORCH_ACT = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu}


def dense_mlp(x, w_up, w_down, w_gate, act):
    """The dense MLP in PyTorch: w_down is [d, n] (nn.Linear.weight of the down projection)."""
    h = _TORCH_ACT[act](F.linear(x, w_gate)) * F.linear(x, w_up) if w_gate is not None else _TORCH_ACT[act](F.linear(x, w_up))
    return F.linear(h, w_down)


def gathered_mlp(x, w_up, w_down_t, idx, w_gate, act):
    """The same sparse MLP in plain PyTorch: gather the selected rows, then matmuls."""
    up = F.linear(x, w_up.index_select(0, idx))
    h = _TORCH_ACT[act](F.linear(x, w_gate.index_select(0, idx))) * up if w_gate is not None else _TORCH_ACT[act](up)
    return h @ w_down_t.index_select(0, idx)


def _graphed(fn):
    """A CUDA graph of one call of ``fn`` (warmed up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _rotating(fns, device):
    """One callable that runs the next of ``fns`` each time (graph replays on CUDA)."""
    if device.type == "cuda":
        fns = [_graphed(f).replay for f in fns]
    it = itertools.cycle(fns)
    return lambda: next(it)()


def _cases(device: torch.device, quick: bool):
    """(d, n, gated, activation, dtype, batches, densities)."""
    if device.type == "cuda":
        if quick:
            yield 4096, 14336, True, "silu", torch.bfloat16, (1, 16), (0.1, 0.5)
            return
        densities = (0.05, 0.1, 0.25, 0.5, 1.0)
        yield 4096, 14336, True, "silu", torch.bfloat16, (1, 4, 16, 64), densities  # Llama-3-8B SwiGLU
        yield 4096, 16384, False, "relu", torch.bfloat16, (1, 4, 16, 64), densities  # OPT-6.7B ReLU
        yield 4096, 11008, True, "silu", torch.bfloat16, (1, 4, 16, 64), densities  # Llama-7B SwiGLU
    else:
        if quick:
            yield 1024, 2752, True, "silu", torch.bfloat16, (1, 4), (0.1, 0.5)
            return
        densities = (0.1, 0.25, 0.5, 1.0)
        yield 4096, 14336, True, "silu", torch.bfloat16, (1, 4, 16), densities  # Llama-3-8B SwiGLU
        yield 4096, 16384, False, "relu", torch.bfloat16, (1, 4, 16), (0.05, 0.1, 0.5)  # OPT-6.7B ReLU


def run(device: torch.device, quick: bool = False) -> list[Record]:
    roofs = measure_roofs(device)
    records = []
    gen = torch.Generator().manual_seed(0)
    cuda = device.type == "cuda"
    runs = 50 if cuda else 7
    for d, n, gated, act, dtype, batches, densities in _cases(device, quick):
        def weight(rows, cols):
            return (torch.randn(rows, cols, generator=gen) * cols**-0.5).to(device=device, dtype=dtype)

        w_up = weight(n, d)
        w_gate = weight(n, d) if gated else None
        w_down = weight(d, n)  # nn.Linear layout for the dense baseline
        w_down_t = w_down.t().contiguous()  # effx layout: a neuron is one contiguous row
        name = "swiglu" if gated else act
        es = w_up.element_size()
        matrices = 3 if gated else 2
        for batch in batches:
            x = torch.randn(batch, d, generator=gen).to(device=device, dtype=dtype)
            dense = _rotating([lambda: dense_mlp(x, w_up, w_down, w_gate, act)], device)
            t_dense = median_time(dense, device, runs=runs)
            for density in densities:
                k = max(1, int(round(density * n)))
                pool = [torch.randperm(n, generator=gen)[:k].sort().values.to(device) for _ in range(_POOL)]
                effx_calls = _rotating([lambda i=i: ops.sparse_mlp(x, w_up, w_down_t, i, act, w_gate,
                                                                   check_indices=False) for i in pool], device)
                gather_calls = _rotating([lambda i=i: gathered_mlp(x, w_up, w_down_t, i, w_gate, act)
                                          for i in pool], device)
                t = median_time(effx_calls, device, runs=runs)
                t_gather = median_time(gather_calls, device, runs=max(3, runs // 2))
                nbytes = matrices * k * d * es + 2 * batch * d * es
                flops = 2.0 * matrices * batch * k * d
                # the op column names the baseline of the row's speed-up
                shape = {"act": name, "B": batch, "n": n, "k": k, "d": d, "density": density}
                dt = str(dtype).replace("torch.", "")
                records.append(Record("sparse", "vs-dense", shape, dt, roofs.device, t, nbytes, flops,
                                      "dense torch MLP", t_dense, roofs))
                records.append(Record("sparse", "vs-gather", shape, dt, roofs.device, t, nbytes, flops,
                                      "torch index_select + matmul", t_gather, roofs))
        del w_up, w_gate, w_down, w_down_t
    return records
