"""Typed wrappers of the torch.ops.effx operators.

Each function here calls exactly one operator; the math lives in the C++/CUDA kernels.
"""

from __future__ import annotations

import torch

__all__ = ["quantize", "dequantize", "monarch_matmul", "monarch_matmul_backward",
           "block_sparse_matmul", "block_sparse_matmul_backward", "sparse_mlp_up", "sparse_mlp_down", "sparse_mlp",
           "sampling_probs", "tree_verify_greedy", "tree_verify_match", "tree_verify_sample"]


def quantize(x: torch.Tensor, bits: int = 2, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric quantization along the last dim (SPECS.md section 1).

    The last dim of ``x`` is split into groups of ``group_size`` consecutive values. Per
    group, ``scale = (max - min) / (2**bits - 1)`` and ``zero = min``; each value becomes the
    code ``round(clamp((x - zero) / scale, 0, 2**bits - 1))`` (round half to even), computed
    against the scale as stored. The scale is rounded up to the dtype of ``x``, so every value
    is within ``scale / 2`` of its dequantized value. A constant group stores ``scale = 0`` and
    codes 0, so it dequantizes exactly.

    Args:
        x: float32, float16 or bfloat16 tensor of shape ``[..., N]`` on CPU or CUDA; any
            strides (a copy is made only when the leading dims cannot be viewed as rows).
        bits: 2, 4 or 8.
        group_size: values per group; must divide ``N``.

    Returns:
        ``(codes, scale, zero)``: ``codes`` is int32 ``[..., ceil(N * bits / 32)]`` with the
        codes packed lowest bits first (value ``j`` at bits ``[bits*(j % (32//bits)), ...)``
        of word ``j // (32//bits)``); ``scale`` and ``zero`` are ``[..., N // group_size]`` in
        the dtype of ``x``.
    """
    return torch.ops.effx.quantize(x, bits, group_size)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int = 2,
    group_size: int = 32,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``code * scale + zero`` per group, computed in fp32.

    Args:
        codes: int32 ``[..., ceil(N * bits / 32)]`` as returned by :func:`quantize`.
        scale, zero: ``[..., N // group_size]``, float32/float16/bfloat16, same dtype.
        bits, group_size: as given to :func:`quantize`.
        dtype: output dtype (float32, float16 or bfloat16); defaults to ``scale.dtype``.

    Returns:
        Tensor ``[..., N]`` of ``dtype``.
    """
    return torch.ops.effx.dequantize(codes, scale, zero, bits, group_size, dtype or scale.dtype)


def monarch_matmul(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Monarch product ``y = P2 B2 P1 B1 x`` along the last dim (SPECS.md section 6); autograd.

    With ``w1`` of shape ``(k, q, p)`` and ``w2`` of shape ``(l, s, r)`` (``l * r == k * q``), per
    row of ``x``: ``out1[i*q + a] = sum_b w1[i, a, b] x[i*p + b]``; ``z[j, c] = out1[c*l + j]``;
    ``y[d*l + j] = sum_c w2[j, d, c] z[j, c]``. Accumulation is fp32 (fp64 for float64).

    Args:
        x: ``[..., k * p]``, float32/float16/bfloat16 (float64 on CPU), any strides.
        w1: ``(k, q, p)``, dtype of ``x``. w2: ``(l, s, r)``, dtype of ``x``.

    Returns:
        ``[..., l * s]`` in the dtype of ``x``.
    """
    return torch.ops.effx.monarch_matmul(x, w1, w2)


def monarch_matmul_backward(
    grad_out: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(grad_x, grad_w1, grad_w2)`` of :func:`monarch_matmul` for ``grad_out``
    ``[..., l * s]`` (out1 is recomputed, not stored)."""
    return torch.ops.effx.monarch_matmul_backward(grad_out, x, w1, w2)


def block_sparse_matmul(
    x: torch.Tensor, blocks: torch.Tensor, row_offsets: torch.Tensor, col_indices: torch.Tensor
) -> torch.Tensor:
    """``y = x @ W.T`` for a block-sparse ``W`` in block-CSR form (the Pixelfly layer); autograd.

    ``W`` is an ``R x C`` grid of ``block x block`` blocks; the stored ones are ``blocks``
    ``(nnz, block, block)``, row by row: block-row ``rb`` holds entries
    ``row_offsets[rb] .. row_offsets[rb+1]-1``, entry ``e`` in block-column ``col_indices[e]``.
    ``y[..., rb*block + a] = sum_e sum_b blocks[e, a, b] x[..., col[e]*block + b]``.

    Args:
        x: ``[..., C * block]``, float32/float16/bfloat16 (float64 on CPU), any strides.
        blocks: ``(nnz, block, block)`` in the dtype of ``x``; ``block <= 64``.
        row_offsets: int64 ``[R + 1]``, from 0 to nnz, non-decreasing.
        col_indices: int64 ``[nnz]`` in ``[0, C)``.

    Returns:
        ``[..., R * block]`` in the dtype of ``x``.
    """
    return torch.ops.effx.block_sparse_matmul(x, blocks, row_offsets, col_indices)


def block_sparse_matmul_backward(
    grad_out: torch.Tensor, x: torch.Tensor, blocks: torch.Tensor, row_offsets: torch.Tensor,
    col_indices: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(grad_x, grad_blocks)`` of :func:`block_sparse_matmul`."""
    return torch.ops.effx.block_sparse_matmul_backward(grad_out, x, blocks, row_offsets, col_indices)


# --- DejaVu contextual sparsity (SPECS.md section 4)



def sparse_mlp_up(
    x: torch.Tensor,
    w_up: torch.Tensor,
    idx: torch.Tensor,
    activation: str = "relu",
    w_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_gate: torch.Tensor | None = None,
    rows_per_index: int = 1,
    check_indices: bool = True,
) -> torch.Tensor:
    """Gathered up projection with fused bias and activation.

    ``h[b, j*R + r] = act(x[b] . w_up[idx[j]*R + r] + b_up[...])`` with ``R = rows_per_index``;
    with ``w_gate`` the gated form ``act(x . w_gate[...] + b_gate[...]) * (x . w_up[...] + b_up[...])``
    (``activation="silu"`` is SwiGLU). fp32 accumulation.

    Args:
        x: ``[B, d]`` float32/float16/bfloat16; rows may be strided.
        w_up, w_gate: ``[n, d]`` like ``nn.Linear.weight``, dtype of ``x``.
        idx: int32/int64, ``[k]`` (one set shared by the batch) or ``[B, k]`` (one per row);
            distinct values in ``[0, n / R)``. Any k, including 0 and all of them.
        activation: ``"none"``, ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.
        b_up, b_gate: ``[n]`` or None.
        rows_per_index: weight rows one index selects (``head_dim`` for attention heads).
        check_indices: validate the indices (on CUDA this copies them to the host and waits
            for the stream); pass False for indices valid by construction, e.g. from top-k.

    Returns:
        ``h``: ``[B, k * R]`` in the dtype of ``x``.
    """
    return torch.ops.effx.sparse_mlp_up(x, w_up, idx, activation, w_gate, b_up, b_gate, rows_per_index,
                                        check_indices)


def sparse_mlp_down(
    h: torch.Tensor,
    w_down_t: torch.Tensor,
    idx: torch.Tensor,
    b_down: torch.Tensor | None = None,
    rows_per_index: int = 1,
    check_indices: bool = True,
) -> torch.Tensor:
    """Gathered down projection over the TRANSPOSED weight: ``y = h @ w_down_t[rows of idx] + b_down``.

    Each output element adds its selected rows in an order fixed by the shape (index order on
    the CPU) without atomics, so results are bitwise reproducible for any thread count.

    Args:
        h: ``[B, k * R]`` as returned by :func:`sparse_mlp_up` for the same ``idx``.
        w_down_t: ``[n, d]``, the down projection's ``nn.Linear.weight`` transposed, dtype of ``h``.
        idx: ``[k]`` or ``[B, k]``, as for :func:`sparse_mlp_up`.
        b_down: ``[d]`` or None.
        rows_per_index, check_indices: as for :func:`sparse_mlp_up`.

    Returns:
        ``[B, d]`` in the dtype of ``h``.
    """
    return torch.ops.effx.sparse_mlp_down(h, w_down_t, idx, b_down, rows_per_index, check_indices)


def sparse_mlp(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    idx: torch.Tensor,
    activation: str = "relu",
    w_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    b_gate: torch.Tensor | None = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """:func:`sparse_mlp_up` then :func:`sparse_mlp_down` in one operator call: ``[B, d]``."""
    return torch.ops.effx.sparse_mlp(x, w_up, w_down_t, idx, activation, w_gate, b_up, b_down, b_gate,
                                     check_indices)


# --- Tree speculative decoding (SPECS.md section 5; layout in include/effx/spec.h) ---------------


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """The sampling distribution of ``logits`` [..., V]: ``softmax(logits / temperature)``
    restricted to the top-p nucleus (every token whose probability is at least the largest
    threshold that keeps mass >= ``top_p``; ties at the threshold kept), renormalized. fp32 out.
    """
    return torch.ops.effx.sampling_probs(logits, temperature, top_p)


def tree_verify_greedy(tokens: torch.Tensor, parents: torch.Tensor, logits: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification of a token tree.

    Args:
        tokens: int64 [B, N], node i's token (negative: an empty node, never accepted).
        parents: int64 [N] or [B, N], ``parents[i] < i``, -1 for children of the root.
        logits: target logits [B, N + 1, V] (row 0 at the root, row i + 1 at node i).

    Returns:
        ``(accepted [B, N], num_accepted [B], bonus [B])``: from the root, the first child whose
        token is the target's argmax is accepted, repeatedly; ``accepted`` lists the path's node
        indices then -1; ``bonus`` is the argmax at the path's end.
    """
    return torch.ops.effx.tree_verify_greedy(tokens, parents, logits)


def tree_verify_match(tokens: torch.Tensor, parents: torch.Tensor, target_tokens: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SpecExec verification: ``target_tokens`` [B, N + 1] holds the token the target sampled at
    the root (entry 0) and at each node (entry i + 1); the accepted path follows children whose
    token equals their parent's sample; ``bonus`` is the sample at the path's end. Other
    arguments and results as :func:`tree_verify_greedy`."""
    return torch.ops.effx.tree_verify_match(tokens, parents, target_tokens)


def tree_verify_sample(tokens: torch.Tensor, parents: torch.Tensor, target_probs: torch.Tensor,
                       draft_probs: torch.Tensor, uniforms: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact stochastic verification of a tree whose children were drawn from the draft without
    replacement (SPECS.md section 5).

    Args:
        tokens, parents: as :func:`tree_verify_greedy`.
        target_probs, draft_probs: fp32 [B, N + 1, V], the target's distribution p and the
            draft's distribution q (the one the node's children were drawn from) per node.
        uniforms: fp32 [B, N + 1] in [0, 1): entry j + 1 decides node j's acceptance
            (``u * q(x) < p(x)``), entry 0 draws the bonus token.

    Returns:
        As :func:`tree_verify_greedy`. On a rejection ``p <- normalize(max(p - q, 0))`` (the
        original p when that is all zero) and the child's token leaves q; the bonus token is
        drawn from p at the path's end (the residual when its children were all rejected).
    """
    return torch.ops.effx.tree_verify_sample(tokens, parents, target_probs, draft_probs, uniforms)
