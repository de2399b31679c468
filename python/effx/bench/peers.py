"""Peers run side by side with effx in the kivi (decode attention) and tree suites: PyTorch SDPA
pinned to each backend, flash-attn and FlashInfer when importable on CUDA.

A peer that is absent, is not for this device or refuses the inputs is noted with the reason
(:func:`effx.bench.harness.note_skipped`), never silently dropped. A peer whose output differs
from default SDPA's on the same inputs is noted too and not timed: a wrongly called peer
would otherwise be timed doing something else.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from effx.bench.harness import note_skipped

Attention = Callable[[], torch.Tensor]  # a timed call; returns [B, Hq, T, D] like SDPA

SDPA_BACKENDS = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION"}
_CUDA_PEERS = {"flash-attn": "flash_attn", "flashinfer": "flashinfer"}


def cuda_peers(family: str, device: torch.device) -> dict[str, object]:
    """The importable CUDA-only peer modules by peer name; the others are noted once for the
    suite (a missing package is the same for every shape)."""
    found = {}
    for peer, module in _CUDA_PEERS.items():
        if device.type != "cuda":
            note_skipped(family, peer, f"CUDA-only peer; this run is on {device.type}")
            continue
        try:
            found[peer] = importlib.import_module(module)
        except Exception as err:  # a broken install raises more than ImportError (OSError, RuntimeError)
            note_skipped(family, peer, f"not importable ({type(err).__name__}: {err}); pip install {module}")
    return found


def sdpa_candidates(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None = None) -> dict[str, Callable[[], Attention]]:
    """SDPA pinned to each backend this torch knows, as builders of the timed call."""
    def build(backend) -> Attention:
        def call() -> torch.Tensor:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return call

    return {f"sdpa[{label}]": (lambda b=getattr(SDPBackend, name): build(b))
            for label, name in SDPA_BACKENDS.items() if hasattr(SDPBackend, name)}


def flash_attn_decode(flash_attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Attention:
    """flash-attn's KV-cache decode over the whole cache ([B, T, H, D] layout, GQA native)."""
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return lambda: flash_attn.flash_attn_with_kvcache(qt, kt, vt).transpose(1, 2)


def flashinfer_decode(flashinfer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      page_size: int = 16) -> Attention:
    """FlashInfer's batch decode over a paged cache holding each row's T tokens in whole pages
    (the plan is made once, outside the timed call, as a serving loop does per step batch)."""
    b, hkv, t, d = k.shape
    if t % page_size:
        raise ValueError(f"T = {t} is not a multiple of the page size {page_size}")
    pages = t // page_size
    k_pages, v_pages = (x.transpose(1, 2).reshape(b * pages, page_size, hkv, d).contiguous() for x in (k, v))
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    i32 = dict(dtype=torch.int32, device=q.device)
    wrapper.plan(torch.arange(0, b * pages + 1, pages, **i32), torch.arange(b * pages, **i32),
                 torch.full((b,), page_size, **i32), q.shape[1], hkv, d, page_size, q_data_type=q.dtype,
                 kv_data_type=k.dtype)
    q3 = q[:, :, 0].contiguous()
    return lambda: wrapper.run(q3, (k_pages, v_pages)).unsqueeze(2)


def flashinfer_tree(flashinfer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    allowed: torch.Tensor) -> Attention:
    """FlashInfer's single-request prefill with a custom boolean mask [N, P + N] (batch 1)."""
    qt, kt, vt = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))
    mask = allowed.to(q.device)
    return lambda: flashinfer.single_prefill_with_kv_cache(qt, kt, vt, custom_mask=mask).transpose(0, 1)[None]


def _reason(err: Exception, caught: list[warnings.WarningMessage]) -> str:
    """The peer's own explanation: SDPA says why a backend refused in warnings, then raises a
    generic error; others say it in the exception."""
    said = list(dict.fromkeys(str(w.message).strip() for w in caught))
    text = "; ".join(said) if said else f"{type(err).__name__}: {err}"
    return " ".join(text.split())[:300]


def usable(family: str, candidates: dict[str, Callable[[], Attention]], reference: torch.Tensor,
           shape: dict) -> dict[str, Attention]:
    """Build and run each candidate once; keep those matching ``reference`` (default SDPA on
    the same inputs) and note the others with why."""
    tol = 1e-4 if reference.dtype == torch.float32 else 2e-2
    kept = {}
    for name, build in candidates.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                call = build()
                got = call()
            except Exception as err:  # each peer raises its own error types for inputs it refuses
                note_skipped(family, name, _reason(err, caught), shape)
                continue
        if got.shape != reference.shape or not torch.allclose(got.float(), reference.float(), atol=tol, rtol=tol):
            diff = (got.float() - reference.float()).abs().max().item() if got.shape == reference.shape else None
            note_skipped(family, name, f"output differs from default SDPA's (shape {list(got.shape)}, "
                                       f"max abs difference {diff})", shape)
            continue
        kept[name] = call
    return kept
