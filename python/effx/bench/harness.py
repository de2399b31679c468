"""Benchmark harness shared by every effx family.

Timing is the median of many runs after warm-up (CUDA events on GPU, perf_counter on CPU);
an op and its baselines take turns (median_times), so that drift hits them alike.
Roofs are measured here, on this machine: copy bandwidth from a large tensor copy and the
matmul rate from a large matmul, and on CPUs the rate of independent fp32 FMA chains (the
compute roof there: a BLAS may reach half of it) and of bf16 dot products (the roof of bf16
work, where AVX512_BF16 runs it), so "% of roof" refers to the hardware in use.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable, Sequence

import torch

import effx


def _seconds(fn: Callable[[], object], cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_times(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 3, runs: int = 20,
                 min_seconds: float = 0.0) -> dict[str, float]:
    """Median seconds of one call of each of ``fns`` (after ``warmup`` calls of each), by name.

    The calls take turns, one of each per round, so that a machine whose speed drifts (a shared
    VM, a GPU changing clocks) slows every candidate alike instead of whichever ran in the slow
    minute. On a CPU each turn starts with one untimed call: the thread pool's workers may have
    gone to sleep during the previous candidate's serial parts, and waking them costs a VM
    milliseconds (measured: a 2 ms decode step took 10 ms after 50 ms idle), which would be
    charged to whichever candidate comes next. ``min_seconds`` extends the round count for very
    fast calls so the medians are stable.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    cuda = device.type == "cuda"
    rewarm = not cuda and len(fns) > 1
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rounds in range(1, 10 * runs + 1):
        for name, fn in fns.items():
            if rewarm:
                fn()
            times[name].append(_seconds(fn, cuda))
        spent = min(sum(t) for t in times.values())
        if rounds >= runs and spent >= min_seconds:
            break
    return {name: statistics.median(t) for name, t in times.items()}


def median_time(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, runs: int = 20,
                min_seconds: float = 0.0) -> float:
    """Median seconds of one call of ``fn`` (after ``warmup`` calls).

    ``min_seconds`` extends the run count for very fast calls so the median is stable.
    """
    return median_times({"fn": fn}, device, warmup=warmup, runs=runs, min_seconds=min_seconds)["fn"]


@dataclasses.dataclass
class Roofs:
    device: str
    copy_gbps: float  # bytes read + written per second by a large copy
    matmul_tflops: float  # dense matmul rate in the dtype named below
    matmul_dtype: str
    fma_tflops: float = 0.0  # CPUs: fp32 FMA chains on every thread (effx._C.cpu_fma_peak_flops); else 0
    bf16_dot_tflops: float = 0.0  # CPUs with AVX512_BF16: its bf16 dot products, likewise; else 0
    amx_tflops: float = 0.0  # CPUs with AMX-BF16: its bf16 tile products, likewise; else 0

    @property
    def compute_tflops(self) -> float:
        """The compute roof: the FMA rate where probed (a CPU's BLAS may reach half of it), else the matmul's."""
        return max(self.matmul_tflops, self.fma_tflops)

    def compute_tflops_of(self, dtype: str) -> float:
        """The compute roof of work in ``dtype``: bf16 on a CPU with bf16 dot products or AMX tiles
        has the faster of theirs."""
        bf16 = max(self.bf16_dot_tflops, self.amx_tflops) if dtype == "bfloat16" else 0.0
        return max(self.compute_tflops, bf16)

    @property
    def ridge_flop_per_byte(self) -> float:
        return self.compute_tflops * 1e12 / (self.copy_gbps * 1e9)


_ROOFS: dict[str, Roofs] = {}


def measure_roofs(device: torch.device) -> Roofs:
    """Measure (once per process) the copy bandwidth and matmul rate of ``device``, and on a CPU
    its fp32 FMA rate, bf16 dot-product rate and AMX bf16 tile rate."""
    key = str(device)
    if key in _ROOFS:
        return _ROOFS[key]
    cuda = device.type == "cuda"
    nbytes = (1 << 30) if cuda else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t_copy = median_time(lambda: dst.copy_(src), device, warmup=2, runs=10)
    del src, dst
    dtype = torch.bfloat16 if cuda else torch.float32
    n = 8192 if cuda else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = median_time(lambda: a @ b, device, warmup=2, runs=10)
    threads = torch.get_num_threads()
    fma = 0.0 if cuda else effx._C.cpu_fma_peak_flops(threads) / 1e12
    dot = 0.0 if cuda else effx._C.cpu_bf16_dot_peak_flops(threads) / 1e12
    amx = 0.0 if cuda else effx._C.cpu_amx_peak_flops(threads) / 1e12
    roofs = Roofs(device=device_name(device), copy_gbps=2 * nbytes / t_copy / 1e9,
                  matmul_tflops=2 * n**3 / t_mm / 1e12, matmul_dtype=str(dtype).replace("torch.", ""), fma_tflops=fma,
                  bf16_dot_tflops=dot, amx_tflops=amx)
    _ROOFS[key] = roofs
    return roofs


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


@dataclasses.dataclass
class Record:
    """One measured case: effx against the plain-PyTorch baseline on the same inputs."""

    family: str
    op: str
    shape: dict
    dtype: str
    device: str
    time_s: float
    bytes: float  # bytes the op must move at least (inputs read once, outputs written once)
    flops: float
    baseline: str
    baseline_time_s: float
    roofs: Roofs

    @property
    def gbps(self) -> float:
        return self.bytes / self.time_s / 1e9

    @property
    def tflops(self) -> float:
        return self.flops / self.time_s / 1e12

    @property
    def roof_fraction(self) -> float:
        """Fraction of the binding roof: memory for low arithmetic intensity, else compute."""
        t_mem = self.bytes / (self.roofs.copy_gbps * 1e9)
        t_cmp = self.flops / (self.roofs.compute_tflops_of(self.dtype) * 1e12)
        return max(t_mem, t_cmp) / self.time_s

    @property
    def speedup(self) -> float:
        return self.baseline_time_s / self.time_s

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "roofs"}
        d.update(gbps=self.gbps, tflops=self.tflops, roof_fraction=self.roof_fraction, speedup=self.speedup)
        return d


def format_table(records: list[Record]) -> str:
    """A fixed-width table, one row per record."""
    head = f"{'family':<7} {'op':<11} {'shape':<34} {'dtype':<9} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} {'roof%':>6} {'base ms':>9} {'speedup':>8}"
    rows = [head, "-" * len(head)]
    for r in records:
        shape = ",".join(f"{k}={v}" for k, v in r.shape.items())
        rows.append(
            f"{r.family:<7} {r.op:<11} {shape:<34.34} {r.dtype:<9} {r.time_s * 1e3:>9.3f} {r.gbps:>8.1f} "
            f"{r.tflops:>8.3f} {100 * r.roof_fraction:>5.1f}% {r.baseline_time_s * 1e3:>9.3f} {r.speedup:>7.2f}x"
        )
    return "\n".join(rows)


def git_commit() -> str:
    """The commit of the effx source tree measured (or 'unknown' outside a checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cwd in (os.getcwd(), here):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"


@dataclasses.dataclass
class Skipped:
    """A peer that did not run: not importable, not for this device, or it refused the inputs.
    ``shape`` is the case it refused (empty when it was skipped for the whole suite)."""

    family: str
    peer: str
    reason: str
    shape: dict = dataclasses.field(default_factory=dict)


_SKIPPED: list[Skipped] = []


def note_skipped(family: str, peer: str, reason: str, shape: dict | None = None) -> None:
    """Record that ``peer`` did not run (suites return only Records, so notes go here)."""
    _SKIPPED.append(Skipped(family, peer, reason, dict(shape or {})))


def take_skipped() -> list[Skipped]:
    """The notes recorded since the last call, oldest first."""
    notes = list(_SKIPPED)
    _SKIPPED.clear()
    return notes


class PeakMemory:
    """Peak memory a block adds over its start (``peak`` bytes, None where not measurable).

    CUDA: the allocator's peak. Linux CPU: the growth of the process's peak resident set
    (VmHWM, reset through /proc/self/clear_refs), which counts every allocation the process
    touches (torch tensors included, which tracemalloc does not see), not only tensors.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak = device, None
        self.source = "CUDA allocator peak" if device.type == "cuda" else "process peak RSS growth"

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.start = self._status("VmRSS")
            except OSError:
                self.start, self.source = None, None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.start is not None:
            self.peak = self._status("VmHWM") - self.start


def write_json(path: str, records: list[Record], *, skipped: Sequence[Skipped] = (),
               note: str | None = None) -> None:
    """Write the records with the roofs they were measured against, the commit and build;
    ``skipped`` lists the peers that did not run, ``note`` is free text about the run."""
    roofs = {r.roofs.device: dataclasses.asdict(r.roofs) for r in records}
    doc = {
        "effx_version": effx.__version__,
        "commit": git_commit(),
        "torch_version": torch.__version__,
        "build": effx.build_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "roofs": list(roofs.values()),
        "records": [r.to_json() for r in records],
        "skipped": [dataclasses.asdict(s) for s in skipped],
    }
    if note:
        doc["note"] = note
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
