"""Float64 reference of cache attention (SPECS.md sections 2 and 8): one softmax over the
cached tokens plus the new ones; new tokens causal among themselves or following a tree; an
optional sliding window over positions (cached token t at position t, new token i at
n_cached + i, or n_cached + its depth in a tree)."""

from __future__ import annotations

import torch


def visible_new(tn: int, causal: bool = True, parents: list[int] | None = None) -> torch.Tensor:
    """[tn, tn] bool: may new query i see new token j?"""
    if parents is not None:
        mask = torch.zeros(tn, tn, dtype=torch.bool)
        for i in range(tn):
            j = i
            while j >= 0:
                mask[i, j] = True
                j = parents[j]
        return mask
    if causal:
        return torch.ones(tn, tn, dtype=torch.bool).tril()
    return torch.ones(tn, tn, dtype=torch.bool)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_cached: int, sm_scale: float,
                  causal: bool = True, parents: list[int] | None = None, window: int = 0):
    """One batch row. q [Hq, tn, D]; k, v [Hkv, n_cached + tn, D] (cached then new); with a
    window, the query at position p sees positions > p - window only.
    Returns (out [Hq, tn, D], lse [Hq, tn]) in float64."""
    hq, tn, _ = q.shape
    group = hq // k.shape[0]
    k = k.double().repeat_interleave(group, 0)
    v = v.double().repeat_interleave(group, 0)
    scores = q.double() @ k.transpose(1, 2) * sm_scale
    mask = torch.ones(tn, n_cached + tn, dtype=torch.bool)
    mask[:, n_cached:] = visible_new(tn, causal, parents)
    if window:
        offsets = list(range(tn))
        if parents is not None:
            for i, p in enumerate(parents):
                offsets[i] = 0 if p < 0 else offsets[p] + 1
        positions = torch.cat([torch.arange(n_cached), n_cached + torch.tensor(offsets, dtype=torch.int64)])
        mask &= positions[None, :] > positions[n_cached:, None] - window
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1) @ v, lse
