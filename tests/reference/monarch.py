"""Float64 references for the Monarch and Pixelfly family, written from SPECS.md section 6
(not from the kernels): Monarch is out1 = blockdiag(w1) x; view out1 as (r, l), transpose;
out2 = blockdiag(w2) out1; view out2 as (l, s), transpose, flatten. The projection optimum is
found by plain gradient-based minimisation of the Frobenius error, independent of any SVD.
Pixelfly's block-sparse product is the dense matrix assembled block by block."""

from __future__ import annotations

import torch


def monarch_ref(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    k, q, p = w1.shape
    l, s, r = w2.shape
    lead = x.shape[:-1]
    xb = x.double().reshape(-1, k, p)
    out1 = torch.einsum("tkp,kqp->tkq", xb, w1.double()).reshape(-1, r, l).transpose(1, 2)  # (t, l, r)
    out2 = torch.einsum("tlr,lsr->tls", out1, w2.double())
    return out2.transpose(1, 2).reshape(*lead, s * l)


def monarch_dense_ref(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The [l*s, k*p] matrix of the Monarch product."""
    n_in = w1.shape[0] * w1.shape[2]
    return monarch_ref(torch.eye(n_in, dtype=torch.float64), w1, w2).T


def best_monarch_error(dense: torch.Tensor, shape1, shape2, restarts: int = 4, steps: int = 300) -> float:
    """Smallest ||dense - Monarch(w1, w2)||_F found by L-BFGS from several random starts."""
    target = dense.double()
    best = float("inf")
    gen = torch.Generator().manual_seed(0)
    for _ in range(restarts):
        w1 = torch.randn(shape1, generator=gen, dtype=torch.float64).requires_grad_()
        w2 = torch.randn(shape2, generator=gen, dtype=torch.float64).requires_grad_()
        opt = torch.optim.LBFGS([w1, w2], max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = (monarch_dense_ref(w1, w2) - target).pow(2).sum()
            loss.backward()
            return loss

        for _ in range(5):
            opt.step(closure)
        with torch.no_grad():
            best = min(best, (monarch_dense_ref(w1, w2) - target).norm().item())
    return best


def block_sparse_dense_ref(blocks: torch.Tensor, row_offsets, col_indices, col_blocks: int) -> torch.Tensor:
    bs = blocks.shape[1]
    row_blocks = len(row_offsets) - 1
    dense = torch.zeros(row_blocks * bs, col_blocks * bs, dtype=torch.float64)
    for rb in range(row_blocks):
        for e in range(int(row_offsets[rb]), int(row_offsets[rb + 1])):
            cb = int(col_indices[e])
            dense[rb * bs:(rb + 1) * bs, cb * bs:(cb + 1) * bs] += blocks[e].double()
    return dense


def block_sparse_ref(x, blocks, row_offsets, col_indices) -> torch.Tensor:
    col_blocks = x.shape[-1] // blocks.shape[1]
    return x.double() @ block_sparse_dense_ref(blocks, row_offsets.cpu(), col_indices.cpu(), col_blocks).T
