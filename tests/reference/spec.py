"""References for tree speculative decoding (SPECS.md section 5), written from the spec: the
top-p sampling distribution by sorting, the greedy / matching walks in plain Python, and a
brute-force search over all trees for the Sequoia dynamic program."""

from __future__ import annotations

import functools

import torch


def sampling_probs_ref(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """float64: softmax(logits / T); keep the smallest top set (sorted descending) whose mass
    reaches top_p, plus every token tied with its last member; renormalize."""
    p = torch.softmax(logits.double() / temperature, -1)
    if top_p >= 1:
        return p
    flat = p.reshape(-1, p.shape[-1])
    out = torch.zeros_like(flat)
    for r in range(flat.shape[0]):
        s, order = flat[r].sort(descending=True)
        c = s.cumsum(0)
        last = int((c < top_p).sum().clamp(max=len(s) - 1))  # first index where the mass reaches top_p
        tau = s[last]
        keep = flat[r] >= tau
        out[r] = torch.where(keep, flat[r], torch.zeros(())) / flat[r][keep].sum()
    return out.reshape(p.shape)


def walk_ref(tokens: list[int], parents: list[int], want) -> tuple[list[int], int]:
    """(accepted nodes, bonus): from the root, follow the first child (index order) whose token
    is want(node) (node -1 = root)."""
    cur, path = -1, []
    while True:
        w = want(cur)
        nxt = next((j for j in range(len(tokens)) if parents[j] == cur and tokens[j] >= 0 and tokens[j] == w), None)
        if nxt is None:
            return path, w
        path.append(nxt)
        cur = nxt


def tree_value(parents: list[int], p: list[float]) -> float:
    """Expected tokens per verification (accepted + bonus): 1 + sum over nodes of the product of
    p[rank of the node among its siblings] along its path."""
    rank, reach, seen = [], [], {}
    for i, par in enumerate(parents):
        k = seen.get(par, 0)
        seen[par] = k + 1
        rank.append(k)
        if k >= len(p):
            return float("-inf")
        reach.append(p[k] * (1.0 if par < 0 else reach[par]))
    return 1.0 + sum(reach)


@functools.lru_cache(maxsize=None)
def _forests(n: int, depth: int) -> tuple:
    """All ordered forests of exactly n nodes with depth <= depth, as tuples of child forests."""
    if n == 0:
        return ((),)
    if depth == 0:
        return ()
    out = []
    for first in range(1, n + 1):  # nodes in the first tree (root + its subtree)
        for sub in _forests(first - 1, depth - 1):
            for rest in _forests(n - first, depth):
                out.append((sub,) + rest)
    return tuple(out)


def _to_parents(forest, parent=-1, acc=None):
    acc = [] if acc is None else acc
    for sub in forest:
        acc.append(parent)
        _to_parents(sub, len(acc) - 1, acc)
    return acc


def best_tree_value(p: list[float], max_nodes: int, max_depth: int) -> float:
    """Maximum of tree_value over every tree of at most max_nodes nodes and depth <= max_depth."""
    best = 1.0
    for n in range(1, max_nodes + 1):
        for forest in _forests(n, max_depth):
            best = max(best, tree_value(_to_parents(forest), p))
    return best
