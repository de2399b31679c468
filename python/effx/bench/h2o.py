"""Benchmark suite ``h2o``: the cost of H2O's fused scoring (dense cache attention with and
without scores), of eviction per step, and an H2OCache decode step at a 20% budget against a
DenseCache over the full context (shapes of the kivi suite)."""

from __future__ import annotations

import torch

from effx import kv
from effx.bench.harness import Record, measure_roofs, median_time
from effx.bench.kivi import D, HKV, HQ, decode_cases


def run(device: torch.device, quick: bool = False) -> list[Record]:
    roofs = measure_roofs(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    name = str(dtype).replace("torch.", "")
    runs = 30 if device.type == "cuda" else 10
    records = []
    for b, t in decode_cases(device, quick):
        torch.manual_seed(0)
        shape = {"B": b, "T": t, "Hkv": HKV, "Hq": HQ, "D": D}
        k = torch.randn(b, HKV, t, D, device=device, dtype=dtype)
        v = torch.randn(b, HKV, t, D, device=device, dtype=dtype)
        q = torch.randn(b, HQ, 1, D, device=device, dtype=dtype)
        k1 = torch.randn(b, HKV, 1, D, device=device, dtype=dtype)
        v1 = torch.randn(b, HKV, 1, D, device=device, dtype=dtype)
        lengths = torch.full((b,), t, dtype=torch.int64, device=device)
        kc = torch.cat([k, k1], 2)
        vc = torch.cat([v, v1], 2)
        scores = torch.zeros(b, HKV, t + 1, device=device)
        kv_bytes = 2 * k.nbytes
        flops = 4.0 * b * HQ * t * D
        t_plain = median_time(lambda: torch.ops.effx.dense_attention(q, k1, v1, kc, vc, lengths, None, None, True,
                                                                        D**-0.5), device, runs=runs)
        t_score = median_time(lambda: torch.ops.effx.h2o_attention(q, k1, v1, kc, vc, lengths, None, None, scores,
                                                                     True, D**-0.5), device, runs=runs)
        records.append(Record("h2o", "score-attn", shape, name, roofs.device, t_score, kv_bytes, flops,
                              "attn w/o scores", t_plain, roofs))

        budget = max(2, t // 5)  # the paper's 20%: 10% heavy + 10% recent
        h2o = kv.H2OCache(1, b, HKV, D, budget + 2 * (runs + 10), heavy=budget // 2, recent=budget - budget // 2,
                          dtype=dtype, device=device)
        # Fill the budget and score it once, then time steady-state decode steps (one eviction each).
        h2o.extend(0, k[:, :, :budget], v[:, :, :budget])
        h2o.attend(0, q, k1, v1)
        t_h2o = median_time(lambda: h2o.attend(0, q, k1, v1), device, runs=runs)
        dense = kv.DenseCache(1, b, HKV, D, t + 2 * (runs + 10), dtype=dtype, device=device)
        dense.extend(0, k, v)
        t_dense = median_time(lambda: dense.attend(0, q, k1, v1), device, runs=runs)
        shape_b = dict(shape, budget=budget)
        records.append(Record("h2o", "h2o-step", shape_b, name, roofs.device, t_h2o, 2 * k.nbytes * budget / t,
                              flops * budget / t, "dense full ctx", t_dense, roofs))
        held = h2o._state[0]
        state = held.clone()
        state[:, 0] = budget + 1
        st = [h2o.k[0].clone(), h2o.v[0].clone(), h2o._scores[0].clone(), h2o._positions[0].clone()]

        def evict_once():
            held.copy_(state)
            torch.ops.effx.h2o_evict_(*st, held, budget // 2, budget - budget // 2)

        t_evict = median_time(evict_once, device, runs=runs)
        t_copy = median_time(lambda: held.copy_(state), device, runs=runs)
        records.append(Record("h2o", "evict-1", shape_b, name, roofs.device, max(t_evict - t_copy, 1e-9),
                              8.0 * b * HKV * budget, 0.0, "attn w/o scores", t_plain, roofs))
        del h2o, dense, k, v, kc, vc
    return records
