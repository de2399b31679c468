"""Benchmark suite ``tree``: tree attention (N tree tokens over a P-token prefix, one random
tree) against a one-token decode attention over the same prefix and against PyTorch SDPA with
a dense float mask over [N, P + N]; the Sequoia dynamic program at 1024 nodes, depth 32; and
end-to-end speculative decoding on a small random model against plain decoding.

Peers of tree attention on the same masked inputs are extra baselines: SDPA pinned to each
backend and FlashInfer (custom mask) when importable on CUDA; flash-attn has no arbitrary
masks, so it is noted as skipped (:mod:`effx.bench.peers`)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from effx import spec
from effx.bench import peers
from effx.bench.harness import Record, measure_roofs, median_times, note_skipped

HKV, HQ, D = 8, 32, 128


def random_tree(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [-1 if i == 0 else int(torch.randint(max(0, i - 8), i, (), generator=g)) for i in range(n)]


def dense_mask(parents: list[int], p: int, device, dtype) -> torch.Tensor:
    """The [N, P + N] additive float mask a plain-PyTorch port builds for SDPA."""
    n = len(parents)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            allowed[i, j] = True
            j = parents[j]
    mask = torch.zeros(n, p + n, dtype=dtype)
    mask[:, p:].masked_fill_(~allowed, float("-inf"))
    return mask.to(device)


def _cases(device: torch.device, quick: bool):
    """(tree tokens, prefix, dtype): fp16 on CUDA; fp32 on CPUs, and bf16 for the 64-token trees
    (the AVX512_BF16 path of the engine where the CPU has it)."""
    if device.type == "cuda":
        return [(n, p, torch.float16) for n in ((64,) if quick else (16, 64, 256, 512))
                for p in ((16384,) if quick else (1024, 16384, 32768))]
    cases = [(n, p, torch.float32) for n in ((64,) if quick else (16, 64, 256))
             for p in ((1024,) if quick else (1024, 16384))]
    return cases + [(n, p, torch.bfloat16) for n, p, _ in cases if n == 64]


def attention_records(device: torch.device, quick: bool) -> list[Record]:
    roofs = measure_roofs(device)
    found = peers.cuda_peers("tree", device)
    if "flash-attn" in found:
        note_skipped("tree", "flash-attn", "no arbitrary attention mask (a token tree needs one)")
    runs = 30 if device.type == "cuda" else 5
    records = []
    for n, p, dtype in _cases(device, quick):
        name = str(dtype).replace("torch.", "")
        torch.manual_seed(0)
        kp = torch.randn(1, HKV, p, D, device=device, dtype=dtype)
        vp = torch.randn(1, HKV, p, D, device=device, dtype=dtype)
        q = torch.randn(1, HQ, n, D, device=device, dtype=dtype)
        kt = torch.randn(1, HKV, n, D, device=device, dtype=dtype)
        vt = torch.randn(1, HKV, n, D, device=device, dtype=dtype)
        parents = random_tree(n)
        par = torch.tensor(parents, device=device)
        lengths = torch.full((1,), p, dtype=torch.int64, device=device)
        scale = D ** -0.5

        def tree():  # the op itself: tree_attention's checks run once per tree, not per layer
            return torch.ops.effx.dense_attention(q, kt, vt, kp, vp, lengths, None, par, True, scale)

        def decode():
            return torch.ops.effx.dense_attention(q[:, :, :1], kt[:, :, :1], vt[:, :, :1], kp, vp, lengths, None, None,
                                                  True, scale)

        k_all, v_all = torch.cat([kp, kt], 2), torch.cat([vp, vt], 2)
        mask = dense_mask(parents, p, device, dtype)

        def sdpa():
            return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)

        shape = {"N": n, "P": p, "Hkv": HKV, "Hq": HQ, "D": D}
        candidates = peers.sdpa_candidates(q, k_all, v_all, mask)
        if "flashinfer" in found:
            candidates["flashinfer"] = lambda: peers.flashinfer_tree(found["flashinfer"], q, k_all, v_all, mask == 0)
        usable = peers.usable("tree", candidates, sdpa(), shape)

        t_peers = median_times({"effx tree": tree, "effx decode": decode, "sdpa dense mask": sdpa, **usable}, device,
                               runs=runs)
        t_tree, t_decode = t_peers.pop("effx tree"), t_peers.pop("effx decode")
        t_sdpa = t_peers.pop("sdpa dense mask")
        nbytes = 2 * kp.nbytes + q.nbytes * 2 + 2 * kt.nbytes
        flops = 4.0 * HQ * n * (p + n) * D
        for base, t_base in {"sdpa dense mask": t_sdpa, "1-token decode": t_decode, **t_peers}.items():
            records.append(Record("tree", "tree-attn", shape, name, roofs.device, t_tree, nbytes, flops, base,
                                  t_base, roofs))
    return records


def sequoia_seconds() -> float:
    p = [0.5, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.01]
    start = time.perf_counter()
    spec.sequoia_tree(p, 1024, 32)
    return time.perf_counter() - start


def decoding_records(device: torch.device, quick: bool) -> list[Record]:
    """Speculative decoding on a small random model (the demo's): time per generated token
    against plain decoding (the baseline), accepted tokens per step in the shape."""
    roofs = measure_roofs(device)
    vocab, steps = 2048, (24 if quick else 64)
    target = spec.TinyDecoder(vocab=vocab, dim=512, heads=8, kv_heads=4, layers=8, mix=0.25, seed=0, device=device)
    draft = spec.TinyDecoder(vocab=vocab, dim=512, heads=8, kv_heads=4, layers=8, mix=0.25, seed=0, device=device)
    draft.layers_used = 1
    prompt = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(0)).to(device)
    cap = 64 + steps + 96

    def run(tree):
        return spec.generate(target, draft if tree else None, prompt, steps, target_cache=target.make_cache(1, cap),
                             draft_cache=draft.make_cache(1, cap), tree=tree)

    run(None)
    plain = run(None)
    accept = spec.measure_acceptance(target, draft, prompt, lambda b: target.make_cache(b, 64), 4, greedy=True)
    records = []
    for label, tree in (("chain4", [-1, 0, 1, 2]), ("sequoia16", spec.sequoia_tree(accept, 16, 6))):
        res = run(tree)
        per_token, base = res.seconds / steps, plain.seconds / steps
        shape = {"tree": label, "accepted/step": round(res.mean_accepted, 2), "same": res.tokens == plain.tokens}
        records.append(Record("tree", "spec-decode", shape, "float32", roofs.device, per_token, 0.0, 0.0,
                              "plain decode", base, roofs))
    return records


def run(device: torch.device, quick: bool = False) -> list[Record]:
    records = attention_records(device, quick) + decoding_records(device, quick)
    roofs = measure_roofs(device)
    t = sequoia_seconds()
    records.append(Record("tree", "sequoia-dp", {"nodes": 1024, "depth": 32, "k": 8}, "float64", roofs.device, t, 0.0,
                          0.0, "none", t, roofs))
    return records
