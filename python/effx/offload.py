"""FlexGen-style offloading of weights across GPU, CPU and disk (SPECS.md section 7).

The C++ runtime (``effx._C``: a pinned host pool with a hard byte budget, checksummed disk
blobs read in parallel aligned chunks, a layer streamer that prefetches layer ``j+1`` while
layer ``j`` computes) does the moving; this module places tensors, compresses them, and picks
a policy:

* :class:`Policy`: percentages of weights / KV cache / activations on the GPU and the CPU
  (disk holds the rest), GPU batch size and number of GPU batches, 4-bit compression.
* :class:`OffloadEngine`: serves the weights of a stack of layers with ``load_layer(j)``.
* :class:`DiskStore`: the disk tier on its own (``write(name, tensor)`` / ``read(name)``).
* :func:`search_policy`: FlexGen's linear program over the placement fractions, solved with
  scipy's HiGHS, on a :class:`Hardware` whose constants are measured on the machine.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from typing import Mapping, NamedTuple, Sequence

import torch

from effx import _C, ops

StoreError = _C.StoreError
"""A blob is missing, truncated, corrupted or could not be written (a RuntimeError naming it)."""

DEVICE, HOST, DISK = 0, 1, 2
TIER_NAMES = ("device", "host", "disk")
BITS, GROUP = 4, 64  # SPECS.md section 7: 4-bit asymmetric groups of 64
_ALIGN = 4096
_PART = "-q4-"  # joins a compressed tensor's name and its part (codes, scale, zero); blob-name safe


def _rounded(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------- disk tier
class DiskStore:
    """Tensors as checksummed blob files in ``directory`` (created if missing).

    ``write`` goes through a temporary file renamed into place, so a failed write (a full
    disk) raises :class:`StoreError` and loses nothing else; ``read`` verifies a CRC32C per
    8 MiB chunk and raises :class:`StoreError` naming the blob when it is missing, truncated
    or corrupted.
    """

    def __init__(self, directory: str | os.PathLike, io_threads: int = 4, direct: bool = True):
        os.makedirs(directory, exist_ok=True)
        self.directory = str(directory)
        self._store = _C.DiskStore(self.directory, io_threads, direct)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        meta = json.dumps({"dtype": _dtype_name(t.dtype), "shape": list(t.shape)})
        self._store.write(name, t.data_ptr(), t.nbytes, meta)

    def read(self, name: str) -> torch.Tensor:
        nbytes, meta = self._store.info(name)
        try:
            fields = json.loads(meta)
            dtype, shape = getattr(torch, fields["dtype"]), fields["shape"]
        except (ValueError, KeyError, AttributeError, TypeError) as err:
            raise StoreError(f"effx.offload: blob '{name}' has no tensor metadata ({err})") from None
        out = torch.empty(shape, dtype=dtype)
        if out.nbytes != nbytes:
            raise StoreError(f"effx.offload: blob '{name}' holds {nbytes} bytes but its metadata says "
                             f"{shape} {fields['dtype']} ({out.nbytes} bytes)")
        self._store.read(name, out.data_ptr(), out.nbytes)
        return out

    def remove(self, name: str) -> None:
        self._store.remove(name)

    def __contains__(self, name: str) -> bool:
        return self._store.contains(name)

    def path_of(self, name: str) -> str:
        return self._store.path_of(name)

    def evict_cache(self, name: str) -> None:
        """Drop the blob from the page cache (so the next read measures the disk)."""
        self._store.evict_cache(name)


# --------------------------------------------------------------------------------- compression
class Compressed(NamedTuple):
    """4-bit group-quantized tensor: ``codes, scale, zero`` of :func:`effx.ops.quantize` over
    ``dim`` (moved last), with the original shape and dtype."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    dim: int
    shape: tuple
    dtype: torch.dtype


def compress(x: torch.Tensor, dim: int) -> Compressed:
    """Groups of 64 along ``dim``: dim 0 for weights, head_dim (-1) for the KV cache."""
    dim = dim % x.dim()
    if x.shape[dim] % GROUP:
        raise ValueError(f"effx.offload.compress: size of dim {dim} must be a multiple of {GROUP}, "
                         f"got {x.shape[dim]}")
    moved = x.movedim(dim, -1).contiguous()
    codes, scale, zero = ops.quantize(moved, BITS, GROUP)
    return Compressed(codes, scale, zero, dim, tuple(x.shape), x.dtype)


def decompress(c: Compressed) -> torch.Tensor:
    """Inverse of :func:`compress`, on the device that holds ``c`` (contiguous result)."""
    out = ops.dequantize(c.codes, c.scale, c.zero, BITS, GROUP, c.dtype)
    return out.movedim(-1, c.dim).contiguous() if c.dim != len(c.shape) - 1 else out


def _compressible(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.shape[0] % GROUP == 0 and t.dtype in (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------- policy
@dataclasses.dataclass(frozen=True)
class Policy:
    """Where each kind of data lives, in percent; the disk holds ``100 - gpu - cpu``.

    Weights are placed whole, per tensor, by cumulative size within a layer. The block
    schedule runs ``num_gpu_batches`` batches of ``gpu_batch_size`` sequences per layer, so a
    layer's weights load once per block.
    """

    weights_gpu: float = 100.0
    weights_cpu: float = 0.0
    cache_gpu: float = 100.0
    cache_cpu: float = 0.0
    act_gpu: float = 100.0
    act_cpu: float = 0.0
    gpu_batch_size: int = 1
    num_gpu_batches: int = 1
    compress_weights: bool = False
    compress_cache: bool = False

    def __post_init__(self):
        for kind in ("weights", "cache", "act"):
            _C.offload_check_percentages(float(getattr(self, f"{kind}_gpu")), float(getattr(self, f"{kind}_cpu")), kind)
        for name in ("gpu_batch_size", "num_gpu_batches"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"effx.offload.Policy: {name} must be an integer >= 1, got {v!r}")

    @property
    def weights_disk(self) -> float:
        return 100.0 - self.weights_gpu - self.weights_cpu

    @property
    def cache_disk(self) -> float:
        return 100.0 - self.cache_gpu - self.cache_cpu

    @property
    def act_disk(self) -> float:
        return 100.0 - self.act_gpu - self.act_cpu


def block_schedule(num_layers: int, num_gpu_batches: int) -> list[dict]:
    """FlexGen's block schedule for one decode step: layers outer, GPU batches inner. Each step
    computes ``(layer, batch)`` while loading the weights of the next layer (first batch
    only: weights load once per block), loading the cache of the next step and storing the
    cache of the previous step (wrapping across tokens)."""
    keys = ("layer", "batch", "load_weight_layer", "load_cache_layer", "load_cache_batch",
            "store_cache_layer", "store_cache_batch")
    return [dict(zip(keys, s)) for s in _C.offload_block_schedule(num_layers, num_gpu_batches)]


# --------------------------------------------------------------------------------- engine
class OffloadEngine:
    """Serves the weights of a stack of layers from device, host and disk tiers.

    ``layers[j]`` maps tensor names to tensors (e.g. the q/k/v/o, gate/up/down projections and
    norms of a Llama decoder layer). Each layer's tensors are placed by ``policy.weights_gpu``
    / ``weights_cpu`` (whole tensors, by cumulative size); with ``policy.compress_weights``
    2-D weights whose first dim is a multiple of 64 are stored 4-bit (groups of 64 along dim
    0) and decompressed on the compute device.

    ``load_layer(j)`` returns ``{name: tensor}`` on ``device`` and starts the prefetch of
    layer ``j+1`` (layer 0 after the last), which runs while the caller computes layer ``j``.
    The tensors stay valid as long as the caller holds them; on a CPU device they view pool
    memory that returns to the pool when they die, so hold at most two layers at a time (the
    usual ``for j: w = engine.load_layer(j)`` loop holds one).

    ``host_budget`` (bytes) caps the pinned host pool: it must hold the host tier plus the
    staging of the largest disk-tier layer (two of them on a CPU device: one in use, one
    prefetching); the default is exactly that. ``disk_dir`` holds the disk tier (a temporary
    directory, removed on :meth:`close`, when not given).
    """

    def __init__(self, layers: Sequence[Mapping[str, torch.Tensor]], policy: Policy, *,
                 device: torch.device | str = "cpu", host_budget: int | None = None,
                 disk_dir: str | os.PathLike | None = None, io_threads: int = 4):
        if not layers:
            raise ValueError("effx.offload.OffloadEngine: layers must be a non-empty sequence of {name: tensor}")
        self.policy = policy
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.num_layers = len(layers)
        cuda = self.device.type == "cuda"

        # Per layer: stored components (name -> cpu tensor) and how to rebuild each tensor.
        self._recipes: list[dict] = []
        stored: list[list[tuple[str, list[tuple[str, torch.Tensor]]]]] = []
        for j, layer in enumerate(layers):
            recipe, parts = {}, []
            for name, t in layer.items():
                if _PART in name:
                    raise ValueError(f"effx.offload.OffloadEngine: tensor names must not contain '{_PART}', got '{name}'")
                t = t.detach().to("cpu").contiguous()
                if policy.compress_weights and _compressible(t):
                    c = compress(t, 0)
                    comps = [(f"{name}{_PART}{k}", getattr(c, k)) for k in ("codes", "scale", "zero")]
                    recipe[name] = ("compressed", c._replace(codes=None, scale=None, zero=None))
                else:
                    comps = [(name, t)]
                    recipe[name] = ("plain", None)
                parts.append((name, comps))
            self._recipes.append(recipe)
            stored.append(parts)

        # Placement, then the budget it needs, checked before anything is copied.
        self._tiers: list[dict[str, int]] = []
        host_bytes, staging = 0, [0] * self.num_layers
        for j, parts in enumerate(stored):
            sizes = [sum(c.nbytes for _, c in comps) for _, comps in parts]
            tiers = _C.offload_place_by_size(sizes, float(policy.weights_gpu), float(policy.weights_cpu))
            self._tiers.append({name: tier for (name, _), tier in zip(parts, tiers)})
            for (name, comps), tier in zip(parts, tiers):
                for _, c in comps:
                    if tier == HOST:
                        host_bytes += _rounded(c.nbytes)
                    elif tier == DISK:
                        staging[j] += _rounded(c.nbytes)
        need = host_bytes + (1 if cuda else 2) * max(staging)
        if host_budget is None:
            host_budget = max(need, _ALIGN)
        elif host_budget < need:
            raise ValueError(
                f"effx.offload.OffloadEngine: host_budget must be at least {need} bytes for this policy "
                f"(host tier {host_bytes} bytes + staging of {'one' if cuda else 'two'} disk-tier layer(s) of "
                f"{max(staging)} bytes), got {host_budget}")
        self._owns_dir = False
        self._disk = None
        if any(staging):
            if disk_dir is None:
                disk_dir, self._owns_dir = tempfile.mkdtemp(prefix="effx_offload_"), True
            os.makedirs(disk_dir, exist_ok=True)
            self._disk = _C.DiskStore(str(disk_dir), io_threads, True)
        self.disk_dir = str(disk_dir) if disk_dir is not None else None
        self.pool = _C.HostPool(host_budget)
        self._streamer = _C.LayerStreamer(self.pool, self._disk, self.device.index if cuda else -1)

        # Device tier stays resident; host and disk tiers go to the runtime.
        self._resident: list[dict[str, torch.Tensor]] = []
        self._meta: list[dict[str, tuple]] = []  # component -> (shape, dtype) for streamed ones
        self._host_views: list[dict[str, torch.Tensor]] = []
        for j, parts in enumerate(stored):
            resident, meta, views = {}, {}, {}
            for name, comps in parts:
                tier = self._tiers[j][name]
                for cname, c in comps:
                    if tier == DEVICE:
                        resident[cname] = c.to(self.device)
                        continue
                    meta[cname] = (tuple(c.shape), c.dtype)
                    self._streamer.put(j, cname, c.data_ptr(), c.nbytes, tier)
                    if tier == HOST and not cuda:  # used in place: the host is the compute device
                        views[cname] = self._view(self._streamer.host_block(j, cname), 0, c.nbytes, meta[cname])
            self._resident.append(resident)
            self._meta.append(meta)
            self._host_views.append(views)
        self._streamed = [[t for t in self._streamer.tensors(j)] if j < self._streamer.num_layers else []
                          for j in range(self.num_layers)]
        self._inflight: dict[int, list[torch.Tensor] | None] = {}

    # -- placement and accounting
    def tier_of(self, layer: int, name: str) -> str:
        """Where tensor ``name`` of ``layer`` lives: 'device', 'host' or 'disk'."""
        return TIER_NAMES[self._tiers[layer][name]]

    def tier_bytes(self) -> dict[str, int]:
        """Bytes stored per tier (compressed sizes when compressing)."""
        out = {n: 0 for n in TIER_NAMES}
        for j in range(self.num_layers):
            for t in self._resident[j].values():
                out["device"] += t.nbytes
            for name, nbytes, tier, _ in self._streamed[j]:
                out[TIER_NAMES[tier]] += nbytes
        return out

    @property
    def host_used(self) -> int:
        return self.pool.used

    @property
    def host_peak(self) -> int:
        return self.pool.peak

    @property
    def host_budget(self) -> int:
        return self.pool.budget

    # -- streaming
    def _stream(self):
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    @staticmethod
    def _view(block, offset: int, nbytes: int, meta: tuple) -> torch.Tensor:
        shape, dtype = meta
        raw = torch.frombuffer(block, dtype=torch.uint8, count=nbytes, offset=offset) if nbytes else torch.empty(0, dtype=torch.uint8)
        return raw.view(dtype).view(shape)

    def _fetch(self, j: int) -> None:
        if not self._streamed[j] or j in self._inflight:
            return
        dsts = None
        if self.device.type == "cuda":
            dsts = [torch.empty(self._meta[j][name][0], dtype=self._meta[j][name][1], device=self.device)
                    for name, _, _, _ in self._streamed[j]]
        self._streamer.fetch(j, [d.data_ptr() for d in dsts] if dsts else [], self._stream())
        self._inflight[j] = dsts

    def prefetch(self, j: int) -> None:
        """Start loading layer ``j`` (``load_layer`` does this for ``j+1`` by itself)."""
        self._check_layer(j)
        self._fetch(j)

    def _check_layer(self, j: int) -> None:
        if not 0 <= j < self.num_layers:
            raise IndexError(f"effx.offload.OffloadEngine: layer must be in [0, {self.num_layers}), got {j}")

    def load_layer(self, j: int) -> dict[str, torch.Tensor]:
        """The tensors of layer ``j`` on the compute device; starts the prefetch of ``j+1``."""
        self._check_layer(j)
        # A prefetch of another layer (an out-of-order call) is finished and dropped, so its
        # staging block does not hold the budget.
        for other in [k for k in self._inflight if k != j]:
            self._inflight.pop(other)
            self._streamer.wait(other, self._stream())
        self._fetch(j)
        out: dict[str, torch.Tensor] = dict(self._resident[j])
        if self._streamed[j]:
            dsts = self._inflight.pop(j)
            block = self._streamer.wait(j, self._stream())
            for i, (name, nbytes, tier, offset) in enumerate(self._streamed[j]):
                if dsts is not None:
                    out[name] = dsts[i]
                elif tier == HOST:
                    out[name] = self._host_views[j][name]
                else:
                    out[name] = self._view(block, offset, nbytes, self._meta[j][name])
        if self.num_layers > 1:
            self._fetch((j + 1) % self.num_layers)
        return self._assemble(j, out)

    def _assemble(self, j: int, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, (kind, c) in self._recipes[j].items():
            if kind == "plain":
                out[name] = parts[name]
            else:
                out[name] = decompress(c._replace(**{k: parts[f"{name}{_PART}{k}"] for k in ("codes", "scale", "zero")}))
        return out

    # -- event log (ordering proof for tests and benchmarks)
    def record(self, kind: str, layer: int) -> None:
        """Add a caller event (e.g. 'compute_begin') to the runtime's ordered log."""
        self._streamer.record(kind, layer)

    def events(self) -> list[tuple[int, str, int]]:
        """(sequence, kind, layer) in the order they happened; the runtime logs 'load_begin'
        and 'load_end' per layer fetch."""
        return [tuple(e) for e in self._streamer.events()]

    def wait_event(self, kind: str, layer: int, timeout: float = 60.0) -> bool:
        return self._streamer.wait_event(kind, layer, timeout)

    def clear_events(self) -> None:
        self._streamer.clear_events()

    def close(self) -> None:
        """Finish in-flight fetches, free the pool and remove a temporary disk directory."""
        for j in list(self._inflight):
            self._inflight.pop(j)
            try:
                self._streamer.wait(j, self._stream())
            except (RuntimeError, StoreError):
                pass  # closing: a failed prefetch has nothing left to deliver
        self._streamer = None
        self._host_views = []
        if self._owns_dir and self.disk_dir:
            shutil.rmtree(self.disk_dir, ignore_errors=True)
            self._owns_dir = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_owns_dir", False):
            self.close()


# --------------------------------------------------------------------------------- cost model
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A Llama-family decoder (GQA attention, gated MLP, two RMS norms per layer) and the
    generation it serves: prompts of ``prompt_len`` tokens, ``gen_len`` new tokens."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    prompt_len: int = 512
    gen_len: int = 32
    dtype_bytes: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def layer_params(self) -> int:
        kv = self.num_kv_heads * self.head_dim
        return 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def layer_weight_bytes(self) -> int:
        return self.layer_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Capacities (bytes) and the cost model's constants, measured by :meth:`measure`."""

    gpu_mem: float
    cpu_mem: float
    disk_mem: float
    h2d_gbps: float
    d2h_gbps: float
    disk_read_gbps: float
    disk_write_gbps: float
    matmul_tflops: float

    @classmethod
    def measure(cls, device: torch.device | str, disk_dir: str | None = None, *, gpu_mem: float | None = None,
                cpu_mem: float | None = None, disk_mem: float | None = None, nbytes: int = 256 << 20) -> "Hardware":
        """Time host<->device copies (pinned), disk reads and writes of a checksummed blob
        from a cold page cache, and a large matmul, on this machine."""
        from effx.bench.harness import measure_roofs, median_time

        device = torch.device(device)
        cuda = device.type == "cuda"
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        h2d = nbytes / median_time(lambda: dev.copy_(host, non_blocking=True), device, runs=5) / 1e9
        d2h = nbytes / median_time(lambda: host.copy_(dev, non_blocking=True), device, runs=5) / 1e9
        del dev
        directory = disk_dir or tempfile.mkdtemp(prefix="effx_measure_")
        try:
            store = DiskStore(directory)
            t0 = time.perf_counter()
            store.write("effx_measure", host)
            write = nbytes / (time.perf_counter() - t0) / 1e9
            store.evict_cache("effx_measure")
            t0 = time.perf_counter()
            store._store.read("effx_measure", host.data_ptr(), nbytes)
            read = nbytes / (time.perf_counter() - t0) / 1e9
            store.remove("effx_measure")
            free_disk = shutil.disk_usage(directory).free
        finally:
            if disk_dir is None:
                shutil.rmtree(directory, ignore_errors=True)
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        dev_mem = torch.cuda.mem_get_info(device)[0] if cuda else phys / 2
        return cls(gpu_mem=gpu_mem if gpu_mem is not None else dev_mem,
                   cpu_mem=cpu_mem if cpu_mem is not None else phys / 2,
                   disk_mem=disk_mem if disk_mem is not None else free_disk,
                   h2d_gbps=h2d, d2h_gbps=d2h, disk_read_gbps=read, disk_write_gbps=write,
                   matmul_tflops=measure_roofs(device).matmul_tflops)


_COMPRESSED = (BITS + 2 * 16 / GROUP) / 16  # 4-bit codes + fp16 scale and zero per 64 values, vs fp16


_VARS = ["wg", "wc", "wd", "cg", "cc", "cd", "hg", "hc", "hd", "Tp", "Tg"]
_STREAMS = 5  # rows per phase: disk->cpu, cpu->gpu, gpu->cpu, cpu->disk, compute


def _lp_rows(spec: ModelSpec, hw: Hardware, batch: int, num_batches: int, compress_weights: bool,
             compress_cache: bool):
    """FlexGen's linear cost model of a block of ``batch * num_batches`` sequences, over
    x = [wg, wc, wd, cg, cc, cd, hg, hc, hd, Tp, Tg]: the placement fractions of weights,
    cache and activations, and the time per layer of the prefill (Tp) and of one decode step
    (Tg). In each phase every I/O stream and the compute are one row of ``time <= T``, as
    they overlap; memory rows bound each tier's peak. Returns (A_ub, b_ub, A_eq, b_eq,
    sequences); the prefill rows come first, then the decode rows, then the memory rows."""
    seqs = batch * num_batches
    w = spec.layer_weight_bytes * (_COMPRESSED if compress_weights else 1.0)
    kv_tok = spec.kv_bytes_per_token * (_COMPRESSED if compress_cache else 1.0)
    prompt = spec.prompt_len
    ctx = prompt + spec.gen_len / 2  # mean context over the generation
    cache_prompt = seqs * prompt * kv_tok  # the prompt's K and V of the layer, written in the prefill
    cache_read = seqs * ctx * kv_tok       # cache of the layer read per decode step
    cache_new = seqs * kv_tok              # the new token's K and V written per step
    cache_full = seqs * (prompt + spec.gen_len) * kv_tok
    act = seqs * spec.hidden * spec.dtype_bytes
    act_prompt = act * prompt
    gb = 1e9
    h2d, d2h, dr, dw = hw.h2d_gbps * gb, hw.d2h_gbps * gb, hw.disk_read_gbps * gb, hw.disk_write_gbps * gb
    rate = hw.matmul_tflops * 1e12
    # Causal attention of the prompt: QK^T and PV over half of a prompt x prompt matrix.
    compute_prefill = seqs * prompt * (2 * spec.layer_params + 2 * prompt * spec.hidden) / rate
    compute_decode = seqs * (2 * spec.layer_params + 4 * ctx * spec.hidden) / rate

    def row(**coef):
        r = [0.0] * len(_VARS)
        for k, v in coef.items():
            r[_VARS.index(k)] = v
        return r

    a_ub, b_ub = [], []

    def phase(t: str, cache_in: float, cache_out: float, act_bytes: float, compute: float) -> None:
        """One phase's streams, each <= its time t: the layer's weights and `cache_in` come in
        from their tiers, `cache_out` goes out to its tiers, activations both ways."""
        a_ub.append(row(wd=w / dr, cd=cache_in / dr, hd=act_bytes / dr, **{t: -1}))
        a_ub.append(row(wc=w / h2d, wd=w / h2d, cc=cache_in / h2d, cd=cache_in / h2d, hc=act_bytes / h2d,
                        hd=act_bytes / h2d, **{t: -1}))
        a_ub.append(row(cc=cache_out / d2h, cd=cache_out / d2h, hc=act_bytes / d2h, hd=act_bytes / d2h, **{t: -1}))
        a_ub.append(row(cd=cache_out / dw, hd=act_bytes / dw, **{t: -1}))
        a_ub.append(row(**{t: -1}))
        b_ub.extend([0.0, 0.0, 0.0, 0.0, -compute])

    # Prefill: no cache to read, the prompt's written out. Decode step: the cache read, the
    # new token's K and V written.
    phase("Tp", 0.0, cache_prompt, act_prompt, compute_prefill)
    phase("Tg", cache_read, cache_new, act, compute_decode)
    L = spec.num_layers
    # Peak memory: resident shares of all layers plus the working set (two layers' weights
    # being computed / prefetched, one layer's full cache and activations on the GPU; two
    # staging layers on the host).
    a_ub.append(row(wg=L * w, cg=L * cache_full, hg=L * act)); b_ub.append(hw.gpu_mem - 2 * w - cache_full - 2 * act)
    a_ub.append(row(wc=L * w, cc=L * cache_full, hc=L * act)); b_ub.append(hw.cpu_mem - 2 * w)
    a_ub.append(row(wd=L * w, cd=L * cache_full, hd=L * act)); b_ub.append(hw.disk_mem)
    a_eq = [row(wg=1, wc=1, wd=1), row(cg=1, cc=1, cd=1), row(hg=1, hc=1, hd=1)]
    return a_ub, b_ub, a_eq, [1.0, 1.0, 1.0], seqs


def _time_per_token(spec: ModelSpec, seqs: int, prefill: float, decode: float) -> float:
    """Seconds per generated token of a block: its prefill and gen_len - 1 decode steps
    through every layer, over the block's seqs * gen_len tokens (the first token comes out
    of the prefill)."""
    steps = max(spec.gen_len, 1)
    return spec.num_layers * (prefill + (steps - 1) * decode) / (seqs * steps)


def predict_time_per_token(policy: Policy, spec: ModelSpec, hw: Hardware) -> float:
    """Seconds per generated token under the cost model (inf when a tier overflows)."""
    import numpy as np

    a_ub, b_ub, _, _, seqs = _lp_rows(spec, hw, policy.gpu_batch_size, policy.num_gpu_batches,
                                      policy.compress_weights, policy.compress_cache)
    x = np.array([policy.weights_gpu, policy.weights_cpu, policy.weights_disk, policy.cache_gpu, policy.cache_cpu,
                  policy.cache_disk, policy.act_gpu, policy.act_cpu, policy.act_disk]) / 100.0
    a, b = np.asarray(a_ub), np.asarray(b_ub)
    streams = a[: 2 * _STREAMS, :9] @ x - b[: 2 * _STREAMS]
    if np.any(a[2 * _STREAMS:, :9] @ x > b[2 * _STREAMS:] + 1e-9 * np.abs(b[2 * _STREAMS:]).max()):
        return math.inf
    return _time_per_token(spec, seqs, float(streams[:_STREAMS].max()), float(streams[_STREAMS:].max()))


def search_policy(spec: ModelSpec, hw: Hardware, *, compress_weights: bool = False, compress_cache: bool = False,
                  batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
                  num_gpu_batches: Sequence[int] = (1, 2, 4, 8, 16)) -> tuple[Policy, float]:
    """FlexGen's policy search: for each (GPU batch size, number of GPU batches) solve the
    linear program over the placement fractions minimizing a block's prefill plus gen_len - 1
    decode steps (scipy HiGHS), and return the policy with the least time per generated
    token, and that time in seconds. Raises ValueError when no placement fits the memory of
    the three tiers."""
    import numpy as np
    from scipy.optimize import linprog

    best: tuple[float, Policy] | None = None
    steps = max(spec.gen_len, 1)
    for bs, nb in itertools.product(batch_sizes, num_gpu_batches):
        a_ub, b_ub, a_eq, b_eq, seqs = _lp_rows(spec, hw, bs, nb, compress_weights, compress_cache)
        c = np.zeros(len(_VARS))
        c[_VARS.index("Tp")] = 1.0
        c[_VARS.index("Tg")] = steps - 1.0
        res = linprog(c, A_ub=np.asarray(a_ub), b_ub=np.asarray(b_ub), A_eq=np.asarray(a_eq), b_eq=np.asarray(b_eq),
                      bounds=[(0, 1)] * 9 + [(0, None)] * 2, method="highs")
        if res.status != 0:
            continue  # infeasible: this block does not fit the tiers
        per_token = _time_per_token(spec, seqs, res.x[_VARS.index("Tp")], res.x[_VARS.index("Tg")])
        if best is None or per_token < best[0]:
            x = np.clip(res.x[:9], 0.0, 1.0) * 100.0
            policy = Policy(weights_gpu=float(x[0]), weights_cpu=float(min(x[1], 100.0 - x[0])),
                            cache_gpu=float(x[3]), cache_cpu=float(min(x[4], 100.0 - x[3])),
                            act_gpu=float(x[6]), act_cpu=float(min(x[7], 100.0 - x[6])),
                            gpu_batch_size=int(bs), num_gpu_batches=int(nb),
                            compress_weights=compress_weights, compress_cache=compress_cache)
            best = (per_token, policy)
    if best is None:
        raise ValueError("effx.offload.search_policy: no placement fits the GPU, CPU and disk memory of this hardware "
                         f"for {spec}")
    return best[1], best[0]


# --------------------------------------------------------------------------------- demo
OFFLOAD_DEMO_HEADER = f"{'offload (FlexGen)':<26} {'streamed':>11} {'GB/s':>8} {'ms/token':>11} {'resident ms':>11} {'overlap':>8}"


def offload_demo_row(device: torch.device) -> str:
    """One ``effx demo`` row: decode one token through a Llama-shaped stack (8 layers, hidden
    1024 fp32 on a CPU, streamed from disk; 16 layers, hidden 4096 fp16 on CUDA, streamed from
    the pinned host pool) with prefetch, against the same stack resident on the device."""
    from effx.bench.offload import llama_stack, stream_case

    device = torch.device(device)
    cuda = device.type == "cuda"
    cfg, dtype = ((16, 4096, 11008, 32, 8), torch.float16) if cuda else ((8, 1024, 2816, 16, 8), torch.float32)
    policy = Policy(weights_gpu=0, weights_cpu=100 if cuda else 0)
    layers = llama_stack(*cfg, dtype)
    with tempfile.TemporaryDirectory(prefix="effx_demo_offload_") as d:
        r = stream_case(layers, policy, device, d, runs=3)
    src = "host" if cuda else "disk"
    name = f"{cfg[0]} layers from {src}"
    overlap = max(r["io"], r["compute"]) / r["total"]
    return (f"{name:<26} {r['streamed']:>11,} {r['streamed'] / r['total'] / 1e9:>8.2f} {r['total'] * 1e3:>11.2f} "
            f"{r['compute'] * 1e3:>11.2f} {overlap:>7.0%}")


# The KV-cache tiers build on the classes above (effx/offload_cache.py).
from effx.offload_cache import OffloadedCache  # noqa: E402
