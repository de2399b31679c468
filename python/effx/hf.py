"""Hugging Face transformers integration (SPECS.md section 8): effx KV caches inside unmodified
HF decoder models, for transformers 4.56+ and 5.x.

Importing this module registers the attention implementation ``"effx"`` (an attention function
in transformers' ``AttentionInterface`` and its mask function in ``AttentionMaskInterface``).
A model built or loaded with ``attn_implementation="effx"`` and given an :class:`EffxCache`
(``past_key_values=`` or, in transformers 5, ``cache=``) then attends through the effx cache
kernels: one fused call per layer and step over the cached plus new tokens, KIVI reading its
quantized storage directly (the history is never dequantized), H2O scoring and evicting inside
its attention.

The hand-off between the cache and the attention function
---------------------------------------------------------
An HF attention layer calls ``cache.update(k, v, layer_idx)`` and then
``attention_function(module, q, keys, values, mask)`` with whatever ``update`` returned. The effx
caches need ``q`` to attend and store in one call, which ``update`` never sees, so the work moves
to the attention function:

1. :meth:`EffxLayer.update` only parks the step's rotated K/V on the layer and returns them
   unchanged, registering the returned key tensor in a process-wide table keyed by object
   identity (``torch.utils.weak.WeakIdKeyDictionary``: entries vanish with the tensor).
2. :func:`effx_attention` looks the key tensor it receives up in that table. Identity, not the
   layer index, finds the cache, so several caches in flight at once (a target and its assistant,
   two models, two generations) never mix, and ``module.layer_idx`` is only cross-checked. It
   then calls ``KVCache.attend(layer, q, k_new, v_new)``, which attends and stores in one kernel.
3. Misuse fails loudly: a key tensor that did not come from ``update`` while that layer has a
   step parked means the model changed K between cache and attention (error); a step still
   parked at the next ``update`` means the model did not attend with ``"effx"`` (error). Keys
   that come from another cache (``DynamicCache``, or no cache) are attended directly by the
   same dense kernel, the full K/V passed as its cache.

Padding: the mask function hands the attention function the 2D padding mask (``None`` when
nothing is masked). Masked positions of a step are never stored: each row's valid tokens are
packed to the front and attended as a ragged batch (``lengths=``), so a left-padded prompt fills
each row with its own tokens only; the cache checks that the mask's past agrees with what each
row holds. ``get_seq_length`` counts positions as HF does (masked ones included).
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
import transformers
from torch.utils.weak import WeakIdKeyDictionary
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

import effx  # noqa: F401  (loads the operators)
from effx import kv

__all__ = ["EffxCache", "EffxLayer", "effx_attention", "effx_mask", "register", "verify_tree", "POLICIES"]

POLICIES = {"dense": kv.DenseCache, "kivi": kv.KIVICache, "h2o": kv.H2OCache}

# transformers 5 renamed past_key_values to cache and made crop(n) remove n tokens (n <= 0);
# 4.x crops to n tokens (n >= 0) or removes -n (n < 0).
_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
CACHE_KWARG = "cache" if _TRANSFORMERS_5 else "past_key_values"

_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")

# key tensor returned by EffxLayer.update -> that layer (see the module docstring).
_HANDOFF = WeakIdKeyDictionary()
# The layer that parked a step last, to tell "K was changed between update and attention" from
# "these keys come from another cache".
_LAST_PARKED: "weakref.ref[EffxLayer] | None" = None
# 2D padding mask -> its layout, computed once per forward instead of once per layer.
_LAYOUTS = WeakIdKeyDictionary()


def _fail(where: str, message: str, error=ValueError):
    raise error(f"effx.hf.{where}: {message}")


class EffxLayer(CacheLayerMixin):
    """One decoder layer's view of an :class:`EffxCache`: parks the step's K/V for
    :func:`effx_attention` and counts the positions seen (padding included). The storage of all
    layers lives in the cache's :class:`effx.kv.KVCache`."""

    is_compileable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, cache: "EffxCache", index: int):
        super().__init__()
        self._cache = cache
        self.index = index
        self.seen = 0
        self.step: tuple[torch.Tensor, torch.Tensor] | None = None
        self.is_initialized = False

    def __repr__(self):
        return f"EffxLayer({self.index}, seen={self.seen})"

    @property
    def is_croppable(self) -> bool:
        return self._cache.is_croppable

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.step is not None:
            _fail("EffxCache.update",
                  f"layer {self.index} still holds the K/V of the previous forward, which no effx attention "
                  "consumed: the model must run attn_implementation='effx' (import effx.hf, then "
                  "from_pretrained(..., attn_implementation='effx') or model.set_attn_implementation('effx'))",
                  RuntimeError)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        global _LAST_PARKED
        self.step = (key_states, value_states)
        _HANDOFF[key_states] = self
        _LAST_PARKED = weakref.ref(self)
        return key_states, value_states

    def take_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        step, self.step = self.step, None
        return step

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query) -> tuple[int, int]:
        # 5.x passes the query length, 4.x the cache positions of the queries.
        q_len = query if isinstance(query, int) else int(query.shape[0])
        return self.seen + q_len, 0

    def get_max_length(self) -> int:
        return self._cache.max_length()

    def get_max_cache_shape(self) -> int:
        return self._cache.max_length()

    @property
    def max_cache_len(self) -> int:
        return self._cache.max_length()


class EffxCache(Cache):
    """A transformers ``Cache`` whose storage is an effx KV cache (``policy``: ``"dense"``,
    ``"kivi"`` or ``"h2o"``), for models running ``attn_implementation="effx"``.

    ``policy_options`` go to :class:`effx.kv.KIVICache` (``bits``, ``group_size``, ``residual``)
    or :class:`effx.kv.H2OCache` (``heavy``, ``recent``, ``prefill_chunk``). ``max_cache_len``
    is the storage capacity in tokens per row (default ``config.max_position_embeddings``; H2O
    holds at most that many at once). Storage is allocated at the first forward, with its batch
    size, dtype and device; the softmax scale is the model's.

    Works as ``past_key_values=``/``cache=`` of ``model(...)`` and ``model.generate(...)``,
    including padded batches, beam search (``reorder_cache``), ``batch_select_indices`` and
    assisted decoding (``crop``, dense policy; KIVI and H2O crop only tokens not yet quantized
    or evicted, and say so otherwise). Token trees: :func:`verify_tree` then
    :meth:`commit_tree`.
    """

    def __init__(self, config, policy: str = "dense", *, max_cache_len: int | None = None, **policy_options):
        if policy not in POLICIES:
            _fail("EffxCache", f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
        cls = POLICIES[policy]
        try:
            inspect.signature(cls).bind(1, 1, 1, 1, 1, **policy_options)
        except TypeError as err:
            _fail("EffxCache", f"unknown option for policy {policy!r}: {err}", TypeError)
        text = config.get_text_config(decoder=True)
        n_layers = text.num_hidden_layers
        layer_types = getattr(text, "layer_types", None) or ["full_attention"] * n_layers
        other = sorted({t for t in layer_types[:n_layers] if t not in _ATTENTION_LAYER_TYPES})
        if other:
            _fail("EffxCache", f"only attention layers can use an effx cache, this model also has {other}")
        self.policy = policy
        self.policy_options = dict(policy_options)
        self.capacity = int(max_cache_len or text.max_position_embeddings)
        self.num_layers = n_layers
        self.kv: kv.KVCache | None = None
        self._tree: torch.Tensor | None = None
        self._uncommitted = False
        super().__init__(layers=[EffxLayer(self, i) for i in range(n_layers)])

    def __repr__(self):
        return f"EffxCache(policy={self.policy!r}, seen={self.get_seq_length()}, nbytes={self.nbytes()})"

    # --- storage -------------------------------------------------------------------------------
    def storage(self, k_new: torch.Tensor, sm_scale: float) -> kv.KVCache:
        """The effx cache of all layers, created at the first step from its K (batch size, kv
        heads, head_dim, dtype, device) and the model's softmax scale."""
        b, h, _, d = k_new.shape
        if self.kv is None:
            self.kv = POLICIES[self.policy](self.num_layers, b, h, d, self.capacity, dtype=k_new.dtype,
                                            device=k_new.device, sm_scale=sm_scale, **self.policy_options)
            return self.kv
        c = self.kv
        seen = (c.batch_size, c.num_kv_heads, c.head_dim, c.dtype, c.device)
        if (b, h, d, k_new.dtype, k_new.device) != seen:
            _fail("EffxCache", f"this forward has (batch, kv heads, head_dim, dtype, device) = "
                               f"{(b, h, d, k_new.dtype, k_new.device)} but the cache holds {seen}: use one cache "
                               "per batch (or reset() it)")
        if abs(sm_scale - c.sm_scale) > 1e-9 * c.sm_scale:
            _fail("EffxCache", f"layers use different softmax scales ({sm_scale} vs {c.sm_scale})")
        return c

    def nbytes(self) -> int:
        """Bytes the effx storage holds (0 before the first forward)."""
        return 0 if self.kv is None else self.kv.nbytes()

    @property
    def is_croppable(self) -> bool:
        """Whether :meth:`crop` can always roll back (what transformers 5 asks before assisted
        decoding): dense storage only. KIVI loses originals once it quantizes, H2O once it evicts;
        their crop works until then and says why when it cannot."""
        return self.policy == "dense"

    def max_length(self) -> int:
        # H2O streams without bound within its budget; the others hold max_cache_len tokens.
        return -1 if self.policy == "h2o" else self.capacity

    def reset(self) -> None:
        self.kv = None
        self._tree, self._uncommitted = None, False
        for layer in self.layers:
            layer.seen, layer.step = 0, None

    # --- rows ------------------------------------------------------------------------------------
    def _select_rows(self, index: torch.Tensor) -> None:
        if self.kv is not None:
            self.kv.select_rows(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = torch.as_tensor(indices)
        self._select_rows(indices.nonzero().flatten() if indices.dtype == torch.bool else indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv is not None:
            self._select_rows(torch.arange(self.kv.batch_size).repeat_interleave(repeats))

    # --- length ----------------------------------------------------------------------------------
    def crop(self, n: int) -> None:
        """transformers 5: remove ``-n`` tokens (``n <= 0``). transformers 4: keep the first ``n``
        positions (``n >= 0``) or remove ``-n`` tokens (``n < 0``). Raises where the policy has
        already quantized (KIVI) or evicted (H2O) what the crop would need back, and for padded
        batches whose rows hold different numbers of tokens."""
        seen = self.get_seq_length()
        if _TRANSFORMERS_5 and n > 0:
            _fail("EffxCache.crop", f"transformers 5 crops with a negative count of tokens to remove, got {n}")
        drop = -n if n < 0 or _TRANSFORMERS_5 else max(seen - n, 0)
        drop = min(drop, seen)
        if drop == 0:
            return
        if self.kv is not None:
            held = self.kv.lengths(0)
            if bool((held != held[0]).any()):
                _fail("EffxCache.crop", f"rows hold different numbers of tokens {held.tolist()} (a padded batch); "
                                        "crop needs rows of equal length")
            self.kv.crop(int(held[0]) - drop)
        for layer in self.layers:
            layer.seen -= drop

    # --- token trees -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def tree(self, parents: torch.Tensor | Sequence[int]):
        """Within this block a forward attends its new tokens as the tree ``parents`` ([T] or
        [B, T], ``parents[i] < i``, -1 for children of the last cached token) and stores
        nothing until :meth:`commit_tree`. :func:`verify_tree` wraps this with the depth
        position ids."""
        if self._uncommitted:
            _fail("EffxCache.tree", "the previous tree is not committed yet: call commit_tree first", RuntimeError)
        self._tree = torch.as_tensor(parents, dtype=torch.int64)
        try:
            yield self
        finally:
            self._tree = None

    def commit_tree(self, accepted: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor) -> None:
        """Keep the accepted path (node indices in path order, one for all rows or one per row of
        equal length) of the tree of the last :func:`verify_tree`; drop the rest."""
        if not self._uncommitted:
            _fail("EffxCache.commit_tree", "no token tree is waiting: run verify_tree first", RuntimeError)
        rows = accepted.tolist() if isinstance(accepted, torch.Tensor) else list(accepted)
        counts = {len(r) for r in rows} if rows and isinstance(rows[0], (list, tuple)) else {len(rows)}
        if len(counts) != 1:
            _fail("EffxCache.commit_tree", f"every row must accept the same number of tokens (HF positions are "
                                           f"shared), got {sorted(counts)}")
        self.kv.commit_tree(rows)
        self._uncommitted = False
        added = counts.pop()
        for layer in self.layers:
            layer.seen += added


@dataclass
class _Layout:
    """Which tokens of a step a 2D padding mask keeps."""

    all_new_valid: bool
    order: torch.Tensor  # [B, T] the step's valid token indices first, in order (mask's device)
    counts: torch.Tensor  # [B] valid new tokens (host)
    past_valid: torch.Tensor  # [B] valid past positions (host)


def _valid_first(valid: torch.Tensor) -> torch.Tensor:
    """[B, T] indices putting each row's valid positions first, in their order."""
    return torch.argsort((~valid).to(torch.int8), dim=1, stable=True)


def _layout(mask: torch.Tensor, q_len: int) -> _Layout:
    found = _LAYOUTS.get(mask)
    if found is not None and found[0] == q_len:
        return found[1]
    m = mask.bool()
    new, past = m[:, m.shape[1] - q_len:], m[:, :m.shape[1] - q_len]
    host = torch.stack([new.sum(1), past.sum(1)]).cpu()
    layout = _Layout(bool((host[0] == q_len).all()), _valid_first(new), host[0], host[1])
    _LAYOUTS[mask] = (q_len, layout)
    return layout


def _pack(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Tokens of x [B, H, T, D] in ``order`` [B, T] (valid ones first: a right-padded ragged batch)."""
    return x.gather(2, order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _unpack(out: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack`; padded tokens, which the kernel leaves at zero, stay zero."""
    index = order[:, None, :, None].expand(-1, out.shape[1], -1, out.shape[3])
    return torch.empty_like(out).scatter_(2, index, out)


def _padding(mask, q_len: int) -> _Layout | None:
    if mask is None:
        return None
    if mask.dim() != 2:
        _fail("effx_attention", f"got a {mask.dim()}-D attention mask; effx attention takes 2D padding masks "
                                "(token trees: effx.hf.verify_tree)")
    return _layout(mask, q_len)


def _attend_cache(layer: EffxLayer, module, q, mask, scaling, sliding_window):
    cache = layer._cache
    k_new, v_new = layer.take_step()
    if getattr(module, "layer_idx", layer.index) != layer.index:
        _fail("effx_attention", f"module layer_idx {module.layer_idx} received the K/V cached for layer {layer.index}")
    if cache._uncommitted and cache._tree is None:
        _fail("effx_attention", "a token tree is waiting: call EffxCache.commit_tree before the next forward",
              RuntimeError)
    q_len = q.shape[2]
    store = cache.storage(k_new, scaling)
    padding = _padding(mask, q_len)
    if padding is not None:
        held = store.lengths(layer.index)
        if not torch.equal(padding.past_valid, held):
            _fail("effx_attention", f"the attention mask marks {padding.past_valid.tolist()} past tokens per row as "
                                    f"valid but layer {layer.index} holds {held.tolist()}")
    if cache._tree is not None:
        if padding is not None and not padding.all_new_valid:
            _fail("effx_attention", "token trees cannot have padded tokens")
        out = store.attend(layer.index, q, k_new, v_new, parents=cache._tree, window=sliding_window)
        cache._uncommitted = True
        return out
    if padding is None or padding.all_new_valid:
        out = store.attend(layer.index, q, k_new, v_new, window=sliding_window)
    else:
        order = padding.order
        out = store.attend(layer.index, _pack(q, order), _pack(k_new, order), _pack(v_new, order),
                           lengths=padding.counts, window=sliding_window)
        out = _unpack(out, order)
    layer.seen += q_len
    return out


def _attend_full(module, q, k, v, mask, scaling, sliding_window):
    """Keys and values that did not come from an EffxCache hold every position: attend them
    with the same kernel, the past as its cache and the step's tokens as new ones (masked
    positions packed away on both sides)."""
    last = _LAST_PARKED() if _LAST_PARKED is not None else None
    if (last is not None and last.step is not None and last.index == getattr(module, "layer_idx", None)
            and last.step[0].shape[2] == q.shape[2]):
        _fail("effx_attention", f"layer {last.index} received keys other than the ones EffxCache.update "
                                "returned: this model changes K between the cache and the attention, which the "
                                "effx cache cannot follow", RuntimeError)
    q_len, total = q.shape[2], k.shape[2]
    past = total - q_len
    # A sliding-window cache layer keeps only the window's last tokens: masking by index is then
    # masking by position still (index j of the kept tokens is position seen - kept + j).
    window = sliding_window or 0
    padding = _padding(mask, q_len)
    k_new, v_new = k[:, :, past:], v[:, :, past:]
    if padding is None or (padding.all_new_valid and bool((padding.past_valid == past).all())):
        if k.stride() != v.stride() or k.stride(3) != 1:
            k, v = k.contiguous(), v.contiguous()
        lengths = torch.full((q.shape[0],), past, dtype=torch.int64, device=q.device)
        out, _ = torch.ops.effx.dense_attention(q, k_new, v_new, k, v, lengths, None, None, True, scaling, window)
        return out
    order = padding.order
    past_order = _valid_first(mask[:, :past].bool())
    k_cache = torch.cat([_pack(k[:, :, :past], past_order), _pack(k_new, order)], 2)
    v_cache = torch.cat([_pack(v[:, :, :past], past_order), _pack(v_new, order)], 2)
    out, _ = torch.ops.effx.dense_attention(_pack(q, order), _pack(k_new, order), _pack(v_new, order), k_cache,
                                            v_cache, padding.past_valid.to(q.device), padding.counts.to(q.device),
                                            None, True, scaling, window)
    return _unpack(out, order)


def effx_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   sliding_window: int | None = None, **kwargs):
    """transformers attention function ``"effx"``: query [B, Hq, T, D], key/value as returned
    by the cache's ``update``; returns ([B, T, Hq, D], None). See the module docstring for how it
    finds the effx cache."""
    if dropout:
        _fail("effx_attention", f"attention dropout is not supported (inference only), got {dropout}")
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    layer = _HANDOFF.pop(key, None)
    if layer is not None:
        out = _attend_cache(layer, module, query, attention_mask, scale, sliding_window)
    else:
        out = _attend_full(module, query, key, value, attention_mask, scale, sliding_window)
    return out.transpose(1, 2).contiguous(), None


def effx_mask(batch_size: int, *args, kv_length: int | None = None, attention_mask: torch.Tensor | None = None,
              **kwargs) -> torch.Tensor | None:
    """transformers mask function ``"effx"``: the 2D padding mask over the ``kv_length`` positions
    of the step (``None`` when nothing is padded). Causality and token trees are the kernel's."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:] if kv_length is not None else attention_mask
    return None if bool(mask.all()) else mask


def register(name: str = "effx") -> None:
    """Register :func:`effx_attention` and :func:`effx_mask` as attention implementation
    ``name`` (done for ``"effx"`` on import)."""
    AttentionInterface.register(name, effx_attention)
    AttentionMaskInterface.register(name, effx_mask)


def verify_tree(model, cache: EffxCache, input_ids: torch.Tensor, parents: torch.Tensor | Sequence[int],
                **model_kwargs) -> torch.Tensor:
    """Logits [B, T, vocab] of every node of a token tree after the cached prefix, in one forward
    of an unmodified HF model through effx attention: node i attends to the prefix, its
    ancestors and itself, at position prefix + depth(i). ``input_ids`` [B, T] holds the nodes'
    tokens, ``parents`` ([T] or [B, T]) their parents (-1: child of the last cached token).
    Nothing is stored until ``cache.commit_tree(accepted)``."""
    par = torch.as_tensor(parents, dtype=torch.int64).cpu()
    rows = par if par.dim() == 2 else par[None]
    if rows.shape[-1] != input_ids.shape[1]:
        _fail("verify_tree", f"parents must have {input_ids.shape[1]} entries per row (one per node), "
                             f"got shape {list(par.shape)}")
    depth = torch.zeros_like(rows)
    for i in range(rows.shape[1]):
        p = rows[:, i]
        if bool(((p < -1) | (p >= i)).any()):
            _fail("verify_tree", f"parents[{i}] must be in [-1, {i}), got {p.tolist()}")
        depth[:, i] = torch.where(p < 0, 0, depth.gather(1, p.clamp(min=0)[:, None])[:, 0] + 1)
    position_ids = (cache.get_seq_length() + depth).expand(input_ids.shape[0], -1).to(input_ids.device)
    with cache.tree(par):
        out = model(input_ids=input_ids, position_ids=position_ids, use_cache=True, **{CACHE_KWARG: cache},
                    **model_kwargs)
    return out.logits


register()
