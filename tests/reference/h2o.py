"""Float64 reference of H2O (SPECS.md section 3), written from the spec with an explicit
probability matrix: per (row, kv-head), each step appends the new tokens, attends (causal
among the new ones), adds every token's probabilities summed over the group's query heads and
the step's queries to its score, then keeps the `recent` newest plus the `heavy`
highest-scoring others (the older of equal scores is evicted first)."""

from __future__ import annotations

import torch


class H2ORow:
    def __init__(self, kv_heads: int, heavy: int, recent: int):
        self.heavy, self.recent = heavy, recent
        self.heads = [dict() for _ in range(kv_heads)]  # position -> [k, v, score]
        self.seen = 0

    def kept(self, h: int) -> list[int]:
        return sorted(self.heads[h])

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, score: bool = True,
             evict: bool = True) -> torch.Tensor:
        """q [Hq, tn, D], k, v [Hkv, tn, D] -> out [Hq, tn, D] float64."""
        hkv, tn, _ = k.shape
        group = q.shape[0] // hkv
        out = torch.zeros(q.shape, dtype=torch.float64)
        for h, tokens in enumerate(self.heads):
            old = self.kept(h)
            keys = torch.stack([tokens[p][0] for p in old] + list(k[h].double().unbind(0)))
            values = torch.stack([tokens[p][1] for p in old] + list(v[h].double().unbind(0)))
            n = len(old)
            mask = torch.ones(tn, n + tn, dtype=torch.bool)
            mask[:, n:] = torch.ones(tn, tn, dtype=torch.bool).tril()
            colsum = torch.zeros(n + tn, dtype=torch.float64)
            for hq in range(h * group, (h + 1) * group):
                s = (q[hq].double() @ keys.T * sm_scale).masked_fill(~mask, float("-inf"))
                p = torch.softmax(s, -1)  # the explicit [tn, n + tn] probability matrix
                out[hq] = p @ values
                colsum += p.sum(0)
            if not score:
                colsum.zero_()
            for i, pos in enumerate(old):
                tokens[pos][2] += colsum[i].item()
            for j in range(tn):
                tokens[self.seen + j] = [k[h, j].double(), v[h, j].double(), colsum[n + j].item()]
        self.seen += tn
        if evict:
            self.evict()
        return out

    def evict(self) -> None:
        budget = self.heavy + self.recent
        for tokens in self.heads:
            if len(tokens) <= budget:
                continue
            candidates = sorted((tokens[p][2], p) for p in tokens if p < self.seen - self.recent)
            for _, p in candidates[: len(tokens) - budget]:
                del tokens[p]
