"""Pixelated butterfly (SPECS.md section 6): a fixed block-sparse pattern, the flat block
butterfly, plus a low-rank term. This module builds the pattern in the block-CSR form that
:func:`effx.ops.block_sparse_matmul` consumes; :class:`effx.nn.PixelflyLinear` is the layer.

The flat block butterfly of size ``2^m`` is the sum of the masks of the first ``m`` butterfly
factors over the block grid: factor ``t`` (``t = 0 .. m-1``) links block ``i`` with ``i`` and
``i XOR 2^t``, so block ``(i, j)`` is present when ``i XOR j`` is 0 or a power of two below
``2^m``. A rectangular ``R x C`` grid merges consecutive rows (or columns) of the square
pattern of side ``max(R, C)``, so every input and output block stays connected.
"""

from __future__ import annotations

import torch

from effx.ops import block_sparse_matmul

__all__ = ["block_sparse_matmul", "butterfly_layout", "layout_to_csr", "dense_of"]


def butterfly_layout(row_blocks: int, col_blocks: int, butterfly_size: int) -> torch.Tensor:
    """Bool mask ``[row_blocks, col_blocks]`` of the flat block butterfly of ``butterfly_size``
    (a power of two >= 1; 1 gives the block diagonal)."""
    if row_blocks < 1 or col_blocks < 1:
        raise ValueError(f"effx.pixelfly: block grid must be non-empty, got {row_blocks} x {col_blocks}")
    if butterfly_size < 1 or butterfly_size & (butterfly_size - 1):
        raise ValueError(f"effx.pixelfly: butterfly_size must be a power of two, got {butterfly_size}")
    side = max(row_blocks, col_blocks)
    u = torch.arange(side)
    diff = u[:, None] ^ u[None, :]
    square = (((diff & (diff - 1)) == 0) & (diff < butterfly_size)).double()  # diff 0 or a power of two
    # Shrinking a side merges consecutive square rows (columns): a block is present when any
    # square block it covers is, so every row and column keeps at least its diagonal block.
    rows = torch.nn.functional.one_hot(u * row_blocks // side, row_blocks).double().T
    cols = torch.nn.functional.one_hot(u * col_blocks // side, col_blocks).double().T
    return (rows @ square @ cols.T) > 0


def layout_to_csr(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_offsets, col_indices)`` (int64) of a bool block mask, blocks in row-major order."""
    rows, cols = layout.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=layout.shape[0])
    row_offsets = torch.zeros(layout.shape[0] + 1, dtype=torch.int64)
    row_offsets[1:] = counts.cumsum(0)
    return row_offsets.to(layout.device), cols.to(torch.int64)


def dense_of(blocks: torch.Tensor, row_offsets: torch.Tensor, col_indices: torch.Tensor,
             col_blocks: int) -> torch.Tensor:
    """The dense ``[R*block, C*block]`` matrix of a block-CSR weight (for inspection)."""
    bs = blocks.shape[1]
    eye = torch.eye(col_blocks * bs, dtype=blocks.dtype, device=blocks.device)
    return block_sparse_matmul(eye, blocks, row_offsets, col_indices).T
