"""Model runner: batched generation with any effx KV cache, and teacher-forced scoring.

A batch of prompts of different lengths is packed right-padded and prefilled in one call with
the caches' per-row ``lengths``; each row's RoPE positions continue from its own cached length.
Rows that stop early add nothing to the cache afterwards (``lengths`` 0 for them).

Methods beyond the KV cache plug in as arguments of :func:`generate`: ``mlp`` (per-layer MLP
replacements, e.g. :func:`effx.models.methods.sparse_mlps`), ``weights`` (a provider with
``layer(j)``, e.g. :class:`effx.models.methods.StreamedWeights`) and ``draft`` (a draft model
for tree speculative decoding through :func:`effx.spec.generate`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from effx import kv, offload
from effx.models.llama import CausalLM, LayerWeights

__all__ = ["generate", "GenerationResult", "make_cache", "teacher_forced_logits", "CACHE_POLICIES"]

CACHE_POLICIES = ("dense", "kivi2", "kivi4", "h2o", "offload")


def _fail(message: str) -> None:
    raise ValueError(f"effx.models.generate: {message}")


def make_cache(model: CausalLM, policy: str, batch_size: int, capacity: int, *, prompt_len: int,
               heavy: int | float = 0.1, recent: int | float = 0.1, group_size: int | None = None,
               residual: int = 128, prefill_chunk: int = 128, cache_gpu: float = 0.0,
               cache_cpu: float = 50.0) -> kv.KVCache:
    """A cache of ``policy`` (dense, kivi2, kivi4, h2o, offload) sized for ``model``.

    ``capacity``: prompt + new tokens of the longest row. KIVI groups ``group_size`` tokens or
    channels (default 32, or 16 for head dims 32 does not divide) and keeps ``residual``
    tokens in full precision. H2O holds only its budget
    (``heavy`` + ``recent``: token counts, or fractions of ``prompt_len``) plus one prefill
    chunk, the prompt being scored and evicted in chunks of ``prefill_chunk``. Offload keeps
    ``cache_gpu`` / ``cache_cpu`` percent of the layers' K/V on the device / in host memory
    and the rest on disk (:class:`effx.offload.OffloadedCache`).
    """
    c = model.config
    shape = (c.num_layers, batch_size, c.num_kv_heads, c.head_dim)
    where = dict(dtype=model.dtype, device=model.device)
    if policy == "dense":
        return kv.DenseCache(*shape, capacity, **where)
    if policy in ("kivi2", "kivi4"):
        if group_size is None:
            group_size = 32 if c.head_dim % 32 == 0 else 16
        return kv.KIVICache(*shape, capacity, bits=int(policy[-1]), group_size=group_size, residual=residual, **where)
    if policy == "h2o":
        budget = sum(round(x * prompt_len) if isinstance(x, float) else x for x in (heavy, recent))
        return kv.H2OCache(*shape, min(capacity, budget + min(prefill_chunk, prompt_len)), heavy=heavy,
                           recent=recent, prefill_chunk=prefill_chunk, **where)
    if policy == "offload":
        tiers = offload.Policy(cache_gpu=cache_gpu, cache_cpu=cache_cpu)
        return offload.OffloadedCache(*shape, capacity, policy=tiers, **where)
    _fail(f"cache policy must be one of {', '.join(CACHE_POLICIES)}, got {policy!r}")


@dataclasses.dataclass
class GenerationResult:
    """What :func:`generate` returns. ``tokens[b]``: row b's new tokens (a stop token that ended
    it included); ``finish_reasons[b]``: "stop" or "length"."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    prompt_lengths: list[int]
    prefill_seconds: float
    decode_seconds: float
    cache: kv.KVCache
    accepted_per_step: float | None = None  # tree speculation: tokens emitted per target call
    tree: list[int] | None = None  # tree speculation: the parents of the tree drafted each step (not SpecExec's)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens produced by decode steps (all rows) per second of decoding. Plain decoding takes
        each row's first token from the prefill; speculation leaves the prompt's last token to
        root the first tree, so all its tokens come from decode steps."""
        speculated = self.accepted_per_step is not None
        decoded = self.new_tokens - (0 if speculated else sum(1 for t in self.tokens if t))
        return decoded / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes()


def _rows(prompts, attention_mask) -> list[torch.Tensor]:
    """The prompts as 1-D int64 CPU tensors of their valid tokens."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            _fail(f"a prompt tensor must be [batch, tokens], got shape {list(prompts.shape)}")
        ids = prompts.cpu().long()
        if attention_mask is None:
            return list(ids)
        mask = torch.as_tensor(attention_mask).cpu().bool()
        if mask.shape != ids.shape:
            _fail(f"attention_mask must have the shape of the prompts {list(ids.shape)}, got {list(mask.shape)}")
        rows = []
        for b in range(ids.shape[0]):
            valid = mask[b].nonzero().flatten()
            if valid.numel() and valid[-1] - valid[0] + 1 != valid.numel():
                _fail(f"row {b} of attention_mask has holes: padding must be on the left or the right")
            rows.append(ids[b, valid])
        return rows
    if attention_mask is not None:
        _fail("attention_mask goes with a padded prompt tensor, not with lists of token ids")
    if not prompts or not all(isinstance(p, (list, tuple, torch.Tensor)) for p in prompts):
        _fail("prompts must be a [batch, tokens] tensor or a non-empty list of token id lists")
    return [torch.as_tensor(p, dtype=torch.int64).flatten().cpu() for p in prompts]


def _pack(rows: list[torch.Tensor], vocab: int):
    lengths = [int(r.numel()) for r in rows]
    for b, r in enumerate(rows):
        if not r.numel():
            _fail(f"prompt {b} is empty")
        if int(r.min()) < 0 or int(r.max()) >= vocab:
            _fail(f"prompt {b} has token ids outside [0, {vocab})")
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.int64)
    for b, r in enumerate(rows):
        ids[b, :r.numel()] = r
    ragged = None if len(set(lengths)) == 1 else torch.tensor(lengths)
    return ids, lengths, ragged


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Next token per row from fp32 logits [B, V]: greedy at temperature 0, else nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always the most likely token).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0)
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, pick).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _prepare(model, prompts, attention_mask, cache, max_new_tokens, cache_options):
    rows = _rows(prompts, attention_mask)
    ids, lengths, ragged = _pack(rows, model.config.vocab_size)
    if isinstance(cache, kv.KVCache):
        if cache.batch_size != len(rows):
            _fail(f"the cache was made for batch {cache.batch_size}, got {len(rows)} prompts")
    elif isinstance(cache, str):
        cache = make_cache(model, cache, len(rows), max(lengths) + max_new_tokens, prompt_len=max(lengths),
                           **(cache_options or {}))
    else:
        _fail(f"cache must be a policy name ({', '.join(CACHE_POLICIES)}) or an effx.kv.KVCache, got {cache!r}")
    return ids, lengths, ragged, cache


def generate(model: CausalLM, prompts, *, max_new_tokens: int = 32, cache: str | kv.KVCache = "dense",
             cache_options: dict | None = None, temperature: float = 0.0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), generator: torch.Generator | None = None,
             attention_mask: torch.Tensor | None = None,
             mlp: Sequence[Callable[[torch.Tensor], torch.Tensor] | None] | None = None,
             weights: LayerWeights | None = None, draft: CausalLM | None = None,
             tree: Sequence[int] | str | None = None, progress: bool = False) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens for each prompt.

    prompts: a list of token-id lists (any lengths), or a [B, T] tensor with an optional
        ``attention_mask`` (left or right padding).
    cache: a policy name (``dense``, ``kivi2``, ``kivi4``, ``h2o``; options for
        :func:`make_cache` in ``cache_options``) or a ready :class:`effx.kv.KVCache`.
    temperature: 0 for greedy; else sampling with nucleus ``top_p`` (``generator`` seeds it).
    stop_tokens: ids that end a row (the stop token is kept in its output).
    mlp, weights: forwarded to :meth:`CausalLM.forward` (per-layer MLP modules; a provider of
        layer weights with ``layer(j)``).
    draft: a draft model for tree speculative decoding (:func:`effx.spec.generate`): each step
        it proposes ``tree`` (a parent array or :class:`effx.spec.SequoiaTree`; default a chain
        of 4; ``"auto"``: the tree :func:`effx.models.plan_tree` picks for these prompts and
        this machine, measured before generation starts, through a dense cache unless
        ``cache`` names a policy; ``"specexec"`` or ``"specexec:NODES,DEPTH"``: SpecExec's
        best-first tree of the draft's most likely continuations, rebuilt every step, 16 nodes
        of depth 4 by default, one tree per prompt) and the target verifies it in one forward pass; greedy
        output equals plain greedy decoding, sampling keeps the target's distribution. Prompts
        must have equal lengths; ``prefill_seconds`` is the prompt's pass through both models.
    progress: a tqdm bar over the decode steps.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        _fail(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0 or not 0 < top_p <= 1:
        _fail(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
    if draft is not None:
        return _speculative(model, draft, prompts, max_new_tokens, cache, cache_options, temperature, top_p,
                            stop_tokens, generator, tree, mlp, weights)
    ids, lengths, ragged, cache = _prepare(model, prompts, attention_mask, cache, max_new_tokens, cache_options)
    run = dict(cache=cache, mlp=mlp, weights=weights)
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.int64)
    batch = len(lengths)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    start = time.perf_counter()
    logits = model(ids, lengths=ragged, logits_at=torch.tensor(lengths)[:, None] - 1, **run)[:, 0]
    nxt = _sample(logits, temperature, top_p, generator).cpu()
    sync()
    prefill_seconds = time.perf_counter() - start

    out = [[] for _ in range(batch)]
    active = torch.ones(batch, dtype=torch.bool)
    start = time.perf_counter()
    bar = tqdm(total=max_new_tokens, desc="generate", unit="tok", disable=not progress, leave=False)
    for step in range(max_new_tokens):
        for b in active.nonzero().flatten().tolist():
            out[b].append(int(nxt[b]))
        active &= ~torch.isin(nxt, stop)
        bar.update(1)
        if step == max_new_tokens - 1 or not active.any():
            break
        # Finished rows feed nothing: lengths 0 keeps their cache as it is.
        step_lengths = None if active.all() else active.long()
        logits = model(nxt[:, None], lengths=step_lengths, **run)[:, 0]
        nxt = _sample(logits, temperature, top_p, generator).cpu()
    sync()
    bar.close()
    reasons = ["stop" if t and t[-1] in stop.tolist() else "length" for t in out]
    return GenerationResult(out, reasons, lengths, prefill_seconds, time.perf_counter() - start, cache)


def spec_callable(model: CausalLM, **run) -> Callable:
    """``model`` as :func:`effx.spec.generate` calls it: (tokens, cache, positions, parents,
    lengths) -> logits, with ``run`` (``mlp``, ``weights``) forwarded."""
    def call(tokens, cache, positions, parents=None, lengths=None):
        return model(tokens, cache=cache, positions=positions, parents=parents, lengths=lengths, **run)
    return call


def _specexec_shape(tree: str) -> tuple[int, int]:
    """(nodes, depth) of ``"specexec"`` or ``"specexec:NODES,DEPTH"``."""
    if tree == "specexec":
        return 16, 4
    kind, _, rest = tree.partition(":")
    parts = rest.split(",")
    if kind != "specexec" or len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        _fail(f"tree 'specexec:NODES,DEPTH' takes two ints >= 1, got {tree!r}")
    return int(parts[0]), int(parts[1])


def _speculative(model, draft, prompts, max_new_tokens, cache, cache_options, temperature, top_p, stop_tokens,
                 generator, tree, mlp, weights) -> GenerationResult:
    from effx import spec

    specexec = _specexec_shape(tree) if isinstance(tree, str) and tree.startswith("specexec") else None
    if isinstance(tree, str) and specexec is None:
        if tree != "auto":
            _fail(f"tree must be a parent array, an effx.spec.SequoiaTree, 'auto' or 'specexec[:NODES,DEPTH]', "
                  f"got {tree!r}")
        from effx.models.speculation import plan_tree  # here: speculation imports this module
        tree = plan_tree(model, draft, prompts, temperature=temperature, top_p=top_p,
                         cache=cache if isinstance(cache, str) else "dense", cache_options=cache_options)
    if specexec is not None:
        shape, size = None, specexec[0]
        how = dict(mode="specexec", temperature=temperature, specexec_nodes=specexec[0], specexec_depth=specexec[1])
    else:
        shape = list(tree.parents if isinstance(tree, spec.SequoiaTree) else (tree or [-1, 0, 1, 2]))
        size = len(shape)
        how = dict(tree=shape, mode="greedy" if temperature == 0 else "sample", temperature=temperature or 1.0)
    # The loop runs until the slowest row has max_new_tokens: a faster row may gain a whole
    # path (up to the tree size + 1) every step, and each step attends over a tree.
    room = (size + 1) * (max_new_tokens + 1)
    ids, lengths, ragged, cache = _prepare(model, prompts, None, cache, room, cache_options)
    if ragged is not None:
        _fail("tree speculation needs prompts of equal length (the speculative loop has no ragged prefill)")

    draft_cache = draft.new_cache(len(lengths), lengths[0] + room)
    gen = spec.generate(spec_callable(model, mlp=mlp, weights=weights), spec_callable(draft), ids.to(model.device),
                        max_new_tokens, target_cache=cache, draft_cache=draft_cache, top_p=top_p,
                        generator=generator, **how)
    stop = set(stop_tokens)
    tokens, reasons = [], []
    for row in gen.tokens:
        row = row[:max_new_tokens]
        end = next((i for i, t in enumerate(row) if t in stop), None)
        tokens.append(row if end is None else row[:end + 1])
        reasons.append("length" if end is None else "stop")
    return GenerationResult(tokens, reasons, lengths, gen.prefill_seconds, gen.seconds, cache, gen.mean_accepted,
                            shape)


def teacher_forced_logits(model: CausalLM, prompts, forced: torch.Tensor, *, cache: str | kv.KVCache = "dense",
                          cache_options: dict | None = None, mlp=None, weights: LayerWeights | None = None,
                          ) -> torch.Tensor:
    """Next-token logits [B, N, vocab] (fp32) along a forced stream: after the prompt, then
    after each of ``forced`` [B, N] fed one token per step, exactly as generation would step
    through ``cache``. Comparing two methods on the same stream isolates what each changes."""
    forced = torch.as_tensor(forced, dtype=torch.int64).cpu()
    if forced.dim() != 2 or forced.shape[1] < 1:
        _fail(f"forced must be [batch, tokens >= 1], got shape {list(forced.shape)}")
    ids, lengths, ragged, cache = _prepare(model, prompts, None, cache, forced.shape[1], cache_options)
    if forced.shape[0] != len(lengths):
        _fail(f"forced has {forced.shape[0]} rows for {len(lengths)} prompts")
    run = dict(cache=cache, mlp=mlp, weights=weights)
    steps = [model(ids, lengths=ragged, logits_at=torch.tensor(lengths)[:, None] - 1, **run)[:, 0]]
    for i in range(forced.shape[1] - 1):
        steps.append(model(forced[:, i:i + 1], **run)[:, 0])
    return torch.stack(steps, 1)
