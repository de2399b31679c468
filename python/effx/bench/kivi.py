"""Benchmark suite ``kivi``: one decode step (attention over the cache plus the new token, and
the append) of KIVI-2/4 and of DenseCache, against PyTorch SDPA on full-precision K/V and
against the plain-PyTorch way of using a KIVI cache (dequantize everything, then attend); and
past 4096 tokens a DenseCache step under Mistral's sliding window of 4096 against the full one.

Peers on the same full-precision K/V are extra baselines of every op: SDPA pinned to each
backend (``sdpa[math]``, ``sdpa[flash]``, ...), ``flash-attn`` and ``flashinfer`` when
importable on CUDA (:mod:`effx.bench.peers`; those that cannot run are noted as skipped)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from effx import kv
from effx.bench import peers
from effx.bench.harness import Record, measure_roofs, median_times

HKV, HQ, D = 8, 32, 128
WINDOW = 4096  # Mistral's sliding window, for the windowed dense step
_OWN = ("dense", "dense window", "kivi2", "kivi4")  # effx's own candidates, not baselines


def torch_dequantize_then_attend(q, cache: kv.KIVICache, n: int):
    """The plain-PyTorch composition: dequantize the whole quantized history with tensor ops,
    concatenate the residual, then SDPA (what a port without fused kernels does each step)."""
    s = cache._layers[0]
    bits, g, r = cache.bits, cache.group_size, cache.residual
    kq, vq = n - n % r, max(0, n - r)
    shifts = torch.arange(0, 32, bits, device=q.device, dtype=torch.int32)
    mask = 2**bits - 1

    def unpack(codes):
        return ((codes.unsqueeze(-1) >> shifts) & mask).flatten(-2).to(q.dtype)

    kc = unpack(s["k_codes"][..., : kq * bits // 32])  # [B, H, D, kq]
    k_deq = kc * s["k_scale"][..., : kq // g].repeat_interleave(g, -1) + s["k_zero"][..., : kq // g].repeat_interleave(g, -1)
    vc = unpack(s["v_codes"][:, :, :vq])  # [B, H, vq, D]
    v_deq = vc * s["v_scale"][:, :, :vq].repeat_interleave(g, -1) + s["v_zero"][:, :, :vq].repeat_interleave(g, -1)
    k_res = s["k_res"][..., : n - kq].transpose(2, 3)
    v_res = s["v_res"].index_select(2, torch.arange(vq, n, device=q.device) % r)
    keys = torch.cat([k_deq.transpose(2, 3), k_res], 2)
    values = torch.cat([v_deq, v_res], 2)
    return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)


def decode_cases(device: torch.device, quick: bool):
    """(batch, cached tokens) of the decode-step suites (kivi, h2o)."""
    if device.type == "cuda":
        batches, lengths = ((1, 8), (1024, 8192)) if quick else ((1, 8, 32), (1024, 8192, 32768))
    else:
        batches, lengths = ((1,), (1024,)) if quick else ((1, 8), (1024, 8192))
    for b in batches:
        for t in lengths:
            yield b, t


def decode_peers(found: dict, q, k, v, shape: dict) -> dict[str, Callable[[], object]]:
    """The peers that run on this decode case (and agree with SDPA), as calls by peer name."""
    candidates = peers.sdpa_candidates(q, k, v)
    if "flash-attn" in found:
        candidates["flash-attn"] = lambda: peers.flash_attn_decode(found["flash-attn"], q, k, v)
    if "flashinfer" in found:
        candidates["flashinfer"] = lambda: peers.flashinfer_decode(found["flashinfer"], q, k, v)
    reference = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return peers.usable("kivi", candidates, reference, shape)


def run(device: torch.device, quick: bool = False) -> list[Record]:
    roofs = measure_roofs(device)
    found = peers.cuda_peers("kivi", device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    name = str(dtype).replace("torch.", "")
    runs = 30 if device.type == "cuda" else 10
    records = []
    for b, t in decode_cases(device, quick):
        torch.manual_seed(0)
        k = torch.randn(b, HKV, t, D, device=device, dtype=dtype)
        v = torch.randn(b, HKV, t, D, device=device, dtype=dtype)
        q = torch.randn(b, HQ, 1, D, device=device, dtype=dtype)
        k1 = torch.randn(b, HKV, 1, D, device=device, dtype=dtype)
        v1 = torch.randn(b, HKV, 1, D, device=device, dtype=dtype)
        kv_fp_bytes = 2 * k.nbytes
        shape = {"B": b, "T": t, "Hkv": HKV, "Hq": HQ, "D": D}
        # Room for every append: warm-up and rounds (up to 2 calls each on a CPU, median_times)
        # of the two candidates on the dense cache (with and without a window).
        room = 2 * 2 * (runs + 10)
        dense = kv.DenseCache(1, b, HKV, D, t + room, dtype=dtype, device=device)
        dense.extend(0, k, v)
        caches = {}
        for bits in (2, 4):
            caches[bits] = kv.KIVICache(1, b, HKV, D, t + room, bits=bits, dtype=dtype, device=device)
            caches[bits].extend(0, k, v)
        n = caches[2].seq_len()
        # Every candidate of this case takes turns (median_times); attend appends a token per
        # call, so each cache grows by the same few tokens for all of them.
        calls = {"dense": lambda: dense.attend(0, q, k1, v1),
                 "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                 **decode_peers(found, q, k, v, shape)}
        if t > WINDOW:  # a sliding window (Mistral's 4096) reads only the window's blocks
            calls["dense window"] = lambda: dense.attend(0, q, k1, v1, window=WINDOW)
        for bits, cache in caches.items():
            calls[f"kivi{bits}"] = lambda cache=cache: cache.attend(0, q, k1, v1)
            calls[f"torch deq+sdpa {bits}"] = lambda cache=cache: torch_dequantize_then_attend(q, cache, n)
        times = median_times(calls, device, runs=runs)
        # The baselines every op is compared with: SDPA and its peers on the full-precision K/V.
        base_times = {name: times[name] for name in calls if name not in _OWN and not name.startswith("torch deq")}
        for base, t_base in base_times.items():
            records.append(Record("kivi", "dense-step", shape, name, roofs.device, times["dense"], kv_fp_bytes,
                                  4.0 * b * HQ * t * D, base, t_base, roofs))
        if "dense window" in times:
            records.append(Record("kivi", "dense-window-step", dict(shape, window=WINDOW), name, roofs.device,
                                  times["dense window"], kv_fp_bytes * WINDOW // t, 4.0 * b * HQ * WINDOW * D,
                                  "dense full", times["dense"], roofs))
        for bits, cache in caches.items():
            held = cache.nbytes()
            shape_b = dict(shape, bits=bits, nbytes_vs_fp16=round(held / (kv_fp_bytes * 2 / k.element_size()), 4))
            bases = {"sdpa": times["sdpa"], "torch deq+sdpa": times[f"torch deq+sdpa {bits}"], **base_times}
            for base, t_base in bases.items():
                records.append(Record("kivi", f"kivi{bits}-step", shape_b, name, roofs.device, times[f"kivi{bits}"],
                                      held, 4.0 * b * HQ * t * D, base, t_base, roofs))
        del dense, caches
    return records
