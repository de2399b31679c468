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

import dataclasses
import math
from typing import Sequence

import torch

from effx import ops

__all__ = [
    "KVCache",
    "DenseCache",
    "KIVICache",
    "QuantizedKeys",
    "QuantizedValues",
    "kivi_quantize_keys",
    "kivi_quantize_values",
    "kivi_dequantize_keys",
    "kivi_dequantize_values",
]


def _fail(where: str, message: str) -> None:
    raise ValueError(f"effx.kv.{where}: {message}")


class KVCache:
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
        self._pending: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    # --- the interface -------------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, *,
               parents: torch.Tensor | Sequence[int] | None = None,
               lengths: torch.Tensor | Sequence[int] | None = None,
               return_lse: bool = False):
        """Append ``k_new, v_new`` [B, Hkv, Tn, D] (already rotated) to ``layer`` and return the
        attention of ``q`` [B, Hq, Tn, D] over the cached plus new tokens, [B, Hq, Tn, D].

        ``lengths`` ([B], optional) gives the valid new tokens per row of a ragged batch (the
        rest is right padding: its outputs are 0 and it is not stored). ``parents`` ([Tn] or
        [B, Tn], ``parents[i] < i``, -1 for children of the last cached token) makes the new
        tokens a tree: each attends to its ancestors and itself; they are stored only when
        :meth:`commit_tree` names the accepted ones. ``return_lse`` also returns the
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
        self._check_capacity(name, layer, added)
        out, lse = self._attention(layer, q, k_new, v_new, new_lengths, tree)
        if tree is None:
            self._append(layer, k_new, v_new, new_lengths)
            self._host_lengths[layer] += added
        else:
            self._pending[layer] = (k_new, v_new)
        return (out, lse) if return_lse else out

    def extend(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, *,
               lengths: torch.Tensor | Sequence[int] | None = None) -> None:
        """Store tokens without attending (e.g. a prompt whose attention was computed
        elsewhere): the same storage path as :meth:`attend`."""
        name = f"{type(self).__name__}.extend"
        self._check_layer(name, layer)
        self._check_tokens(name, k_new.new_empty(self.batch_size, self.num_kv_heads, *k_new.shape[2:]),
                           k_new, v_new)
        added, new_lengths = self._new_lengths(name, lengths, k_new.shape[2])
        self._check_capacity(name, layer, added)
        self._append(layer, k_new, v_new, new_lengths)
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
            k_tree, v_tree = pending
            n_tree = k_tree.shape[2]
            if any(not 0 <= i < n_tree for r in rows for i in r):
                _fail(name, f"accepted node indices must be in [0, {n_tree}), got {rows}")
            self._pending[layer] = None
            if width == 0:
                continue
            index = torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], dtype=torch.int64,
                                 device=self.device)
            gather = index[:, None, :, None].expand(-1, self.num_kv_heads, -1, self.head_dim)
            k_path = torch.gather(k_tree, 2, gather)
            v_path = torch.gather(v_tree, 2, gather)
            ragged = counts.to(self.device) if (counts != width).any() else None
            self._append(layer, k_path, v_path, ragged)
            self._host_lengths[layer] += counts

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

    # --- what each policy defines: crop(n), and the three hooks below ----------------------------
    def _attention(self, layer, q, k_new, v_new, new_lengths, parents):
        """(out, lse) of the fused attention over cached + new tokens."""
        raise NotImplementedError(type(self).__name__)

    def _append(self, layer, k_new, v_new, new_lengths):
        """Store the new tokens (the base class advances the host lengths)."""
        raise NotImplementedError(type(self).__name__)

    def _storage_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError(type(self).__name__)

    # --- checks --------------------------------------------------------------------------------
    def _check_layer(self, name: str, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            _fail(name, f"layer must be in [0, {self.num_layers}), got {layer}")

    def _new_lengths(self, name: str, lengths, tn: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens added per row on the host, the same on the device or None when all are tn)."""
        if lengths is None:
            return torch.full((self.batch_size,), tn, dtype=torch.int64), None
        added = torch.as_tensor(lengths, dtype=torch.int64).cpu()
        if added.shape != (self.batch_size,) or (added < 0).any() or (added > tn).any():
            _fail(name, f"lengths must be {self.batch_size} ints in [0, {tn}], got {added.tolist()}")
        return added, added.to(self.device)

    def _check_capacity(self, name: str, layer: int, added: torch.Tensor) -> None:
        over = self._host_lengths[layer] + added > self.capacity
        if over.any():
            b = int(over.nonzero()[0])
            _fail(name, f"capacity exceeded in row {b}: {int(self._host_lengths[layer, b])} cached + "
                        f"{int(added[b])} new > capacity {self.capacity}")

    def _check_tokens(self, name: str, q, k_new, v_new) -> None:
        b, h, d = self.batch_size, self.num_kv_heads, self.head_dim
        for arg, t in (("q", q), ("k_new", k_new), ("v_new", v_new)):
            if t.dtype != self.dtype or t.device != self.device:
                _fail(name, f"{arg} must be {self.dtype} on {self.device} like the cache, got {t.dtype} on {t.device}")
        if k_new.dim() != 4 or tuple(k_new.shape[:2]) != (b, h) or k_new.shape[3] != d or k_new.shape[2] < 1:
            _fail(name, f"k_new must have shape [{b}, {h}, tokens >= 1, {d}], got {list(k_new.shape)}")
        if v_new.shape != k_new.shape:
            _fail(name, f"v_new must have the shape of k_new {list(k_new.shape)}, got {list(v_new.shape)}")
        if q.dim() != 4 or q.shape[0] != b or q.shape[2:] != k_new.shape[2:]:
            _fail(name, f"q must have shape [{b}, q_heads, {k_new.shape[2]}, {d}], got {list(q.shape)}")
        if q.shape[1] % h:
            _fail(name, f"q heads ({q.shape[1]}) must be a multiple of kv heads ({h})")


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

    def _attention(self, layer, q, k_new, v_new, new_lengths, parents):
        return torch.ops.effx.dense_attention(q, k_new, v_new, self.k[layer], self.v[layer], self._lengths[layer],
                                              new_lengths, parents, True, self.sm_scale)

    def _append(self, layer, k_new, v_new, new_lengths):
        host = self._host_lengths[layer]
        tn = k_new.shape[2]
        if new_lengths is None and bool((host == host[0]).all()):
            n = int(host[0])
            self.k[layer][:, :, n:n + tn] = k_new
            self.v[layer][:, :, n:n + tn] = v_new
        else:
            # Ragged rows: scatter each row's valid tokens after its own length.
            counts = new_lengths.cpu() if new_lengths is not None else torch.full_like(host, tn)
            rows = torch.repeat_interleave(torch.arange(self.batch_size), counts)
            steps = torch.cat([torch.arange(int(c)) for c in counts])
            pos = host[rows] + steps
            self.k[layer][rows, :, pos] = k_new[rows, :, steps]
            self.v[layer][rows, :, pos] = v_new[rows, :, steps]
        self._lengths[layer] += new_lengths if new_lengths is not None else tn

    def crop(self, n: int) -> None:
        if n < 0:
            _fail("DenseCache.crop", f"n must be >= 0, got {n}")
        self._host_lengths.clamp_(max=n)
        for layer in range(self.num_layers):
            self._lengths[layer].clamp_(max=n)

    def _storage_tensors(self):
        return self.k + self.v


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

    def _attention(self, layer, q, k_new, v_new, new_lengths, parents):
        s = self._layers[layer]
        return torch.ops.effx.kivi_attention(q, k_new, v_new, *(s[n] for n in self._STORAGE), new_lengths, parents,
                                             self.bits, self.group_size, True, self.sm_scale)

    def _append(self, layer, k_new, v_new, new_lengths):
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
