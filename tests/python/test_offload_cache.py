"""effx.offload.OffloadedCache: KV-cache layers on device, host and disk tiers.

The offloaded cache runs the same fused attention as DenseCache over the same tokens, so
every step must give bit-identical outputs to a DenseCache fed the same inputs (DenseCache
itself is checked against the float64 reference in test_kv.py)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from common import ALL_DEVICES, DTYPES
from effx import kv
from effx.offload import OffloadedCache, Policy, StoreError

L, B, H, HQ, D = 4, 2, 2, 4, 32


def pair(policy, *, dtype=torch.float32, device="cpu", chunk=16, capacity=300, **kw):
    return (OffloadedCache(L, B, H, D, capacity, policy=policy, dtype=dtype, device=device, chunk_tokens=chunk, **kw),
            kv.DenseCache(L, B, H, D, capacity, dtype=dtype, device=device))


def step(caches, tn, *, dtype=torch.float32, device="cpu", lengths=None, parents=None):
    q = torch.randn(B, HQ, tn, D).to(dtype=dtype, device=device)
    k = torch.randn(B, H, tn, D).to(dtype=dtype, device=device)
    v = torch.randn(B, H, tn, D).to(dtype=dtype, device=device)
    for layer in range(L):
        got, want = (c.attend(layer, q, k, v, lengths=lengths, parents=parents) for c in caches)
        assert torch.equal(got, want), f"layer {layer}: offloaded attention differs from DenseCache"


POLICIES = {
    "device": Policy(cache_gpu=100, cache_cpu=0),
    "host": Policy(cache_gpu=0, cache_cpu=100),
    "disk": Policy(cache_gpu=0, cache_cpu=0),
    "mixed": Policy(cache_gpu=25, cache_cpu=25),
}


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", list(POLICIES))
def test_matches_dense_cache_through_every_operation(device, dtype, where):
    torch.manual_seed(0)
    off, dense = caches = pair(POLICIES[where], dtype=dtype, device=device)
    with off:
        kw = dict(dtype=dtype, device=device)
        step(caches, 37, lengths=[37, 20], **kw)  # ragged prefill over several chunks
        for _ in range(30):  # decode across chunk boundaries
            step(caches, 1, **kw)
        step(caches, 5, parents=[-1, 0, 0, 1, 2], **kw)
        for c in caches:
            c.commit_tree([[0, 1, 3], [2]])
        step(caches, 1, **kw)
        for c in caches:
            c.crop(40)  # back into a chunk that was on disk
        step(caches, 3, **kw)
        for c in caches:
            c.select_rows([1, 1])  # beam reorder with a repeated row: its sealed chunks are shared
        for _ in range(20):
            step(caches, 1, **kw)
        assert off.lengths(0).tolist() == dense.lengths(0).tolist() == [63, 63]
        assert off.host_peak <= off.host_budget


def test_placement_follows_percentages_and_bytes_add_up():
    off = OffloadedCache(10, 1, 2, 16, 64, policy=Policy(cache_gpu=30, cache_cpu=50), dtype=torch.float32,
                         chunk_tokens=8)
    with off:
        assert [off.tier_of(j) for j in range(10)] == ["device"] * 3 + ["host"] * 5 + ["disk"] * 2
        layer = 2 * 2 * 64 * 16 * 4
        for j in range(10):
            x = torch.randn(1, 2, 20, 16)
            off.extend(j, x, x)
        tiers = off.tier_bytes()
        row_chunk = 2 * 2 * 8 * 16 * 4
        assert tiers["device"] == 3 * layer and tiers["disk"] == 2 * 2 * row_chunk  # 2 full chunks per disk layer
        assert tiers["host"] == 5 * layer + 2 * row_chunk  # plus one open chunk per disk layer
        assert off.nbytes() == sum(tiers.values())
        blobs = [f for f in os.listdir(off.disk_dir) if not f.startswith(".")]
        assert len(blobs) == 4


def test_host_budget_is_exact_and_checked():
    policy = Policy(cache_gpu=0, cache_cpu=50)
    off = OffloadedCache(L, B, H, D, 128, policy=policy, dtype=torch.float32, chunk_tokens=16)
    with off:
        need = off.host_budget
        for _ in range(3):
            x = torch.randn(B, H, 40, D)
            for j in range(L):
                off.attend(j, torch.randn(B, HQ, 40, D), x, x)
        assert off.host_peak <= need
    with pytest.raises(ValueError, match=r"OffloadedCache: host_budget must be at least \d+ bytes"):
        OffloadedCache(L, B, H, D, 128, policy=policy, dtype=torch.float32, chunk_tokens=16, host_budget=need - 1)


def wait_for(cache, event, timeout=10.0):
    end = time.monotonic() + timeout
    while event not in cache.events():
        assert time.monotonic() < end, f"{event} did not happen"
        time.sleep(0.001)


def test_next_layer_is_fetched_while_this_layer_computes():
    torch.manual_seed(1)
    off = OffloadedCache(3, 1, H, D, 256, policy=Policy(cache_gpu=0, cache_cpu=0), dtype=torch.float32,
                         chunk_tokens=16)
    with off:
        x = torch.randn(1, H, 100, D)
        for j in range(3):
            off.extend(j, x, x)
        off.clear_events()
        q, k = torch.randn(1, HQ, 1, D), torch.randn(1, H, 1, D)
        off.attend(0, q, k, k)
        # Layer 0's attention started the fetch of layer 1, which completes while the caller
        # computes the rest of layer 0 (here: waits); layer 1 then attends without fetching.
        wait_for(off, ("fetch_end", 1))
        off.attend(1, q, k, k)
        events = off.events()
        begin = events.index(("attend_begin", 1))
        assert events.index(("fetch_begin", 1)) > events.index(("attend_begin", 0))
        assert events.index(("fetch_end", 1)) < begin and ("fetch_begin", 1) not in events[begin:]
        wait_for(off, ("fetch_begin", 2))  # and layer 1 started layer 2's
        assert off.events().index(("fetch_begin", 2)) > begin


def test_corrupted_chunk_raises_store_error_naming_it():
    off = OffloadedCache(2, 1, H, D, 64, policy=Policy(cache_gpu=0, cache_cpu=0), dtype=torch.float32,
                         chunk_tokens=8)
    with off:
        x = torch.randn(1, H, 20, D)
        off.extend(0, x, x)
        name = off._rows[0][0].sealed[1]
        path = off._disk.path_of(name)
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            f.write(b"\xff" * 16)
        with pytest.raises(StoreError, match=name.replace(".", r"\.")):
            off.attend(0, torch.randn(1, HQ, 1, D), x[:, :, :1], x[:, :, :1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="OffloadedCache: policy must be an effx.offload.Policy"):
        OffloadedCache(1, 1, 1, 8, 8, policy={"cache_gpu": 100})
    with pytest.raises(ValueError, match="OffloadedCache: chunk_tokens must be a positive int, got 0"):
        OffloadedCache(1, 1, 1, 8, 8, policy=Policy(), chunk_tokens=0)
    with pytest.raises(ValueError, match="cache percentages|cache_gpu|percent"):
        Policy(cache_gpu=80, cache_cpu=40)
    off = OffloadedCache(1, 2, 1, 8, 8, policy=Policy(cache_gpu=0, cache_cpu=0), dtype=torch.float32)
    with off:
        with pytest.raises(ValueError, match="OffloadedCache.select_rows: the batch size of an offloaded cache is fixed"):
            off.select_rows([0])
        with pytest.raises(ValueError, match="capacity exceeded"):
            x = torch.randn(2, 1, 9, 8)
            off.extend(0, x, x)


def test_model_runner_generates_the_same_tokens_with_the_kv_cache_offloaded():
    from effx import models

    model = models.random_model(num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256)
    prompts = [list(range(5, 45)), list(range(7, 30))]  # ragged
    dense = models.generate(model, prompts, max_new_tokens=12)
    off = models.generate(model, prompts, max_new_tokens=12, cache="offload",
                          cache_options=dict(cache_gpu=0, cache_cpu=50))
    assert off.tokens == dense.tokens
    assert [off.cache.tier_of(j) for j in range(4)] == ["host", "host", "disk", "disk"]
    off.cache.close()
