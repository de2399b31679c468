"""The KV-cache tiers of the offload family (SPECS.md section 7): :class:`OffloadedCache`.

Each layer's K/V lives where the policy's cache percentages put it (whole layers, by
cumulative size, like FlexGen): on the compute device, in host memory (the runtime's pinned
pool, under its byte budget), or on disk. An offloaded layer is fetched to the compute device
for its attention, and the fetch of the next offloaded layer starts when a layer's attention
starts, on an I/O thread (and a copy stream on CUDA), so it overlaps that layer's compute.

Disk-tier layers are stored per batch row in chunks of ``chunk_tokens`` tokens. A row's
chunk becomes one checksummed blob as soon as the row fills it; until then it stays open in
host memory (one open chunk per row and layer). A decode step therefore writes to disk only
when a chunk fills, and sealed chunks never change, so rows that share a history after
``select_rows`` (beam search) share its blobs. Disk writes and reads go through one I/O
thread in order, so a read never overtakes the write of its chunk.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import os
import shutil
import tempfile
import threading

import torch

from effx import _C
from effx.kv import KVCache, _fail, _store_tokens
from effx.offload import _ALIGN, DEVICE, DISK, HOST, TIER_NAMES, DiskStore, Policy, _rounded


@dataclasses.dataclass
class _RowChunks:
    """One row of a disk-tier layer: blob names of its first, full chunks, and the chunk
    after them ([2, Hkv, chunk_tokens, D] in the host pool) while it holds tokens."""

    sealed: list[str]
    open: torch.Tensor | None = None


class OffloadedCache(KVCache):
    """A dense KV cache whose layers are spread over device, host and disk by ``policy``.

    ``policy.cache_gpu`` / ``policy.cache_cpu`` are the percentages of the layers' K/V bytes
    on the compute device and in host memory; the disk holds the rest. The interface is that
    of every effx cache (``attend``, ``extend``, ``commit_tree``, ``crop``, ``select_rows``,
    ``seq_len``, ``nbytes``) with the attention of :class:`effx.kv.DenseCache`.

    ``host_budget`` (bytes) caps the host pool: host-tier layers, the two staging buffers of
    disk-tier layers (one attending, one prefetching) and one open chunk per row of each
    disk-tier layer; the default is exactly that. ``disk_dir`` holds the disk tier (a temporary
    directory, removed by :meth:`close`, when not given).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int, *,
                 policy: Policy, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 sm_scale: float | None = None, chunk_tokens: int = 256, host_budget: int | None = None,
                 disk_dir: str | os.PathLike | None = None, io_threads: int = 4):
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, capacity, dtype=dtype, device=device,
                         sm_scale=sm_scale)
        name = "OffloadedCache"
        if not isinstance(policy, Policy):
            _fail(name, f"policy must be an effx.offload.Policy, got {type(policy).__name__}")
        if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            _fail(name, f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.policy, self.chunk_tokens = policy, chunk_tokens
        cuda = self.device.type == "cuda"
        elem = torch.empty(0, dtype=dtype).element_size()
        self._shape = (batch_size, num_kv_heads, capacity, head_dim)
        layer_bytes = 2 * batch_size * num_kv_heads * capacity * head_dim * elem
        self._row_chunk_bytes = 2 * num_kv_heads * chunk_tokens * head_dim * elem
        self.tiers = list(_C.offload_place_by_size([layer_bytes] * num_layers, float(policy.cache_gpu),
                                                   float(policy.cache_cpu)))
        n_host, n_disk = self.tiers.count(HOST), self.tiers.count(DISK)
        # Staging: on a CPU device host-tier layers are attended in place, so only disk-tier
        # layers stage; on CUDA every offloaded layer goes through device staging, and disk
        # chunks through host staging.
        staging_host = 2 * layer_bytes if n_disk else 0
        open_bytes = n_disk * batch_size * _rounded(self._row_chunk_bytes)
        need = n_host * _rounded(layer_bytes) + 2 * _rounded(staging_host // 2) + open_bytes
        if host_budget is None:
            host_budget = max(need, _ALIGN)
        elif host_budget < need:
            _fail(name, f"host_budget must be at least {need} bytes for this policy ({n_host} host-tier layer(s) "
                        f"of {layer_bytes} bytes, staging of {staging_host} bytes, open chunks of {open_bytes} "
                        f"bytes), got {host_budget}")
        self.pool = _C.HostPool(host_budget)
        self._owns_dir = False
        self._disk: DiskStore | None = None
        if n_disk:
            if disk_dir is None:
                disk_dir, self._owns_dir = tempfile.mkdtemp(prefix="effx_kv_"), True
            self._disk = DiskStore(disk_dir, io_threads)
        self.disk_dir = None if disk_dir is None else str(disk_dir)

        # Per layer: the resident K/V (device and host tiers), or the chunks of each row (disk
        # tier); sealed blobs are counted by the rows that hold them.
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self._host_kv: list[torch.Tensor | None] = [None] * num_layers  # host tier: K and V, [2, B, H, C, D]
        self._rows: list[list[_RowChunks]] = [[_RowChunks([]) for _ in range(batch_size)] if tier == DISK else []
                                              for tier in self.tiers]
        self._blob_refs: dict[str, int] = {}
        self._blob_serial = itertools.count()
        for layer, tier in enumerate(self.tiers):
            if tier == DEVICE:
                self._k[layer] = torch.zeros(self._shape, dtype=dtype, device=self.device)
                self._v[layer] = torch.zeros(self._shape, dtype=dtype, device=self.device)
            elif tier == HOST:
                self._host_kv[layer] = self._host_tensor((2, *self._shape)).zero_()
                self._k[layer], self._v[layer] = self._host_kv[layer]
        self._lengths = [torch.zeros(batch_size, dtype=torch.int64, device=self.device) for _ in range(num_layers)]

        # Two staging slots for offloaded layers: [2, B, H, C, D] each, on the compute device.
        offloaded = n_disk + (n_host if cuda else 0)
        self._staging = [torch.empty((2, *self._shape), dtype=dtype, device=self.device) if cuda else
                         (self._host_tensor((2, *self._shape)) if n_disk else None)
                         for _ in range(2 if offloaded else 0)]
        self._staging_host = ([self._host_tensor((2, *self._shape)) for _ in range(2)] if cuda and n_disk else [])
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="effx-kv-io")
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._slot_free = [None, None]  # CUDA: event after the last attention that read each slot
        self._inflight: dict[int, tuple[int, concurrent.futures.Future]] = {}
        self._current_slot = 1
        self._events: list[tuple[str, int]] = []
        self._events_lock = threading.Lock()

    # --- tiers and accounting ----------------------------------------------------------------------
    def tier_of(self, layer: int) -> str:
        """Where ``layer``'s K/V lives: 'device', 'host' or 'disk'."""
        self._check_layer("OffloadedCache.tier_of", layer)
        return TIER_NAMES[self.tiers[layer]]

    def tier_bytes(self) -> dict[str, int]:
        """Bytes of K/V storage per tier, staging buffers apart ('staging')."""
        out = dict.fromkeys(TIER_NAMES, 0)
        out["staging"] = sum(t.nbytes for t in self._staging + self._staging_host if t is not None)
        out["disk"] = len(self._blob_refs) * self._row_chunk_bytes
        for layer, tier in enumerate(self.tiers):
            if tier == DISK:
                out["host"] += sum(r.open.nbytes for r in self._rows[layer] if r.open is not None)
            else:
                out[TIER_NAMES[tier]] += self._k[layer].nbytes + self._v[layer].nbytes
        return out

    def nbytes(self) -> int:
        """Bytes held in every tier (device, host, disk), staging buffers included."""
        return sum(self.tier_bytes().values())

    @property
    def host_used(self) -> int:
        return self.pool.used

    @property
    def host_peak(self) -> int:
        return self.pool.peak

    @property
    def host_budget(self) -> int:
        return self.pool.budget

    def events(self) -> list[tuple[str, int]]:
        """('fetch_begin' | 'fetch_end' | 'attend_begin' | 'attend_end', layer) in the order
        they happened: the proof that a layer's fetch ran while another layer computed."""
        with self._events_lock:
            return list(self._events)

    def clear_events(self) -> None:
        with self._events_lock:
            self._events.clear()

    def _record(self, kind: str, layer: int) -> None:
        with self._events_lock:
            self._events.append((kind, layer))

    def _host_tensor(self, shape) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty(0, dtype=self.dtype).element_size()
        try:
            block = self.pool.allocate(_rounded(nbytes))
        except RuntimeError as err:
            raise RuntimeError(f"effx.offload.OffloadedCache: host budget exceeded ({err}); pass a larger "
                               f"host_budget") from None
        return torch.frombuffer(block, dtype=torch.uint8, count=nbytes).view(self.dtype).view(shape)

    def _open_chunk(self) -> torch.Tensor:
        return self._host_tensor((2, self.num_kv_heads, self.chunk_tokens, self.head_dim))

    def _unref(self, name: str) -> None:
        self._blob_refs[name] -= 1
        if not self._blob_refs[name]:
            del self._blob_refs[name]
            self._disk.remove(name)

    # --- fetching offloaded layers --------------------------------------------------------------
    def _offloaded(self, layer: int) -> bool:
        return self.tiers[layer] == DISK or (self.tiers[layer] == HOST and self.device.type == "cuda")

    def _next_offloaded(self, layer: int) -> int | None:
        for step in range(1, self.num_layers + 1):
            other = (layer + step) % self.num_layers
            if self._offloaded(other):
                return None if other == layer else other
        return None

    def _fetch_into(self, layer: int, slot: int) -> None:
        """Fill staging slot ``slot`` with ``layer``'s tokens [0, longest row) (I/O thread)."""
        self._record("fetch_begin", layer)
        n = int(self._host_lengths[layer].max())
        dst = self._staging[slot]
        host = self._host_kv[layer]  # host tier (on CUDA): already whole in host memory
        if host is None:  # disk tier: the rows' chunks into host staging
            host = self._staging_host[slot] if self._staging_host else dst
            ch = self.chunk_tokens
            for b, row in enumerate(self._rows[layer]):
                for c, name in enumerate(row.sealed):
                    host[:, b, :, c * ch:(c + 1) * ch].copy_(self._disk.read(name))
                t0 = len(row.sealed) * ch
                width = int(self._host_lengths[layer][b]) - t0
                if width > 0:
                    host[:, b, :, t0:t0 + width].copy_(row.open[:, :, :width])
        if host is not dst:  # CUDA: host -> device once the slot's last reader is done
            with torch.cuda.stream(self._copy_stream):
                if self._slot_free[slot] is not None:
                    self._copy_stream.wait_event(self._slot_free[slot])
                dst[:, :, :, :n].copy_(host[:, :, :, :n], non_blocking=True)
        if self._copy_stream is not None:
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
            ready.synchronize()  # the host staging may be refilled once this returns
        self._record("fetch_end", layer)

    def _start_fetch(self, layer: int, avoid_slot: int) -> None:
        slot = 1 - avoid_slot
        self._inflight[layer] = (slot, self._io.submit(self._fetch_into, layer, slot))

    def _settle(self, layer: int | None = None) -> None:
        """Finish and drop in-flight fetches (of ``layer``, or all): their data is about to be
        changed, or a slot is needed."""
        for other in [j for j in self._inflight if layer is None or j == layer]:
            _, future = self._inflight.pop(other)
            future.result()

    def _acquire(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """(K, V) of ``layer`` on the compute device and the staging slot they occupy."""
        if not self._offloaded(layer):
            return self._k[layer], self._v[layer], None
        if layer in self._inflight:
            slot, future = self._inflight.pop(layer)
            future.result()
        else:
            self._settle()
            slot = 1 - self._current_slot
            self._io.submit(self._fetch_into, layer, slot).result()
        self._current_slot = slot
        nxt = self._next_offloaded(layer)
        if nxt is not None and nxt not in self._inflight:
            self._start_fetch(nxt, avoid_slot=slot)
        staged = self._staging[slot]
        return staged[0], staged[1], slot

    # --- the cache hooks ----------------------------------------------------------------------
    _windowed = True

    def _attention(self, layer, q, k_new, v_new, new_lengths, parents, window):
        self._record("attend_begin", layer)
        k, v, slot = self._acquire(layer)
        if slot is not None and self._copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        out = torch.ops.effx.dense_attention(q, k_new, v_new, k, v, self._lengths[layer], new_lengths, parents, True,
                                             self.sm_scale, window)
        if slot is not None and self._copy_stream is not None:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._slot_free[slot] = done
        self._record("attend_end", layer)
        return out

    def _append(self, layer, k_new, v_new, new_lengths, added):
        self._settle(layer)
        offsets = self._host_lengths[layer]
        if self.tiers[layer] == DISK:
            self._store_in_chunks(layer, k_new, v_new, offsets, added)
        else:
            on = self._k[layer].device
            _store_tokens([(self._k[layer], k_new.to(on)), (self._v[layer], v_new.to(on))], offsets, added)
        self._lengths[layer] += new_lengths if new_lengths is not None else k_new.shape[2]

    def _store_in_chunks(self, layer, k_new, v_new, offsets, added) -> None:
        ch = self.chunk_tokens
        counts = [added] * self.batch_size if isinstance(added, int) else added.tolist()
        k_host, v_host = k_new.cpu(), v_new.cpu()
        for b, (row, count) in enumerate(zip(self._rows[layer], counts)):
            start = int(offsets[b])
            t, end = start, start + int(count)
            while t < end:
                o = t - len(row.sealed) * ch
                width = min(ch - o, end - t)
                if row.open is None:
                    row.open = self._open_chunk()
                row.open[0, :, o:o + width] = k_host[b, :, t - start:t - start + width]
                row.open[1, :, o:o + width] = v_host[b, :, t - start:t - start + width]
                t += width
                if o + width == ch:  # full: to disk, and its host memory back to the pool
                    name = f"kv.{layer}.{next(self._blob_serial)}"
                    self._io.submit(self._disk.write, name, row.open).result()
                    self._blob_refs[name] = 1
                    row.sealed.append(name)
                    row.open = None

    def _truncate_row(self, row: _RowChunks, n: int) -> None:
        """Keep the row's first ``n`` tokens: later chunks go; a sealed chunk that keeps some
        tokens comes back to the host, open again (its tail will be rewritten)."""
        ch = self.chunk_tokens
        full = n // ch
        if full < len(row.sealed):
            row.open = None
            if n % ch:
                row.open = self._open_chunk()
                row.open.copy_(self._disk.read(row.sealed[full]))
            for name in row.sealed[full:]:
                self._unref(name)
            del row.sealed[full:]
        elif n % ch == 0:
            row.open = None

    def crop(self, n: int) -> None:
        if n < 0:
            _fail("OffloadedCache.crop", f"n must be >= 0, got {n}")
        self._settle()
        self._host_lengths.clamp_(max=n)
        for layer in range(self.num_layers):
            self._lengths[layer].clamp_(max=n)
            for b, row in enumerate(self._rows[layer]):
                self._truncate_row(row, int(self._host_lengths[layer][b]))

    def _storage_tensors(self):
        return [t for t in self._k + self._v if t is not None]

    def select_rows(self, index) -> None:
        if torch.as_tensor(index).numel() != self.batch_size:
            _fail("OffloadedCache.select_rows", f"the batch size of an offloaded cache is fixed (its host buffers "
                                                f"are allocated once): pass {self.batch_size} rows")
        super().select_rows(index)

    def _select_storage(self, rows):
        self._settle()
        host_rows = rows.cpu()
        for layer, tier in enumerate(self.tiers):
            if tier == DISK:  # sealed chunks are shared, open ones copied
                old = self._rows[layer]
                kept = [(list(old[r].sealed), None if old[r].open is None else old[r].open.clone())
                        for r in host_rows.tolist()]
                for sealed, _ in kept:
                    for name in sealed:
                        self._blob_refs[name] += 1
                for row in old:
                    for name in row.sealed:
                        self._unref(name)
                    row.open = None
                self._rows[layer] = [_RowChunks(sealed) for sealed, _ in kept]
                for row, (_, opened) in zip(self._rows[layer], kept):
                    if opened is not None:
                        row.open = self._open_chunk()
                        row.open.copy_(opened)
            elif tier == HOST:
                self._host_kv[layer].copy_(self._host_kv[layer][:, host_rows])
            else:
                self._k[layer], self._v[layer] = self._k[layer][rows], self._v[layer][rows]
            self._lengths[layer] = self._lengths[layer][rows]

    # --- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Finish I/O, stop the I/O thread and remove a temporary disk directory."""
        try:
            self._settle()
        finally:
            self._io.shutdown(wait=True)
            if self._owns_dir and self.disk_dir:
                shutil.rmtree(self.disk_dir, ignore_errors=True)
                self._owns_dir = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_owns_dir", False):
            shutil.rmtree(self.disk_dir, ignore_errors=True)
