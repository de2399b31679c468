"""effx layers: drop-in replacements for ``nn.Linear`` built on effx's structured matmuls.

- :class:`MonarchLinear`: a Monarch matrix ``P2 B2 P1 B1`` (SPECS.md section 6) with
  ``nblocks`` blocks per factor; sizes that ``nblocks`` does not divide are zero-padded.
- :class:`PixelflyLinear`: the flat block-butterfly block-sparse pattern plus a low-rank term.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effx import monarch
from effx import pixelfly

__all__ = ["MonarchLinear", "PixelflyLinear"]


class MonarchLinear(nn.Module):
    """``y = x @ M.T + bias`` with ``M`` Monarch: ``2 * nblocks * q * (in + out) / nblocks``
    weights instead of ``in * out`` (``q = min`` of the padded block sizes).

    ``in_features`` and ``out_features`` are rounded up to multiples of ``nblocks``: inputs
    are zero-padded and the extra outputs dropped, so any sizes work.
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"effx.nn.MonarchLinear: sizes must be positive, got {in_features} -> {out_features}")
        if nblocks < 1:
            raise ValueError(f"effx.nn.MonarchLinear: nblocks must be positive, got {nblocks}")
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.in_padded = -(-in_features // nblocks) * nblocks
        self.out_padded = -(-out_features // nblocks) * nblocks
        shape1, shape2 = monarch.factor_shapes(self.in_padded, self.out_padded, nblocks)
        factory = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(shape1, **factory))
        self.w2 = nn.Parameter(torch.empty(shape2, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each factor like nn.Linear's init over its own fan-in (p for w1, q for w2).
        for w in (self.w1, self.w2):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, nblocks: int) -> "MonarchLinear":
        """The MonarchLinear closest to ``linear`` in Frobenius norm (effx.monarch.project of its
        zero-padded weight), with the same bias, device and dtype."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, nblocks, linear.bias is not None,
                    device=w.device, dtype=w.dtype)
        padded = torch.zeros(layer.out_padded, layer.in_padded, device=w.device, dtype=w.dtype)
        padded[: linear.out_features, : linear.in_features] = w.detach()
        w1, w2 = monarch.project(padded, nblocks)
        with torch.no_grad():
            layer.w1.copy_(w1)
            layer.w2.copy_(w2)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"effx.nn.MonarchLinear: x must have last dim {self.in_features}, got {x.shape[-1]}")
        if self.in_padded != self.in_features:
            x = F.pad(x, (0, self.in_padded - self.in_features))
        y = monarch.monarch_matmul(x, self.w1, self.w2)
        if self.out_padded != self.out_features:
            y = y[..., : self.out_features]
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
                f"bias={self.bias is not None}")


class PixelflyLinear(nn.Module):
    """``y = x @ (S + U V).T + bias``: ``S`` block-sparse with the flat block-butterfly pattern
    (blocks of ``block_size``, butterfly of ``butterfly_size`` blocks) and ``U V`` of rank
    ``rank`` (Pixelated butterfly, SPECS.md section 6). Sizes that ``block_size`` does not
    divide are zero-padded like :class:`MonarchLinear`.
    """

    def __init__(self, in_features: int, out_features: int, block_size: int = 32, butterfly_size: int = 4,
                 rank: int = 32, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"effx.nn.PixelflyLinear: sizes must be positive, got {in_features} -> {out_features}")
        if not 1 <= block_size <= 64:
            raise ValueError(f"effx.nn.PixelflyLinear: block_size must be in [1, 64], got {block_size}")
        if rank < 0:
            raise ValueError(f"effx.nn.PixelflyLinear: rank must be >= 0, got {rank}")
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.butterfly_size, self.rank = block_size, butterfly_size, rank
        col_blocks, row_blocks = -(-in_features // block_size), -(-out_features // block_size)
        self.in_padded = col_blocks * block_size
        layout = pixelfly.butterfly_layout(row_blocks, col_blocks, butterfly_size)
        row_offsets, col_indices = pixelfly.layout_to_csr(layout)
        self.register_buffer("row_offsets", row_offsets.to(device))
        self.register_buffer("col_indices", col_indices.to(device))
        factory = {"device": device, "dtype": dtype}
        self.blocks = nn.Parameter(torch.empty(col_indices.numel(), block_size, block_size, **factory))
        self.u = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.v = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        per_row = int((self.row_offsets[1:] - self.row_offsets[:-1]).max()) * self.block_size
        nn.init.uniform_(self.blocks, -1.0 / math.sqrt(per_row), 1.0 / math.sqrt(per_row))
        nn.init.uniform_(self.v, -1.0 / math.sqrt(self.in_features), 1.0 / math.sqrt(self.in_features))
        # The low-rank path starts small so the sparse part dominates at initialization.
        nn.init.uniform_(self.u, -0.1 / math.sqrt(max(self.rank, 1)), 0.1 / math.sqrt(max(self.rank, 1)))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"effx.nn.PixelflyLinear: x must have last dim {self.in_features}, got {x.shape[-1]}")
        xp = F.pad(x, (0, self.in_padded - self.in_features)) if self.in_padded != self.in_features else x
        y = pixelfly.block_sparse_matmul(xp, self.blocks, self.row_offsets, self.col_indices)
        y = y[..., : self.out_features]
        if self.rank > 0:
            y = y + (x @ self.v.T) @ self.u.T
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"butterfly_size={self.butterfly_size}, rank={self.rank}, nnz_blocks={self.blocks.shape[0]}, "
                f"bias={self.bias is not None}")
