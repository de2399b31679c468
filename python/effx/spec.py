"""Tree speculative decoding (SPECS.md section 5): tree attention, verification on the device,
Sequoia tree shapes, SpecExec trees, acceptance measurement and a decoding loop.

A token tree is a parent array: ``parents[i] < i``, -1 for children of the root (the last
token the target has seen); tree token i sits at position ``prefix length + depth(i) - 1`` and
attends to the whole prefix plus its own ancestors and itself. Verification walks the tree on
the device (``torch.ops.effx.tree_verify_*``) and returns, per batch row, the accepted node
indices and the bonus token; ``cache.commit_tree(accepted)`` then keeps the accepted path.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from typing import Callable, Sequence

import torch

from effx import kv, ops

__all__ = [
    "tree_attention",
    "check_parents",
    "tree_depths",
    "Verification",
    "verify_greedy",
    "verify_sample",
    "verify_specexec",
    "SequoiaTree",
    "sequoia_tree",
    "choose_tree",
    "specexec_tree",
    "acceptance_vector",
    "measure_acceptance",
    "TinyDecoder",
    "Generation",
    "generate",
]


def _fail(where: str, message: str) -> None:
    raise ValueError(f"effx.spec.{where}: {message}")


# --- trees ------------------------------------------------------------------------------------


def check_parents(parents, n: int | None = None, batch: int | None = None, where: str = "check_parents"
                  ) -> torch.Tensor:
    """Validate a parent array ([N] or [B, N]) and return it as int64 on its device.

    Every node's parent must come before it (``-1 <= parents[i] < i``); that also rules out
    cycles, since a cycle needs some node whose parent is not before it.
    """
    p = torch.as_tensor(parents, dtype=torch.int64)
    if p.dim() not in (1, 2) or p.shape[-1] < 1:
        _fail(where, f"parents must have shape [N] or [B, N] with N >= 1, got {list(p.shape)}")
    if n is not None and p.shape[-1] != n:
        _fail(where, f"parents must have one entry per tree token ({n}), got {p.shape[-1]}")
    if p.dim() == 2 and batch is not None and p.shape[0] != batch:
        _fail(where, f"parents of shape [B, N] must have B = {batch} (the batch), got {p.shape[0]}")
    host = p.cpu()
    idx = torch.arange(host.shape[-1])
    bad = (host < -1) | (host >= idx)
    if bad.any():
        at = bad.nonzero()[0].tolist()
        i = at[-1]
        row = f" of row {at[0]}" if host.dim() == 2 else ""
        _fail(where, f"parents[{i}]{row} must be in [-1, {i}) (a node's parent comes before it, so no "
                     f"cycles), got {int(host[tuple(at)])}")
    return p


def tree_depths(parents) -> torch.Tensor:
    """Depth of each node ([N] or [B, N]): 1 for children of the root."""
    p = torch.as_tensor(parents, dtype=torch.int64).cpu()
    flat = p.reshape(-1, p.shape[-1])
    depth = torch.zeros_like(flat)
    for i in range(flat.shape[1]):  # parents come first, so one pass in index order suffices
        par = flat[:, i]
        depth[:, i] = torch.where(par < 0, torch.ones_like(par), depth.gather(1, par.clamp(min=0)[:, None])[:, 0] + 1)
    return depth.reshape(p.shape)


def tree_attention(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor, k_tree: torch.Tensor,
                   v_tree: torch.Tensor, parents, *, prefix_lengths=None, sm_scale: float | None = None,
                   return_lse: bool = False):
    """Attention of tree tokens over a shared prefix plus their ancestors, with no dense mask.

    Args:
        q: [B, Hq, N, D] queries of the N tree tokens.
        k_prefix, v_prefix: [B, Hkv, P, D], visible to every tree token (``Hq % Hkv == 0``).
        k_tree, v_tree: [B, Hkv, N, D], tree token j is visible to token i when j is i or one
            of its ancestors.
        parents: [N] or [B, N] int64, ``parents[i] < i``, -1 for children of the last prefix
            token.
        prefix_lengths: optional [B] ints <= P: row b's prefix is its first prefix_lengths[b]
            tokens (ragged batch); default all P.
        sm_scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp [B, Hq, N] (fp32) of the scaled scores.

    Returns:
        [B, Hq, N, D] in the dtype of q (and the LSE when asked). fp32/fp16/bf16, fp32
        accumulation; runs the fused cache-attention kernel (``torch.ops.effx.dense_attention``)
        with the tree's bit-packed ancestor mask built per work unit.
    """
    for name, t in (("q", q), ("k_prefix", k_prefix), ("v_prefix", v_prefix), ("k_tree", k_tree), ("v_tree", v_tree)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            _fail("tree_attention", f"{name} must be a 4-D tensor [batch, heads, tokens, head_dim], got "
                                    f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    b, _, n, d = q.shape
    if tuple(k_prefix.shape[:2]) != (b, k_tree.shape[1]) or k_prefix.shape[3] != d or v_prefix.shape != k_prefix.shape:
        _fail("tree_attention", f"k_prefix and v_prefix must have shape [{b}, {k_tree.shape[1]}, P, {d}], got "
                                f"{list(k_prefix.shape)} and {list(v_prefix.shape)}")
    if parents is None:
        _fail("tree_attention", "parents must be given ([N] or [B, N])")
    par = check_parents(parents, n, b, "tree_attention")
    p_len = k_prefix.shape[2]
    if prefix_lengths is None:
        lengths = torch.full((b,), p_len, dtype=torch.int64, device=q.device)
    else:
        host = torch.as_tensor(prefix_lengths, dtype=torch.int64).cpu()
        if host.shape != (b,) or (host < 0).any() or (host > p_len).any():
            _fail("tree_attention", f"prefix_lengths must be {b} ints in [0, {p_len}], got {host.tolist()}")
        lengths = host.to(q.device)
    # The kernel reads the prefix in place when k and v share strides with a contiguous head_dim.
    if k_prefix.stride() != v_prefix.stride() or k_prefix.stride(3) != 1:
        k_prefix, v_prefix = k_prefix.contiguous(), v_prefix.contiguous()
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    out, lse = torch.ops.effx.dense_attention(q, k_tree, v_tree, k_prefix, v_prefix, lengths, None,
                                              par.to(q.device), True, scale)
    return (out, lse) if return_lse else out


# --- verification ------------------------------------------------------------------------------


@dataclasses.dataclass
class Verification:
    """Per batch row: ``accepted`` [B, N] node indices along the accepted path then -1,
    ``num_accepted`` [B], ``bonus`` [B] (the target's token after the path)."""

    accepted: torch.Tensor
    num_accepted: torch.Tensor
    bonus: torch.Tensor

    def paths(self) -> list[list[int]]:
        """Accepted node indices per row, as lists (one host transfer)."""
        acc, num = self.accepted.cpu(), self.num_accepted.cpu()
        return [acc[b, : int(num[b])].tolist() for b in range(acc.shape[0])]


def _tree_inputs(where, tokens, parents, rows):
    tokens = torch.as_tensor(tokens, dtype=torch.int64, device=rows.device)
    if tokens.dim() == 1:
        tokens = tokens[None].expand(rows.shape[0], -1)
    if tokens.dim() != 2:
        _fail(where, f"tokens must have shape [N] or [B, N], got {list(tokens.shape)}")
    par = check_parents(parents, tokens.shape[1], tokens.shape[0], where).to(rows.device)
    return tokens, par


def verify_greedy(tokens, parents, logits: torch.Tensor) -> Verification:
    """Greedy verification: walk from the root, accepting the child equal to the target's argmax.

    ``tokens`` [B, N] (or [N] for the whole batch), ``parents`` [N] or [B, N], target
    ``logits`` [B, N + 1, V] with row 0 at the root and row i + 1 at node i.
    """
    tokens, par = _tree_inputs("verify_greedy", tokens, parents, logits)
    return Verification(*ops.tree_verify_greedy(tokens, par, logits))


def verify_sample(tokens, parents, target_logits: torch.Tensor, draft_probs: torch.Tensor, *,
                  temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None
                  ) -> Verification:
    """Exact stochastic verification (SPECS.md section 5) of children drawn from the draft
    without replacement: the emitted tokens follow the target's sampling distribution
    (``temperature``, ``top_p``) exactly.

    ``draft_probs`` [B, N + 1, V] fp32 is the distribution each node's children were drawn from
    (row 0 at the root); uniform random numbers come from ``generator``.
    """
    tokens, par = _tree_inputs("verify_sample", tokens, parents, target_logits)
    p = ops.sampling_probs(target_logits, temperature, top_p)
    u = torch.rand(tokens.shape[0], tokens.shape[1] + 1, generator=generator,
                   device=generator.device if generator is not None else "cpu").to(target_logits.device)
    return Verification(*ops.tree_verify_sample(tokens, par, p, draft_probs.float(), u))


def verify_specexec(tokens, parents, target_logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                    generator: torch.Generator | None = None) -> Verification:
    """SpecExec verification: the target samples one token at the root and at every node; the
    deepest path whose tokens all equal their parent's sample is accepted."""
    tokens, par = _tree_inputs("verify_specexec", tokens, parents, target_logits)
    p = ops.sampling_probs(target_logits, temperature, top_p)
    samples = _multinomial(p.reshape(-1, p.shape[-1]), generator).reshape(p.shape[:2])
    return Verification(*ops.tree_verify_match(tokens, par, samples))


def _multinomial(p: torch.Tensor, generator) -> torch.Tensor:
    """One draw per row of p [R, V] with ``generator`` (on the generator's device)."""
    dev = generator.device if generator is not None else p.device
    return torch.multinomial(p.to(dev), 1, generator=generator)[:, 0].to(p.device)


def _draw_without_replacement(q: torch.Tensor, k: int, generator) -> torch.Tensor:
    """k draws without replacement per row of q [R, V] (Gumbel top-k, equivalent to sequential
    draws); draws beyond a row's support come back as -1 (empty nodes)."""
    dev = generator.device if generator is not None else q.device
    u = torch.rand(q.shape, generator=generator, device=dev).to(q.device).clamp_(min=1e-20)
    keys = q.log() - (-u.log()).log()
    top = keys.topk(k, -1)
    return torch.where(top.values > -math.inf, top.indices, torch.full_like(top.indices, -1))


# --- Sequoia tree shapes --------------------------------------------------------------------------


@dataclasses.dataclass
class SequoiaTree:
    """A tree shape: ``parents`` (list, SPECS.md convention; siblings in index order are in draw
    order), ``expected_tokens`` (accepted tokens plus the bonus one per verification under
    the acceptance vector), ``depth`` and, from :func:`choose_tree`, ``time_per_token``."""

    parents: list[int]
    expected_tokens: float
    depth: int
    time_per_token: float | None = None

    @property
    def size(self) -> int:
        return len(self.parents)


class _SequoiaDP:
    """f[d, n]: best expected tokens of a tree of at most n nodes counting its root, at most d
    levels including the root's; the root's k-th child is reached with probability p[k].

    When p is non-increasing, a node is never more likely to be reached than its parent or its
    earlier sibling, so the n most reachable nodes (depth <= d - 1) already form a tree and are
    optimal: a best-first search gives every size at once. Otherwise a dynamic program over
    (nodes, depth, child rank) with vectorized max-plus steps.
    """

    def __init__(self, accept_probs, max_nodes: int, max_depth: int, where: str):
        p = torch.as_tensor(accept_probs, dtype=torch.float64).flatten()
        if p.numel() < 1 or (p < 0).any() or (p > 1).any() or p.sum() > 1 + 1e-9:
            _fail(where, f"accept_probs must be probabilities in [0, 1] summing to at most 1 (the k-th "
                         f"child is the accepted one with probability accept_probs[k]), got {p.tolist()}")
        if not isinstance(max_nodes, int) or max_nodes < 1 or not isinstance(max_depth, int) or max_depth < 1:
            _fail(where, f"max_nodes and max_depth must be ints >= 1, got {max_nodes!r} and {max_depth!r}")
        m, levels = max_nodes + 1, max_depth + 1
        k_max = min(p.numel(), max_nodes)
        self.p, self.m, self.levels, self.k_max = p[:k_max], m, levels, k_max
        self.orders: dict[int, list[int]] = {}
        if bool((self.p[1:] <= self.p[:-1]).all()):
            self._best_first()
            return
        sizes = torch.arange(m + 1)
        f = torch.zeros(levels + 1, m + 1, dtype=torch.float64)
        f[1, 1:] = 1.0
        # choice[d, k, n]: nodes of the k-th child's subtree when n nodes remain for children k...
        self.choice = torch.zeros(levels + 1, k_max, m + 1, dtype=torch.int32)
        neg = torch.tensor(-math.inf, dtype=torch.float64)
        self.last = 1
        for d in range(2, levels + 1):
            g = torch.zeros(m + 1, dtype=torch.float64)
            for k in range(k_max - 1, -1, -1):
                j = sizes[None, 1:]  # nodes given to the child
                rest = sizes[:, None] - j  # nodes left for later children
                cand = torch.where(rest >= 0, self.p[k] * f[d - 1, 1:][None, :] + g[rest.clamp(min=0)], neg)
                best, arg = cand.max(1)
                take = best > 0  # without a k-th child there is no later one: worth 0
                self.choice[d, k] = torch.where(take, arg + 1, torch.zeros_like(arg)).to(torch.int32)
                g = torch.where(take, best, torch.zeros_like(best))
            f[d, 1:] = 1.0 + g[:-1]
            self.last = d
            if torch.equal(f[d], f[d - 1]):
                # Deeper trees no longer help at any size: every later level repeats this one.
                f[d + 1:] = f[d]
                break
        self.f = f

    def _best_first(self) -> None:
        """Per depth limit, nodes in order of reach (parents and earlier siblings first)."""
        p = self.p.tolist()
        f = torch.zeros(self.levels + 1, self.m + 1, dtype=torch.float64)
        f[1, 1:] = 1.0
        for d in range(2, self.levels + 1):
            parents, reach, heap, seq = [], [], [(-p[0], 0, -1, 0, 1)], 1
            while heap and len(parents) < self.m - 1:
                neg, _, par, rank, depth = heapq.heappop(heap)
                if neg == 0:
                    break  # unreachable nodes add nothing
                parents.append(par)
                reach.append(-neg)
                base = 1.0 if par < 0 else reach[par]
                if rank + 1 < self.k_max:  # the next sibling becomes a candidate
                    heapq.heappush(heap, (-base * p[rank + 1], seq, par, rank + 1, depth))
                    seq += 1
                if depth < d - 1:  # and the first child
                    heapq.heappush(heap, (neg * p[0], seq, len(parents) - 1, 0, depth + 1))
                    seq += 1
            gain = torch.tensor(reach, dtype=torch.float64).cumsum(0)
            f[d, 2:2 + len(gain)] = 1.0 + gain
            f[d, 2 + len(gain):] = 1.0 + (gain[-1] if len(gain) else 0.0)
            self.orders[d] = parents
        self.f = f
        self.last = self.levels

    def build(self, n: int, d: int) -> list[int]:
        """Parents (root excluded) of the best tree with n nodes counting the root and d levels;
        siblings in index order are in draw order."""
        if self.orders:
            return self.orders[d][:n - 1] if d >= 2 else []
        parents: list[int] = []
        queue = [(-1, n, d)]
        choice = self.choice.tolist()
        while queue:
            node, size, depth = queue.pop(0)
            left = size - 1
            for k in range(self.k_max):
                take = choice[min(depth, self.last)][k][left] if left > 0 and depth >= 2 else 0
                if take == 0:
                    break
                parents.append(node)
                queue.append((len(parents) - 1, take, depth - 1))
                left -= take
        return parents


def sequoia_tree(accept_probs, max_nodes: int, max_depth: int) -> SequoiaTree:
    """The Sequoia tree maximizing the expected tokens per verification (SPECS.md section 5).

    Args:
        accept_probs: p[k], the probability that the k-th child drawn (without replacement) is
            the accepted one; sums to at most 1.
        max_nodes: tree tokens at most (the root, the last prefix token, is not one).
        max_depth: depth at most (children of the root have depth 1).

    Returns:
        :class:`SequoiaTree`; the k-th child of a node in index order is the k-th draw.
        For a non-increasing p (the usual case) a best-first search is exact and takes
        milliseconds; otherwise a vectorized dynamic program (O(max_depth * len(p)) tensor
        steps of size max_nodes^2, stopping at the depth beyond which nothing improves).
    """
    dp = _SequoiaDP(accept_probs, max_nodes, max_depth, "sequoia_tree")
    parents = dp.build(dp.m, dp.levels)
    depth = int(tree_depths(parents).max()) if parents else 0
    return SequoiaTree(parents, float(dp.f[dp.levels, dp.m]), depth)


def _interpolate(table, n: int, where: str) -> float:
    if callable(table):
        return float(table(n))
    if isinstance(table, dict):
        xs = sorted(table)
        if not xs:
            _fail(where, "a timing table must not be empty")
        if n <= xs[0]:
            return float(table[xs[0]])
        for a, b in zip(xs, xs[1:]):
            if n <= b:
                return float(table[a] + (table[b] - table[a]) * (n - a) / (b - a))
        return float(table[xs[-1]] * n / xs[-1])  # beyond the table: linear in the tokens
    return float(table)


def choose_tree(accept_probs, draft_time, target_time, max_nodes: int, max_depth: int,
                sizes: Sequence[int] | None = None, step_time: float = 0.0) -> SequoiaTree:
    """The hardware-aware choice of size and depth (Sequoia): minimize
    ``(depth * draft_time + target_time(size + 1) + step_time) / expected_tokens`` over tree
    sizes and depths (``step_time``: a speculative step's own work besides the forwards).

    ``draft_time``: seconds of one draft step, one per level (a number, or a table
    {tree size: seconds} / callable of the tree size); ``target_time``: seconds of one target forward over a
    tree of n tokens, as a table {n: seconds} (interpolated) or a callable. ``sizes`` restricts
    the sizes tried (default every size up to ``max_nodes``); size 0 is plain decoding (one
    target token per call, no draft), the answer when no tree pays for its draft. Returns the
    tree with ``time_per_token`` set.
    """
    dp = _SequoiaDP(accept_probs, max_nodes, max_depth, "choose_tree")
    best = None
    for n in sizes or range(1, max_nodes + 1):
        if not 0 <= n <= max_nodes:
            _fail("choose_tree", f"sizes must be in [0, {max_nodes}], got {n}")
        if n == 0:
            candidates = [(_interpolate(target_time, 1, "choose_tree"), 0, 0)]
        else:
            t_target = _interpolate(target_time, n + 1, "choose_tree")
            t_step = _interpolate(draft_time, n, "choose_tree")
            candidates = [((d * t_step + t_target + step_time) / float(dp.f[d + 1, n + 1]), n, d)
                          for d in range(1, max_depth + 1)]
        for c in candidates:
            if best is None or c[0] < best[0] - 1e-15:
                best = c
    per_token, n, d = best
    if n == 0:
        return SequoiaTree([], 1.0, 0, per_token)
    parents = dp.build(n + 1, d + 1)
    return SequoiaTree(parents, float(dp.f[d + 1, n + 1]), int(tree_depths(parents).max()), per_token)


# --- SpecExec trees --------------------------------------------------------------------------------


@dataclasses.dataclass
class TokenTree:
    """A drafted tree: ``tokens`` and ``parents`` (lists, SPECS.md convention) and each node's
    cumulative draft log-probability ``logprobs``."""

    tokens: list[int]
    parents: list[int]
    logprobs: list[float]


class _BestFirst:
    """One SpecExec tree being grown: the nodes found so far and the ones to expand next."""

    def __init__(self, max_nodes: int, max_depth: int, branch: int):
        self.max_nodes, self.max_depth, self.branch = max_nodes, max_depth, branch
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.cum: list[float] = []
        self.depth: list[int] = []
        self.to_expand = [-1]
        self._expanded = {-1}

    def grow(self, lp: torch.Tensor) -> None:
        """Add the children of ``to_expand`` from their log-probabilities ``lp`` [len, V]."""
        lp = lp.double().cpu()
        top = lp.topk(min(self.branch, lp.shape[-1]), -1)
        for row, node in enumerate(self.to_expand):
            base = 0.0 if node < 0 else self.cum[node]
            for value, token in zip(top.values[row].tolist(), top.indices[row].tolist()):
                if value == -math.inf:
                    break
                self.tokens.append(token)
                self.parents.append(node)
                self.cum.append(base + value)
                self.depth.append(1 if node < 0 else self.depth[node] + 1)
        best = _best(self.cum, self.max_nodes)
        self.to_expand = [i for i in best if i not in self._expanded and self.depth[i] < self.max_depth]
        self._expanded.update(self.to_expand)

    def tree(self) -> TokenTree:
        keep = sorted(_best(self.cum, self.max_nodes))  # discovery order puts parents first
        index = {old: new for new, old in enumerate(keep)}
        return TokenTree([self.tokens[i] for i in keep], [index.get(self.parents[i], -1) for i in keep],
                         [self.cum[i] for i in keep])


def _check_specexec(where: str, max_nodes: int, max_depth: int, branch: int | None) -> int:
    if max_nodes < 1 or max_depth < 1:
        _fail(where, f"max_nodes and max_depth must be >= 1, got {max_nodes} and {max_depth}")
    if branch is not None and branch < 1:
        _fail(where, f"branch must be >= 1, got {branch}")
    return max_nodes if branch is None else branch


def specexec_tree(logprob_fn: Callable[[list[int], list[int], list[int]], torch.Tensor], max_nodes: int,
                  max_depth: int, branch: int | None = None) -> TokenTree:
    """Deterministic best-first tree (SpecExec): the ``max_nodes`` most probable continuations
    under the draft (by cumulative log-probability), depth <= ``max_depth``, each node's
    children among its ``branch`` most probable tokens (default ``max_nodes``).

    ``logprob_fn(tokens, parents, nodes)`` returns the draft's log-probabilities [len(nodes), V]
    at the given nodes (-1 for the root) of the tree discovered so far. The draft runs once per
    level: every round expands all not-yet-expanded nodes among the current best ``max_nodes``;
    since a child is never more probable than its parent, the result equals best-first search
    with one node per draft call.
    """
    tree = _BestFirst(max_nodes, max_depth, _check_specexec("specexec_tree", max_nodes, max_depth, branch))
    while tree.to_expand:
        tree.grow(logprob_fn(tree.tokens, tree.parents, tree.to_expand))
    return tree.tree()


def specexec_trees(logprob_fn: Callable[[list[list[int]], list[list[int]], list[list[int]]],
                                        Sequence[torch.Tensor | None]],
                   batch: int, max_nodes: int, max_depth: int, branch: int | None = None) -> list[TokenTree]:
    """:func:`specexec_tree` for ``batch`` sequences at once, one draft call per round for all.

    ``logprob_fn(tokens, parents, nodes)`` gets each row's tree so far and the nodes to expand
    in it (an empty list once a row's tree is complete) and returns, per row, the draft's
    log-probabilities [len(nodes[r]), V] at those nodes (anything, e.g. None, for an empty list).
    Row r's tree is the one :func:`specexec_tree` builds from row r's log-probabilities.
    """
    if batch < 1:
        _fail("specexec_trees", f"batch must be >= 1, got {batch}")
    branch = _check_specexec("specexec_trees", max_nodes, max_depth, branch)
    trees = [_BestFirst(max_nodes, max_depth, branch) for _ in range(batch)]
    while any(t.to_expand for t in trees):
        lps = logprob_fn([t.tokens for t in trees], [t.parents for t in trees], [t.to_expand for t in trees])
        if len(lps) != batch:
            _fail("specexec_trees", f"logprob_fn must return one entry per row ({batch}), got {len(lps)}")
        for t, lp in zip(trees, lps):
            if t.to_expand:
                t.grow(lp)
    return [t.tree() for t in trees]


def _best(cum: list[float], k: int) -> list[int]:
    # Ties go to the earlier node, so a parent always ranks before its children.
    return heapq.nsmallest(k, range(len(cum)), key=lambda i: (-cum[i], i))


# --- acceptance vectors ----------------------------------------------------------------------------


def acceptance_vector(target_logits: torch.Tensor, draft_logits: torch.Tensor, k: int, *, greedy: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """Measured p[j] (j < k): the fraction of positions where the j-th child drawn from the draft
    is the accepted one, from target and draft logits at the same positions ([R, V] each).

    Sampling: k children drawn without replacement from the draft, verified by the exact
    rule on the device (one tree of k children per position, a chunk of positions per batch).
    Greedy: the children are the draft's top-k; the j-th is accepted when it is the target's
    argmax.
    """
    if target_logits.shape != draft_logits.shape or target_logits.dim() != 2:
        _fail("acceptance_vector", f"target_logits and draft_logits must both be [positions, vocab], got "
                                   f"{list(target_logits.shape)} and {list(draft_logits.shape)}")
    r, v = target_logits.shape
    k = min(k, v)
    if greedy:
        children = draft_logits.topk(k, -1).indices
        first = (children == target_logits.argmax(-1, keepdim=True)).double()
        return first.mean(0).cpu()
    parents = torch.full((k,), -1, dtype=torch.int64)
    dev = target_logits.device
    hits = torch.zeros(k, dtype=torch.float64, device=dev)
    # Verification rows are [positions, k + 1, vocab]: a chunk of positions at a time keeps them
    # near 2^25 elements however large the vocabulary.
    chunk = max(1, (1 << 25) // ((k + 1) * v))
    for lo in range(0, r, chunk):
        t, d = target_logits[lo:lo + chunk], draft_logits[lo:lo + chunk]
        q = ops.sampling_probs(d, temperature, top_p)
        children = _draw_without_replacement(q, k, generator)
        rows_q = torch.cat([q[:, None], torch.zeros(q.shape[0], k, v, device=dev)], 1)
        rows_t = torch.cat([t[:, None], t[:, None].expand(-1, k, -1)], 1)
        res = verify_sample(children, parents, rows_t, rows_q, temperature=temperature, top_p=top_p,
                            generator=generator)
        first = torch.where(res.num_accepted > 0, res.accepted[:, 0], torch.full_like(res.num_accepted, -1))
        hits += (first[:, None] == torch.arange(k, device=dev)).double().sum(0)
    return (hits / r).cpu()


def measure_acceptance(target, draft, tokens: torch.Tensor, make_cache: Callable[[int], kv.KVCache], k: int,
                       **kwargs) -> torch.Tensor:
    """Acceptance vector of a draft/target pair over token sequences ``tokens`` [B, T]: both
    models score the sequences (one forward each, through fresh caches from ``make_cache(B)``)
    and :func:`acceptance_vector` compares their next-token distributions at every position."""
    b, t = tokens.shape
    pos = torch.arange(t, device=tokens.device)[None].expand(b, -1)
    lt = target(tokens, make_cache(b), pos)
    ld = draft(tokens, make_cache(b), pos)
    return acceptance_vector(lt.reshape(b * t, -1).float(), ld.reshape(b * t, -1).float(), k, **kwargs)


# --- a small decoder for tests, benchmarks and the demo -------------------------------------------


class TinyDecoder(torch.nn.Module):
    """A small random Llama-style decoder (RMSNorm, rotary attention over an effx cache, SiLU MLP)
    following the callable contract of :func:`generate`:
    ``model(tokens [B, T], cache, positions [B, T], parents=None, lengths=None) -> logits [B, T, V]``.

    ``layers_used`` runs only the first layers (a layer-skipping draft of the same weights);
    ``mix`` scales each block's residual update (small values keep the model close to its
    embedding/unembedding path, so that a shallow draft agrees with it often).
    """

    def __init__(self, vocab: int = 512, dim: int = 128, heads: int = 4, kv_heads: int = 2, layers: int = 2,
                 mix: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        hd = dim // heads

        def w(*shape, scale=None):
            s = scale if scale is not None else shape[-1] ** -0.5
            return torch.nn.Parameter((torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype),
                                      requires_grad=False)

        self.vocab, self.dim, self.heads, self.kv_heads, self.head_dim = vocab, dim, heads, kv_heads, hd
        self.num_layers, self.mix, self.layers_used = layers, mix, layers
        self.embed = w(vocab, dim, scale=1.0)
        self.wq = torch.nn.ParameterList([w(heads * hd, dim) for _ in range(layers)])
        self.wk = torch.nn.ParameterList([w(kv_heads * hd, dim) for _ in range(layers)])
        self.wv = torch.nn.ParameterList([w(kv_heads * hd, dim) for _ in range(layers)])
        self.wo = torch.nn.ParameterList([w(dim, heads * hd) for _ in range(layers)])
        self.w1 = torch.nn.ParameterList([w(2 * dim, dim) for _ in range(layers)])
        self.w2 = torch.nn.ParameterList([w(dim, 2 * dim) for _ in range(layers)])
        self.head = w(vocab, dim, scale=3.0 * dim ** -0.5)

    def make_cache(self, batch: int, capacity: int, cache_cls=kv.DenseCache, **options) -> kv.KVCache:
        return cache_cls(self.layers_used, batch, self.kv_heads, self.head_dim, capacity, dtype=self.embed.dtype,
                         device=self.embed.device, **options)

    def _rotate(self, x, positions):
        half = self.head_dim // 2
        freq = 10000.0 ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
        ang = positions[:, None, :, None].float() * freq
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    @staticmethod
    def _norm(x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)

    def forward(self, tokens, cache, positions, parents=None, lengths=None):
        b, t = tokens.shape
        x = self.embed[tokens]
        for layer in range(self.layers_used):
            h = self._norm(x)
            q = (h @ self.wq[layer].T).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = (h @ self.wk[layer].T).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = (h @ self.wv[layer].T).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2).contiguous()
            q, k = self._rotate(q, positions), self._rotate(k, positions).contiguous()
            a = cache.attend(layer, q, k, v, parents=parents, lengths=lengths)
            x = x + self.mix * (a.transpose(1, 2).reshape(b, t, -1) @ self.wo[layer].T)
            h = self._norm(x)
            x = x + self.mix * (torch.nn.functional.silu(h @ self.w1[layer].T) @ self.w2[layer].T)
        return self._norm(x) @ self.head.T


# --- the decoding loop -----------------------------------------------------------------------------


@dataclasses.dataclass
class Generation:
    """``tokens``: per row, the generated tokens (prompt excluded); ``accepted_per_step``: per
    target call, the mean over rows of the tokens it emitted (accepted plus bonus);
    ``seconds``: wall time of the decode loop; ``prefill_seconds``: the prompt's pass (all but
    its last token, which roots the first tree) through target and draft, before the loop;
    ``tokens_per_second``: generated tokens of all rows per second of the decode loop."""

    tokens: list[list[int]]
    accepted_per_step: list[float]
    seconds: float
    prefill_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return sum(len(t) for t in self.tokens) / self.seconds if self.seconds > 0 else math.inf

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted_per_step) / max(1, len(self.accepted_per_step))


def _positions(cache: kv.KVCache, offsets: torch.Tensor, device) -> torch.Tensor:
    return (cache.lengths()[:, None] + offsets).to(device)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def generate(target, draft, prompt: torch.Tensor, max_new_tokens: int, *, target_cache: kv.KVCache,
             draft_cache: kv.KVCache | None = None, tree: Sequence[int] | SequoiaTree | None = None,
             mode: str = "greedy", temperature: float = 1.0, top_p: float = 1.0, specexec_nodes: int = 16,
             specexec_depth: int = 4, generator: torch.Generator | None = None) -> Generation:
    """Speculative decoding with a token tree over any two callables
    ``model(tokens [B, T], cache, positions [B, T], parents=None, lengths=None) -> logits [B, T, V]``
    that attend through the effx cache interface (``cache.attend(..., parents=..., lengths=...)``).

    Each step the draft proposes a tree under the pending token (``tree``: a parent array or a
    :class:`SequoiaTree` shape; ``[-1, 0, 1, ...]`` is a chain; ``draft=None`` or a shape of
    size 0 decodes one token per step), the target scores all tree tokens in one forward pass,
    verification on the device picks each row's accepted path and bonus token, and both caches
    keep only the accepted path (``commit_tree``).

    ``mode``: "greedy" (children are the draft's top tokens; output equals greedy decoding
    with the target), "sample" (children drawn without replacement; output follows the target's
    distribution at ``temperature``/``top_p`` exactly), or "specexec" (a best-first tree of
    ``specexec_nodes`` nodes and depth ``specexec_depth``; the target samples at every node;
    at ``temperature`` 0 the tree is ranked by the draft's plain softmax and verified greedily,
    so the output equals greedy decoding; each batch row grows its own tree, all rows in one
    draft call per level).
    ``prompt`` [B, T0] (T0 >= 1); caches must hold prompt + max_new_tokens + the tree.
    """
    if mode not in ("greedy", "sample", "specexec"):
        _fail("generate", f"mode must be 'greedy', 'sample' or 'specexec', got {mode!r}")
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        _fail("generate", f"prompt must be [batch, tokens >= 1], got {list(prompt.shape)}")
    shape = list(tree.parents if isinstance(tree, SequoiaTree) else (tree or []))
    if shape:
        check_parents(shape, where="generate")
    speculate = draft is not None and (mode == "specexec" or len(shape) > 0)
    if speculate and draft_cache is None:
        _fail("generate", "draft_cache must be given with a draft model")
    device = prompt.device
    b = prompt.shape[0]
    start = time.perf_counter()
    if prompt.shape[1] > 1:
        pre = prompt[:, :-1]
        pos = torch.arange(pre.shape[1], device=device)[None].expand(b, -1)
        target(pre, target_cache, pos)
        if speculate:
            draft(pre, draft_cache, pos)
    pending = prompt[:, -1]
    chain = [[t] for t in pending.tolist()]  # tokens the draft has not seen yet, ending with the pending one
    _sync(device)
    prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    out: list[list[int]] = [[] for _ in range(b)]
    per_step: list[float] = []
    depths = (tree_depths(shape) if shape else torch.zeros(0, dtype=torch.int64)).tolist()
    while min(len(o) for o in out) < max_new_tokens:
        if speculate:
            tokens, parents, q_rows = _draft_tree(draft, draft_cache, chain, shape, depths, mode, temperature, top_p,
                                                  specexec_nodes, specexec_depth, generator, device)
        else:
            tokens = torch.zeros(b, 0, dtype=torch.int64, device=device)
            parents, q_rows = [], None
        n = tokens.shape[1]
        full_tokens = torch.cat([pending[:, None], tokens], 1)
        # the pending token is the root: the tree's roots hang under it
        par = torch.tensor(parents, dtype=torch.int64).reshape(-1, n) if n else torch.zeros(1, 0, dtype=torch.int64)
        root = torch.zeros(par.shape[0], 1, dtype=torch.int64)
        full_parents = torch.cat([root - 1, par + 1], 1)
        depth = torch.cat([root, tree_depths(par) if n else par], 1)
        if par.shape[0] == 1:  # one tree shape for the whole batch
            full_parents, depth = full_parents[0], depth[0]
        logits = target(full_tokens.clamp(min=0), target_cache, _positions(target_cache, depth, device),
                        parents=full_parents.to(device))
        if n == 0:
            res = None
        elif mode == "greedy":
            res = verify_greedy(tokens, parents, logits)
        elif mode == "sample":
            res = verify_sample(tokens, parents, logits, q_rows, temperature=temperature, top_p=top_p,
                                generator=generator)
        else:
            res = (verify_specexec(tokens, parents, logits, temperature=temperature, top_p=top_p,
                                   generator=generator) if temperature > 0 else verify_greedy(tokens, parents, logits))
        if res is None:
            if mode == "greedy" or temperature == 0:
                bonus = logits[:, 0].argmax(-1)
            else:
                bonus = _multinomial(ops.sampling_probs(logits[:, 0], temperature, top_p), generator)
            paths = [[] for _ in range(b)]
        else:
            bonus, paths = res.bonus, res.paths()
        target_cache.commit_tree([[0] + [i + 1 for i in path] for path in paths])
        bonus_host = bonus.tolist()
        tok_host = tokens.tolist()
        chain = []
        for r in range(b):
            emitted = [tok_host[r][i] for i in paths[r]] + [int(bonus_host[r])]
            out[r].extend(emitted)
            chain.append(emitted)
        per_step.append(sum(len(c) for c in chain) / b)
        pending = bonus.to(device)
    _sync(device)
    seconds = time.perf_counter() - start
    return Generation([o[:max_new_tokens] for o in out], per_step, seconds, prefill_seconds)


def _draft_tree(draft, cache, chain, shape, depths, mode, temperature, top_p, nodes, max_depth, generator, device):
    """Run the draft over each row's new tokens (``chain``: ragged, ending with the pending
    token) and propose a tree under the pending token. Returns (tokens [B, N], parents list,
    draft probabilities [B, N + 1, V] for sampling mode, else None); the parents are one list
    for the batch, or one per row in specexec mode."""
    b = len(chain)
    width = max(len(c) for c in chain)
    padded = torch.tensor([c + [0] * (width - len(c)) for c in chain], dtype=torch.int64, device=device)
    counts = torch.tensor([len(c) for c in chain], dtype=torch.int64)
    ragged = counts.to(device) if (counts != width).any() else None
    pos = _positions(cache, torch.arange(width), device)
    logits = draft(padded, cache, pos, lengths=ragged)
    root = logits[torch.arange(b, device=device), (counts - 1).to(device)]  # [B, V] at the pending token

    def tree_logits(tokens, parents):
        """Draft logits at every node of a tree under the pending token (then dropped)."""
        depth = tree_depths(parents)
        out = draft(tokens, cache, _positions(cache, depth - 1, device), parents=torch.tensor(parents, device=device))
        cache.commit_tree([[]] * cache.batch_size)  # drop the tree: only its logits were wanted
        return out

    if mode == "specexec":
        def logprob_fn(tokens, parents, expand):
            lg = None
            if any(i >= 0 for nodes in expand for i in nodes):
                width = max(len(t) for t in tokens)  # pad every row's tree with childless roots
                lg = tree_logits(torch.tensor([t + [0] * (width - len(t)) for t in tokens], device=device),
                                 [p + [-1] * (width - len(p)) for p in parents])
            return [ops.sampling_probs(torch.stack([root[r] if i < 0 else lg[r, i] for i in nodes]).float(),
                                       temperature or 1.0, top_p).log() if nodes else None
                    for r, nodes in enumerate(expand)]

        trees = specexec_trees(logprob_fn, b, nodes, max_depth)
        n = max(len(t.tokens) for t in trees)  # shorter trees end in empty nodes (token -1)
        tokens = torch.tensor([t.tokens + [-1] * (n - len(t.tokens)) for t in trees], device=device)
        return tokens, [t.parents + [-1] * (n - len(t.parents)) for t in trees], None

    n = len(shape)
    v = root.shape[-1]
    tokens = torch.full((b, n), -1, dtype=torch.int64, device=device)
    q_rows = torch.zeros(b, n + 1, v, device=device) if mode == "sample" else None
    node_logits = {-1: root}
    for level in range(1, max(depths) + 1):
        if level > 1:
            upto = [i for i in range(n) if depths[i] < level]
            index = {old: new for new, old in enumerate(upto)}
            lg = tree_logits(tokens[:, upto].clamp(min=0), [index.get(shape[i], -1) for i in upto])
            node_logits.update({i: lg[:, j] for j, i in enumerate(upto) if depths[i] == level - 1})
        for par in sorted({shape[i] for i in range(n) if depths[i] == level}):
            kids = [i for i in range(n) if shape[i] == par]
            x = node_logits[par].float()
            if mode == "greedy":
                drawn = x.topk(len(kids), -1).indices
            else:
                q = ops.sampling_probs(x, temperature, top_p)
                q_rows[:, par + 1] = q
                drawn = _draw_without_replacement(q, len(kids), generator)
            tokens[:, kids] = drawn
    return tokens, list(shape), q_rows
