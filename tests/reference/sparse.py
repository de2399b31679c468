"""Float64 reference of DejaVu contextual sparsity, written from SPECS.md section 4 (not from
the kernels): the up projection reads only the selected rows of W1 (and Wg),
h = act(x W1[idx]^T + b1[idx]) or act(x Wg[idx]^T + bg[idx]) * (x W1[idx]^T + b1[idx]); the
down projection reads only the selected rows of the transposed W2t, y = h W2t[idx] + b2. An
index may select a block of R consecutive rows (attention heads: R = head_dim). idx is [k]
(shared by the batch) or [B, k] (one set per row)."""

from __future__ import annotations

import math

import torch

ACTIVATIONS = {
    "none": lambda v: v,
    "relu": torch.relu,
    "gelu": lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2))),
    "gelu_tanh": lambda v: 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))),
    "silu": lambda v: v * torch.sigmoid(v),
}


def selected_rows(idx: torch.Tensor, rows_per_index: int = 1) -> torch.Tensor:
    """Weight rows an index set selects: index i -> rows i*R .. i*R + R - 1, in order."""
    r = torch.arange(rows_per_index, device=idx.device)
    return (idx.long().unsqueeze(-1) * rows_per_index + r).flatten(-2)


def _project(x: torch.Tensor, w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    x, w = x.double(), w.double()
    if rows.dim() == 1:
        return x @ w[rows].T
    return torch.einsum("bd,bkd->bk", x, w[rows])


def sparse_up_ref(x, w_up, idx, activation="relu", w_gate=None, b_up=None, b_gate=None, rows_per_index=1):
    rows = selected_rows(idx.cpu(), rows_per_index)
    x, w_up = x.cpu(), w_up.cpu()
    up = _project(x, w_up, rows)
    if b_up is not None:
        up = up + b_up.cpu().double()[rows]
    act = ACTIVATIONS[activation]
    if w_gate is None:
        return act(up)
    gate = _project(x, w_gate.cpu(), rows)
    if b_gate is not None:
        gate = gate + b_gate.cpu().double()[rows]
    return act(gate) * up


def sparse_down_ref(h, w_down_t, idx, b_down=None, rows_per_index=1):
    rows = selected_rows(idx.cpu(), rows_per_index)
    h, w = h.cpu().double(), w_down_t.cpu().double()
    y = h @ w[rows] if rows.dim() == 1 else torch.einsum("bk,bkd->bd", h, w[rows])
    if b_down is not None:
        y = y + b_down.cpu().double()
    return y


def sparse_mlp_ref(x, w_up, w_down_t, idx, activation="relu", w_gate=None, b_up=None, b_down=None, b_gate=None):
    h = sparse_up_ref(x, w_up, idx, activation, w_gate, b_up, b_gate)
    return sparse_down_ref(h, w_down_t, idx, b_down)


def dense_attention_step_ref(q, k_cache, v_cache, num_kv_heads):
    """One decode step of dense attention in float64: q [B, Hq, D], caches [B, Hkv, T, D];
    returns [B, Hq, D]. Query head h reads kv-head h // (Hq / Hkv)."""
    group = q.shape[1] // num_kv_heads
    k = k_cache.double().repeat_interleave(group, dim=1)
    v = v_cache.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", q.double(), k) / math.sqrt(q.shape[-1])
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), v)
