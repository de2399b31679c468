"""KV caches behind one interface (SPECS.md section 8): :class:`DenseCache` and
:class:`KIVICache`, plus KIVI's quantize/dequantize helpers for keys and values.

Every cache owns its storage for all layers, preallocated at construction (no per-step
concatenation) and exposes ``attend(layer, q, k_new, v_new, *, parents=None, lengths=None)``:
append the step's new tokens and return attention of ``q`` over the cached tokens plus the new
ones in one fused kernel with one softmax, causal among the new tokens or following the tree
given by ``parents``. Tree tokens are held aside until :meth:`KVCache.commit_tree` keeps the
accepted path.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Sequence

import torch

from effx import ops

__all__ = [
    "KVCache",
    "DenseCache",
    "KIVICache",
    "H2OCache",
    "QuantizedKeys",
    "QuantizedValues",
    "kivi_quantize_keys",
    "kivi_quantize_values",
    "kivi_dequantize_keys",
    "kivi_dequantize_values",
]


def _fail(where: str, message: str) -> None:
    raise ValueError(f"effx.kv.{where}: {message}")


class KVCache(abc.ABC):
    """What every cache policy shares: shapes, bookkeeping of lengths, tree commits."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int, *,
                 dtype: torch.dtype, device: torch.device | str, sm_scale: float | None):
        name = type(self).__name__
        for arg, value in (("num_layers", num_layers), ("batch_size", batch_size), ("num_kv_heads", num_kv_heads),
                           ("head_dim", head_dim), ("capacity", capacity)):
            if not isinstance(value, int) or value < 1:
                _fail(name, f"{arg} must be a positive int, got {value!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            _fail(name, f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.num_layers, self.batch_size, self.num_kv_heads = num_layers, batch_size, num_kv_heads
        self.head_dim, self.capacity, self.dtype = head_dim, capacity, dtype
        self.device = torch.device(device)
        self.sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
        # Host mirror of each row's length, for capacity checks without a device sync.
        self._host_lengths = torch.zeros(num_layers, batch_size, dtype=torch.int64)
        # Per layer, the (q, k, v) of a tree awaiting commit_tree.
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    # --- the interface -------------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, *,
               parents: torch.Tensor | Sequence[int] | None = None,
               lengths: torch.Tensor | Sequence[int] | None = None,
               window: int | None = None,
               return_lse: bool = False):
        """Append ``k_new, v_new`` [B, Hkv, Tn, D] (already rotated) to ``layer`` and return the
        attention of ``q`` [B, Hq, Tn, D] over the cached plus new tokens, [B, Hq, Tn, D].

        ``lengths`` ([B], optional) gives the valid new tokens per row of a ragged batch (the
        rest is right padding: its outputs are 0 and it is not stored). ``parents`` ([Tn] or
        [B, Tn], ``parents[i] < i``, -1 for children of the last cached token) makes the new
        tokens a tree: each attends to its ancestors and itself; they are stored only when
        :meth:`commit_tree` names the accepted ones. ``window`` (tokens, optional) is a
        sliding window: the query at position p sees only positions > p - window (Mistral,
        Qwen2, Hugging Face "sliding_attention" layers; a tree node's position is the cached
        length plus its depth); policies that keep every token at its position (DenseCache,
        KIVICache, OffloadedCache) implement it, H2OCache raises once it would hide a token,
        and a token tree must be no longer than the window. ``return_lse`` also returns the
        log-sum-exp [B, Hq, Tn] (fp32) of the scaled scores.
        """
        name = f"{type(self).__name__}.attend"
        self._check_layer(name, layer)
        self._check_tokens(name, q, k_new, v_new)
        tn = k_new.shape[2]
        added, new_lengths = self._new_lengths(name, lengths, tn)
        tree = None
        if parents is not None:
            if self._pending[layer] is not None:
                _fail(name, f"layer {layer} still holds an uncommitted tree: call commit_tree first")
            tree = torch.as_tensor(parents, dtype=torch.int64)
            idx = torch.arange(tn)
            if tree.shape[-1] != tn or tree.dim() not in (1, 2) or (tree.dim() == 2 and tree.shape[0] != self.batch_size):
                _fail(name, f"parents must have shape [{tn}] or [{self.batch_size}, {tn}], got {list(tree.shape)}")
            if ((tree < -1) | (tree >= idx)).any():
                _fail(name, "parents[i] must be in [-1, i) (a node's parent comes before it)")
            tree = tree.to(self.device)
        window = self._window_for(name, layer, window, tn, tree is not None)
        self._check_capacity(name, layer, added)
        if tree is None:
            out, lse = self._attend_and_store(layer, q, k_new, v_new, new_lengths, added, window)
            self._host_lengths[layer] += added
        else:
            out, lse = self._attention(layer, q, k_new, v_new, new_lengths, tree, window)
            self._pending[layer] = (q, k_new, v_new)
        return (out, lse) if return_lse else out

    def extend(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, *,
               lengths: torch.Tensor | Sequence[int] | None = None) -> None:
        """Store tokens without attending (e.g. a prompt whose attention was computed
        elsewhere): the same storage path as :meth:`attend`."""
        name = f"{type(self).__name__}.extend"
        self._check_layer(name, layer)
        self._check_tokens(name, None, k_new, v_new)
        added, new_lengths = self._new_lengths(name, lengths, k_new.shape[2])
        self._check_capacity(name, layer, added)
        self._append(layer, k_new, v_new, new_lengths, added)
        self._host_lengths[layer] += added

    def commit_tree(self, accepted: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor) -> None:
        """Keep the accepted path of the tree given to the last ``attend(..., parents=...)``.

        ``accepted``: node indices in path order, one sequence for the whole batch or one per
        row (rows may accept different numbers of nodes). The accepted tokens are appended to
        every layer that attended over the tree, contiguous after the prefix; the rest is
        dropped.
        """
        name = f"{type(self).__name__}.commit_tree"
        rows = accepted.tolist() if isinstance(accepted, torch.Tensor) else list(accepted)
        if rows and not isinstance(rows[0], (list, tuple)):
            rows = [rows] * self.batch_size
        if len(rows) != self.batch_size:
            _fail(name, f"accepted must hold one sequence or {self.batch_size} (one per row), got {len(rows)}")
        width = max((len(r) for r in rows), default=0)
        counts = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        for layer, pending in enumerate(self._pending):
            if pending is None:
                continue
            q_tree, k_tree, v_tree = pending
            n_tree = k_tree.shape[2]
            if any(not 0 <= i < n_tree for r in rows for i in r):
                _fail(name, f"accepted node indices must be in [0, {n_tree}), got {rows}")
            self._pending[layer] = None
            if width == 0:
                continue
            index = torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], dtype=torch.int64,
                                 device=self.device)
            ragged = counts.to(self.device) if (counts != width).any() else None
            self._commit_path(layer, q_tree, index, _tokens_at(k_tree, index), _tokens_at(v_tree, index), ragged,
                              counts)
            self._host_lengths[layer] += counts

    def select_rows(self, index: torch.Tensor | Sequence[int]) -> None:
        """Rebuild every layer from batch rows ``index`` ([B'] ints in [0, B), repeats allowed):
        beam reordering, dropping finished rows, repeating rows. The batch size becomes B'."""
        index = torch.as_tensor(index, dtype=torch.int64).cpu()
        if index.dim() != 1 or index.numel() < 1 or bool(((index < 0) | (index >= self.batch_size)).any()):
            _fail(f"{type(self).__name__}.select_rows",
                  f"index must be a non-empty 1-D list of rows in [0, {self.batch_size}), got {index.tolist()}")
        rows = index.to(self.device)
        self._select_storage(rows)
        self._host_lengths = self._host_lengths[:, index]
        self._pending = [None if p is None else tuple(t[rows] for t in p) for p in self._pending]
        self.batch_size = int(index.numel())

    def seq_len(self, layer: int = 0) -> int:
        """Tokens seen by the longest row of ``layer``."""
        self._check_layer(f"{type(self).__name__}.seq_len", layer)
        return int(self._host_lengths[layer].max())

    def lengths(self, layer: int = 0) -> torch.Tensor:
        """Tokens seen by each row of ``layer`` ([B], int64, on the host)."""
        return self._host_lengths[layer].clone()

    def nbytes(self) -> int:
        """Bytes of storage this cache holds, all layers."""
        return sum(t.nbytes for t in self._storage_tensors())

    # --- what each policy defines: crop(n), and the abstract hooks below ------------------------
    @abc.abstractmethod
    def crop(self, n: int) -> None:
        """Forget every token past position ``n`` where the policy can (a clear error where not)."""

    # Policies whose cached token t sits at position t implement the sliding window.
    _windowed = False

    @abc.abstractmethod
    def _attention(self, layer, q, k_new, v_new, new_lengths, parents, window):
        """(out, lse) of the fused attention over cached + new tokens; ``window`` is the sliding
        window (0: none, and always 0 unless the policy is ``_windowed``)."""

    @abc.abstractmethod
    def _append(self, layer, k_new, v_new, new_lengths, added):
        """Store the new tokens (``added``: per row, on the host; the base class advances the
        host lengths afterwards)."""

    def _commit_path(self, layer, q_tree, index, k_path, v_path, new_lengths, added):
        """Store a committed tree path (a chain: each node's ancestors are the nodes before it):
        the path's K/V, gathered; ``q_tree`` and the path's node ``index`` [B, width] are for
        policies that score the path's queries."""
        self._append(layer, k_path, v_path, new_lengths, added)

    def _attend_and_store(self, layer, q, k_new, v_new, new_lengths, added, window):
        """A regular (non-tree) step: attention, then storage."""
        out = self._attention(layer, q, k_new, v_new, new_lengths, None, window)
        self._append(layer, k_new, v_new, new_lengths, added)
        return out

    def _held(self, layer: int) -> torch.Tensor:
        """Tokens stored per row on the host (all seen ones, unless the policy evicts)."""
        return self._host_lengths[layer]

    @abc.abstractmethod
    def _storage_tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (for nbytes)."""

    @abc.abstractmethod
    def _select_storage(self, rows: torch.Tensor) -> None:
        """Replace every per-row storage tensor by its rows ``rows`` (on the cache's device)."""

    # --- checks --------------------------------------------------------------------------------
    def _window_for(self, name: str, layer: int, window: int | None, tn: int, tree: bool) -> int:
        """The kernels' window argument: 0 while the window hides nothing yet (every position
        of the step is < window), else ``window``, where the policy and the step allow it."""
        if window is None:
            return 0
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            _fail(name, f"window must be a positive int or None, got {window!r}")
        last = int(self._host_lengths[layer].max()) + tn - 1  # the step's last position
        if last < window:
            return 0
        if not self._windowed:
            _fail(name, f"position {last} is past the sliding window ({window}) and {type(self).__name__} does not "
                        f"implement sliding-window attention (DenseCache, KIVICache and OffloadedCache do)")
        if tree and tn > window:
            _fail(name, f"a token tree with a sliding window must have at most window ({window}) tokens, got {tn}")
        return window

    def _check_layer(self, name: str, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            _fail(name, f"layer must be in [0, {self.num_layers}), got {layer}")

    def _new_lengths(self, name: str, lengths, tn: int) -> tuple[torch.Tensor | int, torch.Tensor | None]:
        """(tokens added per row on the host, the same on the device or None when all are tn).
        Without ragged lengths the host count stays a plain int: a decode step then costs a few
        host tensor operations per layer instead of a dozen."""
        if lengths is None:
            return tn, None
        added = torch.as_tensor(lengths, dtype=torch.int64).cpu()
        if added.shape != (self.batch_size,) or (added < 0).any() or (added > tn).any():
            _fail(name, f"lengths must be {self.batch_size} ints in [0, {tn}], got {added.tolist()}")
        return added, added.to(self.device)

    def _check_capacity(self, name: str, layer: int, added: torch.Tensor | int) -> None:
        held = self._held(layer)
        if isinstance(added, int):
            if max(held.tolist()) + added <= self.capacity:  # a list: cheaper than a tensor op here
                return
            added = torch.full_like(held, added)
        over = held + added > self.capacity
        if over.any():
            b = int(over.nonzero()[0])
            _fail(name, f"capacity exceeded in row {b}: {int(held[b])} cached + "
                        f"{int(added[b])} new > capacity {self.capacity}")

    def _check_tokens(self, name: str, q: torch.Tensor | None, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        b, h, d = self.batch_size, self.num_kv_heads, self.head_dim
        for arg, t in (("q", q), ("k_new", k_new), ("v_new", v_new)):
            if t is None:
                continue
            if t.dtype != self.dtype or t.device != self.device:
                _fail(name, f"{arg} must be {self.dtype} on {self.device} like the cache, got {t.dtype} on {t.device}")
        if k_new.dim() != 4 or tuple(k_new.shape[:2]) != (b, h) or k_new.shape[3] != d or k_new.shape[2] < 1:
            _fail(name, f"k_new must have shape [{b}, {h}, tokens >= 1, {d}], got {list(k_new.shape)}")
        if v_new.shape != k_new.shape:
            _fail(name, f"v_new must have the shape of k_new {list(k_new.shape)}, got {list(v_new.shape)}")
        if q is None:
            return
        if q.dim() != 4 or q.shape[0] != b or q.shape[2:] != k_new.shape[2:]:
            _fail(name, f"q must have shape [{b}, q_heads, {k_new.shape[2]}, {d}], got {list(q.shape)}")
        if q.shape[1] % h:
            _fail(name, f"q heads ({q.shape[1]}) must be a multiple of kv heads ({h})")


def _tokens_at(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, H, T, D] at tokens index [B, n] per row: [B, H, n, D]."""
    return torch.gather(t, 2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


def _store_tokens(pairs, offsets: torch.Tensor, counts: torch.Tensor | int) -> None:
    """For each (storage [B, H, C, ...], new [B, H, T, ...]): copy row b's first counts[b] new
    tokens (all rows: counts, an int) to slots offsets[b] + (0, 1, ...). Both on the host. The
    uniform case (every decode step) is told apart on Python lists: each tensor operation on
    these few host numbers costs more than the list."""
    offs = offsets.tolist()
    sizes = [counts] if isinstance(counts, int) else counts.tolist()
    if min(sizes) == max(sizes) and min(offs) == max(offs):
        n, tn = offs[0], sizes[0]
        for storage, new in pairs:
            storage.narrow(2, n, tn).copy_(new.narrow(2, 0, tn))
        return
    if isinstance(counts, int):
        counts = torch.full_like(offsets, counts)
    # Ragged rows: scatter each row's valid tokens after its own length.
    device = pairs[0][0].device
    rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
    steps = torch.cat([torch.arange(int(c)) for c in counts])
    slots = (offsets[rows] + steps).to(device)
    rows, steps = rows.to(device), steps.to(device)
    for storage, new in pairs:
        storage[rows, :, slots] = new[rows, :, steps]


class DenseCache(KVCache):
    """Plain full-precision K/V, [B, Hkv, capacity, D] per layer: the baseline every policy is
    compared against, with the same fused attention (prefill and decode)."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int, *,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 sm_scale: float | None = None):
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, capacity, dtype=dtype, device=device,
                         sm_scale=sm_scale)
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self._lengths = [torch.zeros(batch_size, dtype=torch.int64, device=self.device) for _ in range(num_layers)]

    _windowed = True

    def _attention(self, layer, q, k_new, v_new, new_lengths, parents, window):
        return torch.ops.effx.dense_attention(q, k_new, v_new, self.k[layer], self.v[layer], self._lengths[layer],
                                              new_lengths, parents, True, self.sm_scale, window)

    def _append(self, layer, k_new, v_new, new_lengths, added):
        _store_tokens([(self.k[layer], k_new), (self.v[layer], v_new)], self._host_lengths[layer], added)
        self._lengths[layer] += new_lengths if new_lengths is not None else k_new.shape[2]

    def crop(self, n: int) -> None:
        if n < 0:
            _fail("DenseCache.crop", f"n must be >= 0, got {n}")
        self._host_lengths.clamp_(max=n)
        for layer in range(self.num_layers):
            self._lengths[layer].clamp_(max=n)

    def _storage_tensors(self):
        return self.k + self.v

    def _select_storage(self, rows):
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        self._lengths = [t[rows] for t in self._lengths]


@dataclasses.dataclass
class QuantizedKeys:
    """Keys quantized per channel (groups of ``group_size`` tokens): codes [B, H, D, T*bits/32]
    int32 packed along tokens, scale and zero [B, H, D, T/group_size]."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int


@dataclasses.dataclass
class QuantizedValues:
    """Values quantized per token (groups of ``group_size`` channels): codes [B, H, T, D*bits/32]
    int32 packed along channels, scale and zero [B, H, T, D/group_size]."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int


def kivi_quantize_keys(k: torch.Tensor, bits: int = 2, group_size: int = 32) -> QuantizedKeys:
    """KIVI keys, per channel: each group is ``group_size`` consecutive tokens of one channel.

    ``k`` is [B, H, T, D] with T a multiple of ``group_size``; the result uses the storage
    layout of :class:`KIVICache` (include/effx/kivi.h).
    """
    if k.dim() != 4:
        _fail("kivi_quantize_keys", f"k must be 4-D [batch, heads, tokens, head_dim], got shape {list(k.shape)}")
    if group_size < 1 or k.shape[2] % group_size:
        _fail("kivi_quantize_keys", f"the token count of k ({k.shape[2]}) must be a multiple of group_size "
                                    f"({group_size})")
    codes, scale, zero = ops.quantize(k.transpose(2, 3), bits, group_size)
    return QuantizedKeys(codes, scale, zero, bits, group_size)


def kivi_quantize_values(v: torch.Tensor, bits: int = 2, group_size: int = 32) -> QuantizedValues:
    """KIVI values, per token: each group is ``group_size`` consecutive channels of one token
    (``group_size`` must divide head_dim). ``v`` is [B, H, T, D]."""
    if v.dim() != 4:
        _fail("kivi_quantize_values", f"v must be 4-D [batch, heads, tokens, head_dim], got shape {list(v.shape)}")
    codes, scale, zero = ops.quantize(v, bits, group_size)
    return QuantizedValues(codes, scale, zero, bits, group_size)


def kivi_dequantize_keys(qk: QuantizedKeys, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, H, T, D] keys back from :func:`kivi_quantize_keys`."""
    return ops.dequantize(qk.codes, qk.scale, qk.zero, qk.bits, qk.group_size, dtype).transpose(2, 3)


def kivi_dequantize_values(qv: QuantizedValues, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, H, T, D] values back from :func:`kivi_quantize_values`."""
    return ops.dequantize(qv.codes, qv.scale, qv.zero, qv.bits, qv.group_size, dtype)


class KIVICache(KVCache):
    """KIVI (SPECS.md section 2): keys quantized per channel, values per token, at 2 or 4 bits,
    with full-precision residual windows of ``residual`` tokens.

    Each step appends the new tokens to both residuals, attends over
    [quantized ++ residual ++ new] with one softmax, then quantizes: keys in whole blocks of
    ``residual`` tokens once that many have gathered, values one token at a time, oldest first,
    while more than ``residual`` are held. Storage layout: include/effx/kivi.h.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int, *,
                 bits: int = 2, group_size: int = 32, residual: int = 128, dtype: torch.dtype = torch.float16,
                 device: torch.device | str = "cpu", sm_scale: float | None = None):
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, capacity, dtype=dtype, device=device,
                         sm_scale=sm_scale)
        if bits not in (2, 4):
            _fail("KIVICache", f"bits must be 2 or 4, got {bits}")
        if group_size < 1 or group_size * bits % 32:
            _fail("KIVICache", f"group_size must be a positive multiple of {32 // bits} at {bits} bits "
                               f"(groups fill whole int32 words), got {group_size}")
        if head_dim % group_size:
            _fail("KIVICache", f"group_size must divide head_dim ({head_dim}), got {group_size}")
        if residual < group_size or residual % group_size:
            _fail("KIVICache", f"residual must be a positive multiple of group_size ({group_size}), got {residual}")
        self.bits, self.group_size, self.residual = bits, group_size, residual
        b, h, d, r, g = batch_size, num_kv_heads, head_dim, residual, group_size
        c = -(-capacity // g) * g  # storage rounded up to whole groups
        dev = self.device

        def zeros(*shape, dtype=dtype):
            return torch.zeros(shape, dtype=dtype, device=dev)

        self._layers = [
            dict(k_codes=zeros(b, h, d, c * bits // 32, dtype=torch.int32), k_scale=zeros(b, h, d, c // g),
                 k_zero=zeros(b, h, d, c // g), v_codes=zeros(b, h, c, d * bits // 32, dtype=torch.int32),
                 v_scale=zeros(b, h, c, d // g), v_zero=zeros(b, h, c, d // g), k_res=zeros(b, h, d, r),
                 v_res=zeros(b, h, r, d), state=zeros(b, 3, dtype=torch.int64))
            for _ in range(num_layers)
        ]

    _STORAGE = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_res", "v_res", "state")

    _windowed = True

    def _attention(self, layer, q, k_new, v_new, new_lengths, parents, window):
        s = self._layers[layer]
        return torch.ops.effx.kivi_attention(q, k_new, v_new, *(s[n] for n in self._STORAGE), new_lengths, parents,
                                             self.bits, self.group_size, True, self.sm_scale, window)

    def _append(self, layer, k_new, v_new, new_lengths, added):
        s = self._layers[layer]
        torch.ops.effx.kivi_append_(k_new, v_new, *(s[n] for n in self._STORAGE), new_lengths, self.bits,
                                    self.group_size)

    def quantized_lengths(self, layer: int = 0) -> torch.Tensor:
        """Per row: (tokens, keys quantized, values quantized), [B, 3] int64 on the host."""
        return self._layers[layer]["state"].cpu()

    def crop(self, n: int) -> None:
        """Drop tokens past ``n``. Only tokens still in full precision can be dropped: if a row's
        keys or values are quantized beyond ``n``, this raises (their originals are gone)."""
        if n < 0:
            _fail("KIVICache.crop", f"n must be >= 0, got {n}")
        for layer in range(self.num_layers):
            state = self.quantized_lengths(layer)
            keep = state[:, 0] > n
            floor = torch.maximum(state[:, 1], state[:, 2])
            bad = keep & (floor > n)
            if bad.any():
                b = int(bad.nonzero()[0])
                _fail("KIVICache.crop", f"cannot crop row {b} of layer {layer} to {n} tokens: its first "
                                        f"{int(floor[b])} tokens are already quantized (keys {int(state[b, 1])}, "
                                        f"values {int(state[b, 2])}); crop to at least {int(floor[b])}")
        for layer in range(self.num_layers):
            self._layers[layer]["state"][:, 0].clamp_(max=n)
        self._host_lengths.clamp_(max=n)

    def _storage_tensors(self):
        return [t for s in self._layers for t in s.values()]

    def _select_storage(self, rows):
        self._layers = [{n: t[rows] for n, t in s.items()} for s in self._layers]


class H2OCache(KVCache):
    """H2O heavy-hitter eviction (SPECS.md section 3) over plain K/V storage.

    Every step appends the new tokens, attends over held + new tokens while the kernel adds
    each token's attention probability (summed over the query heads of its kv-head's group and
    over the step's queries) to its score, then evicts, per (row, kv-head), down to the
    ``recent`` newest tokens plus the ``heavy`` highest-scoring others (the older of equal
    scores goes first). Scores are never reset while a token stays.

    ``heavy`` and ``recent`` are token counts (ints) or fractions of the prompt length (floats
    in [0, 1], resolved from the longest row of the first step; the paper's 20% budget is
    ``heavy=0.1, recent=0.1``). Long prompts are scored ``prefill_chunk`` queries at a time,
    never with a [T, T] matrix. ``capacity`` bounds the tokens held at once: when a step fits
    (held + new <= capacity) every new token is scored by all of the step's queries before the
    one eviction (exact H2O); when it does not, the cache evicts before each chunk that would
    overflow (streamed prefill, memory bounded by budget + ``prefill_chunk``). A step with a
    token tree (``parents``) scores nothing while the tree is speculative; ``commit_tree``
    then scores the accepted path exactly as the regular step it stands for (its queries
    attend over the held tokens and their own predecessors on the path), so rejected nodes
    add nothing and the scores are those of plain decoding.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int, *,
                 heavy: int | float, recent: int | float, dtype: torch.dtype = torch.float16,
                 device: torch.device | str = "cpu", sm_scale: float | None = None, prefill_chunk: int = 512):
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, capacity, dtype=dtype, device=device,
                         sm_scale=sm_scale)
        for arg, value in (("heavy", heavy), ("recent", recent)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                _fail("H2OCache", f"{arg} must be a token count >= 0 or a fraction in [0, 1], got {value!r}")
            if isinstance(value, float) and value > 1:
                _fail("H2OCache", f"{arg} as a fraction of the prompt must be in [0, 1], got {value}")
        if isinstance(heavy, int) and isinstance(recent, int) and heavy + recent > capacity:
            _fail("H2OCache", f"heavy + recent ({heavy} + {recent}) must not exceed capacity ({capacity})")
        if prefill_chunk < 1:
            _fail("H2OCache", f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self._budget_spec = (heavy, recent)
        self.heavy: int | None = heavy if isinstance(heavy, int) else None
        self.recent: int | None = recent if isinstance(recent, int) else None
        self.prefill_chunk = prefill_chunk
        b, h, c, d, dev = batch_size, num_kv_heads, capacity, head_dim, self.device
        self.k = [torch.zeros(b, h, c, d, dtype=dtype, device=dev) for _ in range(num_layers)]
        self.v = [torch.zeros(b, h, c, d, dtype=dtype, device=dev) for _ in range(num_layers)]
        self._scores = [torch.zeros(b, h, c, dtype=torch.float32, device=dev) for _ in range(num_layers)]
        self._positions = [torch.zeros(b, h, c, dtype=torch.int64, device=dev) for _ in range(num_layers)]
        self._state = [torch.zeros(b, 2, dtype=torch.int64, device=dev) for _ in range(num_layers)]  # held, seen
        self._host_held = torch.zeros(num_layers, batch_size, dtype=torch.int64)

    def _resolve_budget(self, prompt: int) -> None:
        if self.heavy is not None and self.recent is not None:
            return
        heavy, recent = (round(x * prompt) if isinstance(x, float) else x for x in self._budget_spec)
        if heavy + recent > self.capacity:
            _fail("H2OCache", f"heavy + recent ({heavy} + {recent} for a prompt of {prompt}) must not exceed "
                              f"capacity ({self.capacity})")
        self.heavy, self.recent = heavy, recent

    def _held(self, layer: int) -> torch.Tensor:
        return self._host_held[layer]

    def _check_capacity(self, name: str, layer: int, added: torch.Tensor | int) -> None:
        # A step that does not fit is streamed: each chunk must fit after an eviction.
        most = added if isinstance(added, int) else int(added.max())
        self._resolve_budget(max(self._host_lengths[layer].tolist()) + most)
        if self.heavy + self.recent + min(most, self.prefill_chunk) <= self.capacity:
            return
        super()._check_capacity(name, layer, added)

    def _attention(self, layer, q, k_new, v_new, new_lengths, parents, window):
        held = self._state[layer][:, 0]
        return torch.ops.effx.dense_attention(q, k_new, v_new, self.k[layer], self.v[layer], held, new_lengths,
                                              parents, True, self.sm_scale)

    def _store(self, layer, k_new, v_new, added) -> None:
        """Copy new tokens after each row's held slots, with their stream positions (from the
        seen counts already on the device: no host-to-device copy per step)."""
        steps = torch.arange(k_new.shape[2], device=self.device)
        pos = (self._state[layer][:, 1:] + steps)[:, None, :].expand(-1, self.num_kv_heads, -1)
        _store_tokens([(self.k[layer], k_new), (self.v[layer], v_new), (self._positions[layer], pos)],
                      self._host_held[layer], added)
        self._state[layer] += added if isinstance(added, int) else added.to(self.device)[:, None]
        self._host_held[layer] += added

    def _evict(self, layer) -> None:
        torch.ops.effx.h2o_evict_(self.k[layer], self.v[layer], self._scores[layer], self._positions[layer],
                                  self._state[layer], self.heavy, self.recent)
        self._host_held[layer].clamp_(max=self.heavy + self.recent)

    def _attend_and_store(self, layer, q, k_new, v_new, new_lengths, added, window):
        tn = k_new.shape[2]
        self._resolve_budget(added if isinstance(added, int) else int(added.max()))
        outs, lses = [], []
        for c0 in range(0, tn, self.prefill_chunk):
            c1 = min(tn, c0 + self.prefill_chunk)
            # Tokens of the chunk per row: a plain int when every row has all of them (no
            # ragged lengths), so a decode step does no tensor arithmetic on host counts.
            part = c1 - c0 if isinstance(added, int) else (added - c0).clamp(0, c1 - c0)
            if max((self._host_held[layer] + part).tolist()) > self.capacity:
                self._evict(layer)
            chunk_lengths = part.to(self.device) if new_lengths is not None else None
            out, lse = torch.ops.effx.h2o_attention(
                q[:, :, c0:c1], k_new[:, :, c0:c1], v_new[:, :, c0:c1], self.k[layer], self.v[layer],
                self._state[layer][:, 0], chunk_lengths, None, self._scores[layer], True, self.sm_scale)
            # The chunk's tokens are cached before the next chunk attends (their scores were set
            # by the kernel in the slots they now fill; their positions follow the device's seen
            # counts, which _store advances).
            self._store(layer, k_new[:, :, c0:c1], v_new[:, :, c0:c1], part)
            outs.append(out)
            lses.append(lse)
        self._evict(layer)
        if len(outs) == 1:
            return outs[0], lses[0]
        return torch.cat(outs, 2), torch.cat(lses, 2)

    def _commit_path(self, layer, q_tree, index, k_path, v_path, new_lengths, added):
        # The path's queries score as in the step that plain decoding would have made.
        self._attend_and_store(layer, _tokens_at(q_tree, index), k_path, v_path, new_lengths, added, 0)

    def _append(self, layer, k_new, v_new, new_lengths, added):
        # Tokens stored without attention (extend): zero scores, then the budget applies.
        if isinstance(added, int):
            added = torch.full((self.batch_size,), added, dtype=torch.int64)
        held = self._host_held[layer]
        zeros = torch.zeros(k_new.shape[:3], dtype=torch.float32, device=self.device)
        _store_tokens([(self._scores[layer], zeros)], held, added)
        self._resolve_budget(int((self._host_lengths[layer] + added).max()))
        self._store(layer, k_new, v_new, added)
        self._evict(layer)

    def scores(self, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, positions) of the tokens each (row, kv-head) holds, ordered by position:
        [B, Hkv, held] each; rows holding fewer tokens are padded with score 0, position -1."""
        self._check_layer("H2OCache.scores", layer)
        width = int(self._host_held[layer].max())
        held = self._host_held[layer].to(self.device)
        slot = torch.arange(width, device=self.device)
        valid = slot[None, None, :] < held[:, None, None]
        pos = torch.where(valid, self._positions[layer][..., :width], torch.full_like(slot, -1))
        order = torch.where(valid, pos, torch.full_like(pos, torch.iinfo(torch.int64).max)).argsort(-1)
        sc = torch.where(valid, self._scores[layer][..., :width], torch.zeros(()))
        return sc.gather(-1, order), pos.gather(-1, order)

    def crop(self, n: int) -> None:
        if n < 0:
            _fail("H2OCache.crop", f"n must be >= 0, got {n}")
        evicted = self._host_lengths > self._host_held
        if evicted.any():
            layer, b = (int(i) for i in evicted.nonzero()[0])
            _fail("H2OCache.crop", f"cannot crop: row {b} of layer {layer} has evicted tokens, so positions no "
                                   f"longer map to slots")
        self._host_lengths.clamp_(max=n)
        self._host_held.clamp_(max=n)
        for state in self._state:
            state.clamp_(max=n)

    def _storage_tensors(self):
        return self.k + self.v + self._scores + self._positions + self._state

    def _select_storage(self, rows):
        for name in ("k", "v", "_scores", "_positions", "_state"):
            setattr(self, name, [t[rows] for t in getattr(self, name)])
        self._host_held = self._host_held[:, rows.cpu()]
