"""Sequoia's hardware-aware tree for a target/draft pair: measure how often the draft's j-th
guess is the target's token and what a forward over a tree of n tokens costs each model on
this machine at this batch and context, then pick the tree size and depth that minimize time
per generated token (:func:`effx.spec.choose_tree`)."""

from __future__ import annotations

import dataclasses
import time

import torch

from effx import spec
from effx.models.generate import _pack, _rows, make_cache, spec_callable
from effx.models.llama import CausalLM

__all__ = ["TreeCosts", "measure_tree_costs", "plan_tree"]

# Positions whose next-token distributions are compared: enough for p[j] to two digits.
_ACCEPTANCE_POSITIONS = 512


def _fail(where: str, message: str) -> None:
    raise ValueError(f"effx.models.{where}: {message}")


def _sizes(max_nodes: int) -> list[int]:
    """Tree sizes timed: powers of two up to max_nodes, and max_nodes (interpolated between)."""
    sizes, n = [], 1
    while n < max_nodes:
        sizes.append(n)
        n *= 2
    return sizes + [max_nodes]


def _tree_seconds(model: CausalLM, cache, n: int, repeats: int, generator: torch.Generator) -> float:
    """Best of ``repeats`` forwards of a tree of n tokens (one root, n - 1 children: the
    attention cost depends on the node count, not the shape) over the cached prefix, each
    dropped after (``commit_tree`` of nothing)."""
    b = cache.batch_size
    tokens = torch.randint(0, model.config.vocab_size, (b, n), generator=generator)
    parents = torch.tensor([-1] + [0] * (n - 1), dtype=torch.int64, device=model.device)
    positions = cache.lengths().to(model.device)[:, None] + (parents >= 0).long()[None]
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms this size up
        spec._sync(model.device)
        start = time.perf_counter()
        model(tokens, cache=cache, positions=positions, parents=parents)
        spec._sync(model.device)
        best = min(best, time.perf_counter() - start)
        cache.commit_tree([[]] * b)
    return best


def _step_overhead(model: CausalLM, draft: CausalLM, ids: torch.Tensor, n: int, cache: str, cache_options: dict,
                   temperature: float, top_p: float, seed: int) -> float:
    """Seconds per speculative step outside the two models' forwards (verification, the caches'
    commits, the loop's own work): a few real steps of a tree of n tokens over the prompts'
    last 16 tokens, less the forwards inside them (the bookkeeping does not grow with the
    context)."""
    short = ids[:, -16:].to(model.device)
    b, t = short.shape
    steps = 6
    room = t + (n + 1) * (steps + 1)
    inside = [0.0]

    def timed(m: CausalLM):
        forward, calls = spec_callable(m), [0]

        def call(*args, **kwargs):
            calls[0] += 1
            spec._sync(model.device)
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            spec._sync(model.device)
            if calls[0] > 1:  # the first call is the prompt's prefill, outside the loop
                inside[0] += time.perf_counter() - start
            return out
        return call

    gen = spec.generate(timed(model), timed(draft), short, steps,
                        target_cache=make_cache(model, cache, b, room, prompt_len=t, **cache_options),
                        draft_cache=draft.new_cache(b, room), tree=[-1] * n,
                        mode="greedy" if temperature == 0 else "sample", temperature=temperature or 1.0,
                        top_p=top_p, generator=torch.Generator(device=model.device).manual_seed(seed))
    return max(0.0, (gen.seconds - inside[0]) / max(1, len(gen.accepted_per_step)))


@dataclasses.dataclass
class TreeCosts:
    """What Sequoia's planner measures for a target/draft pair at one batch and context:
    ``accept`` (p[j], the draft's j-th guess is the target's token), ``target_time`` {n: best
    seconds of a target forward over n tree tokens}, ``draft_time`` {n: the same for the draft},
    ``step_time`` (seconds of a speculative step's own work besides the forwards)."""

    accept: torch.Tensor
    target_time: dict[int, float]
    draft_time: dict[int, float]
    step_time: float = 0.0

    def choose(self, max_nodes: int = 64, max_depth: int = 8, min_nodes: int = 0) -> spec.SequoiaTree:
        """The tree of ``min_nodes`` to ``max_nodes`` tokens and depth at most ``max_depth`` with
        the least predicted time per token (:func:`effx.spec.choose_tree`: seconds per step over
        the expected tokens per row); with ``min_nodes`` 0 the empty tree (plain decoding) when no
        tree pays for its draft."""
        if not isinstance(min_nodes, int) or not 0 <= min_nodes <= max_nodes:
            _fail("TreeCosts.choose", f"min_nodes must be an int in [0, max_nodes = {max_nodes}], got {min_nodes!r}")
        return spec.choose_tree(self.accept, self.draft_time, self.target_time, max_nodes, max_depth,
                                sizes=range(min_nodes, max_nodes + 1), step_time=self.step_time)


def measure_tree_costs(model: CausalLM, draft: CausalLM, prompts, *, max_nodes: int = 64,
                       temperature: float = 0.0, top_p: float = 1.0, cache: str = "dense",
                       cache_options: dict | None = None, repeats: int = 3, seed: int = 0) -> TreeCosts:
    """Measure :class:`TreeCosts` for ``model`` verifying ``draft``'s guesses on these ``prompts``
    (equal lengths, at least 2 tokens) on this device.

    The acceptance vector (:func:`effx.spec.acceptance_vector`: greedy top-k at temperature 0,
    else draws without replacement at ``temperature``/``top_p``) compares both models'
    next-token distributions at up to 512 prompt positions. Costs: the best of ``repeats``
    forwards of each model over a tree of n tokens on top of the prompt (the target through a
    ``cache`` policy of :func:`make_cache` with ``cache_options``, as generation will run it),
    n = 1, 2, 4, ... up to a tree of ``max_nodes`` under the pending token, and the best of
    ``repeats`` measurements of a step's work besides the forwards (a few real steps over a
    16-token suffix of the prompts).
    """
    if not isinstance(max_nodes, int) or max_nodes < 1:
        _fail("measure_tree_costs", f"max_nodes must be an int >= 1, got {max_nodes!r}")
    if not isinstance(repeats, int) or repeats < 1:
        _fail("measure_tree_costs", f"repeats must be an int >= 1, got {repeats!r}")
    if draft.config.vocab_size != model.config.vocab_size:
        _fail("measure_tree_costs", f"the draft's vocabulary ({draft.config.vocab_size}) must be the model's "
                                    f"({model.config.vocab_size})")
    ids, lengths, ragged = _pack(_rows(prompts, None), model.config.vocab_size)
    if ragged is not None:
        _fail("measure_tree_costs", "the prompts must have equal lengths (as tree speculation needs)")
    b, t = ids.shape
    if t < 2:
        _fail("measure_tree_costs", f"the prompts must have at least 2 tokens, got {t}")
    capacity = t + max_nodes + 1
    target_cache = make_cache(model, cache, b, capacity, prompt_len=t, **(cache_options or {}))
    draft_cache = draft.new_cache(b, capacity)
    # Logits at position i predict token i + 1: the last positions of every row.
    per_row = min(t, -(-_ACCEPTANCE_POSITIONS // b))
    at = torch.arange(t - per_row, t)[None].expand(b, -1)
    target_logits = model(ids, cache=target_cache, logits_at=at).flatten(0, 1)
    draft_logits = draft(ids, cache=draft_cache, logits_at=at).flatten(0, 1)
    g = torch.Generator(device=model.device).manual_seed(seed)
    accept = spec.acceptance_vector(target_logits, draft_logits, min(max_nodes, 32), greedy=temperature == 0,
                                    temperature=temperature or 1.0, top_p=top_p, generator=g)
    del target_logits, draft_logits
    cpu = torch.Generator().manual_seed(seed)
    sizes = _sizes(max_nodes + 1)
    # The target verifies the pending token and the tree under it: n + 1 tokens.
    target_time = {n: _tree_seconds(model, target_cache, n, repeats, cpu) for n in sizes}
    draft_time = {n: _tree_seconds(draft, draft_cache, n, repeats, cpu) for n in sizes[:-1] + [max_nodes]}
    step = min(_step_overhead(model, draft, ids, min(max_nodes, 8), cache, cache_options or {}, temperature, top_p,
                              seed) for _ in range(repeats))
    return TreeCosts(accept, target_time, draft_time, step)


def plan_tree(model: CausalLM, draft: CausalLM, prompts, *, max_nodes: int = 64, max_depth: int = 8,
              min_nodes: int = 0, temperature: float = 0.0, top_p: float = 1.0, cache: str = "dense",
              cache_options: dict | None = None, repeats: int = 3, seed: int = 0) -> spec.SequoiaTree:
    """The speculation tree for :func:`effx.models.generate` (``tree=``) that minimizes time per
    token for ``model`` verifying ``draft``'s guesses on these ``prompts`` on this device:
    :func:`measure_tree_costs`, then :meth:`TreeCosts.choose` (``min_nodes`` 0: possibly the
    empty tree, plain decoding).
    """
    # The limits are checked before the measurements, which take seconds.
    if not isinstance(max_depth, int) or max_depth < 1:
        _fail("plan_tree", f"max_depth must be an int >= 1, got {max_depth!r}")
    if not isinstance(min_nodes, int) or not isinstance(max_nodes, int) or not 0 <= min_nodes <= max_nodes:
        _fail("plan_tree", f"min_nodes must be an int in [0, max_nodes = {max_nodes}], got {min_nodes!r}")
    costs = measure_tree_costs(model, draft, prompts, max_nodes=max_nodes, temperature=temperature, top_p=top_p,
                               cache=cache, cache_options=cache_options, repeats=repeats, seed=seed)
    return costs.choose(max_nodes, max_depth, min_nodes)
