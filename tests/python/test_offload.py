"""effx.offload: the FlexGen-style runtime on this CPU (placement, host budget, disk blobs with
checksums, prefetch overlap by event order, compression, the policy LP against brute force)."""

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from effx import offload
from effx.offload import DiskStore, OffloadEngine, Policy, StoreError

HIDDEN, INTER, HEADS, KV_HEADS = 128, 320, 4, 2


def llama_layer(seed: int, dtype=torch.float32) -> dict:
    """The weights of one Llama decoder layer, in the order a checkpoint lists them."""
    g = torch.Generator().manual_seed(seed)
    kv = KV_HEADS * HIDDEN // HEADS
    shapes = {
        "input_layernorm.weight": (HIDDEN,),
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.k_proj.weight": (kv, HIDDEN),
        "self_attn.v_proj.weight": (kv, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "post_attention_layernorm.weight": (HIDDEN,),
        "mlp.gate_proj.weight": (INTER, HIDDEN),
        "mlp.up_proj.weight": (INTER, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTER),
    }
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}


def expected_tiers(layer: dict, gpu: float, cpu: float) -> dict:
    """SPECS.md section 7: whole tensors by cumulative size; the midpoint picks the tier."""
    total = sum(t.nbytes for t in layer.values())
    out, cum = {}, 0
    for name, t in layer.items():
        mid = (cum + t.nbytes / 2) / total
        cum += t.nbytes
        out[name] = "device" if mid < gpu / 100 else "host" if mid < (gpu + cpu) / 100 else "disk"
    return out


@pytest.mark.parametrize("gpu,cpu", [(100, 0), (0, 100), (0, 0), (20, 30), (50, 25), (10, 80)])
def test_placement_follows_percentages(tmp_path, gpu, cpu):
    layers = [llama_layer(j) for j in range(2)]
    with OffloadEngine(layers, Policy(weights_gpu=gpu, weights_cpu=cpu), disk_dir=tmp_path) as eng:
        want = expected_tiers(layers[0], gpu, cpu)
        for j in range(2):
            assert {n: eng.tier_of(j, n) for n in layers[j]} == want
        by_tier = eng.tier_bytes()
        for tier in ("device", "host", "disk"):
            assert by_tier[tier] == 2 * sum(layers[0][n].nbytes for n, t in want.items() if t == tier)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_bit_exact_through_all_tiers(tmp_path, dtype):
    layers = [llama_layer(j, dtype) for j in range(4)]
    with OffloadEngine(layers, Policy(weights_gpu=20, weights_cpu=30), disk_dir=tmp_path) as eng:
        assert {eng.tier_of(0, n) for n in layers[0]} == {"device", "host", "disk"}
        for _ in range(2):  # the second pass starts from the wrap-around prefetch of layer 0
            for j in range(4):
                got = eng.load_layer(j)
                assert got.keys() == layers[j].keys()
                for n, t in layers[j].items():
                    assert got[n].dtype == dtype and got[n].shape == t.shape
                    assert torch.equal(got[n].view(torch.uint8), t.view(torch.uint8)), (j, n)


def test_host_budget_never_exceeded_under_prefetch(tmp_path):
    layers = [llama_layer(j) for j in range(6)]
    eng = OffloadEngine(layers, Policy(weights_gpu=0, weights_cpu=40), disk_dir=tmp_path)
    budget = eng.host_budget
    for _ in range(3):
        for j in range(6):
            w = eng.load_layer(j)  # the previous layer is released by the rebinding
            assert eng.host_used <= budget
            assert w["mlp.down_proj.weight"].shape == (HIDDEN, INTER)
    assert eng.host_peak <= budget
    # The default budget is what the policy needs, and it was used to the full.
    assert eng.host_peak == budget
    eng.close()


def test_budget_too_small_for_one_layer_is_rejected(tmp_path):
    layers = [llama_layer(j) for j in range(2)]
    probe = OffloadEngine(layers, Policy(weights_gpu=0, weights_cpu=0), disk_dir=tmp_path / "a")
    need = probe.host_budget
    probe.close()
    with pytest.raises(ValueError, match=r"host_budget must be at least \d+ bytes .* got 4096"):
        OffloadEngine(layers, Policy(weights_gpu=0, weights_cpu=0), disk_dir=tmp_path / "b", host_budget=4096)
    with pytest.raises(ValueError, match=f"at least {need} bytes"):
        OffloadEngine(layers, Policy(weights_gpu=0, weights_cpu=0), disk_dir=tmp_path / "c", host_budget=need - 1)


def test_holding_too_many_layers_fails_clearly_not_hangs(tmp_path):
    layers = [llama_layer(j) for j in range(4)]
    with OffloadEngine(layers, Policy(weights_gpu=0, weights_cpu=0), disk_dir=tmp_path) as eng:
        held = [eng.load_layer(0), eng.load_layer(1)]
        with pytest.raises(RuntimeError, match="host budget exhausted: layer 2"):
            eng.load_layer(2)
        assert eng.host_used <= eng.host_budget
        del held
        assert torch.equal(eng.load_layer(3)["mlp.up_proj.weight"], layers[3]["mlp.up_proj.weight"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(weights_gpu=60, weights_cpu=50), r"weights device \+ host percent must be at most 100"),
    (dict(cache_gpu=-1), "cache device percent must be a number in"),
    (dict(act_cpu=float("nan")), "act host percent must be a number in"),
    (dict(weights_cpu=101, weights_gpu=0), "must be at most 100"),
    (dict(gpu_batch_size=0), "gpu_batch_size must be an integer >= 1, got 0"),
    (dict(num_gpu_batches=2.5), "num_gpu_batches must be an integer >= 1, got 2.5"),
])
def test_bad_policies_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Policy(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int64])
@pytest.mark.parametrize("shape", [(0,), (1,), (3, 5, 7), (4096,), (1025, 2049)])
def test_disk_store_round_trip_bit_exact(tmp_path, dtype, shape):
    store = DiskStore(tmp_path)
    x = (torch.randn(shape) * 100).to(dtype)
    store.write("x", x)
    y = store.read("x")
    assert y.dtype == dtype and y.shape == x.shape and torch.equal(y, x)


def test_disk_store_non_contiguous_and_async_sizes(tmp_path):
    store = DiskStore(tmp_path, io_threads=3)
    x = torch.randn(3000, 1500)[:, ::3]  # non-contiguous: written as its contiguous copy
    big = torch.randn(5 << 20)  # 20 MiB: three chunks read in parallel
    store.write("strided", x)
    store.write("big", big)
    assert torch.equal(store.read("strided"), x) and torch.equal(store.read("big"), big)


def _damage(path, how):
    if how == "truncated":
        os.truncate(path, os.path.getsize(path) - 5000)
    elif how == "corrupted":
        with open(path, "r+b") as f:
            f.seek(4096 + 1234)
            b = f.read(1)
            f.seek(4096 + 1234)
            f.write(bytes([b[0] ^ 1]))
    elif how == "corrupted header":
        with open(path, "r+b") as f:
            f.seek(20)
            f.write(b"\x7f")
    else:
        os.remove(path)


@pytest.mark.parametrize("how", ["truncated", "corrupted", "corrupted header", "missing"])
def test_damaged_blob_raises_store_error_and_nothing_else_is_lost(tmp_path, how):
    store = DiskStore(tmp_path)
    a, b = torch.randn(10000), torch.randn(10000)
    store.write("a.weight", a)
    store.write("b.weight", b)
    _damage(store.path_of("a.weight"), how)
    word = how.split()[0]
    with pytest.raises(StoreError, match=f"blob 'a.weight' is {word}"):
        store.read("a.weight")
    assert issubclass(StoreError, RuntimeError)
    assert torch.equal(store.read("b.weight"), b)


def test_full_disk_raises_clear_error(tmp_path):
    # A file-size limit makes write(2) fail exactly as a full filesystem does (EFBIG/ENOSPC).
    code = textwrap.dedent(f"""
        import resource, signal, torch
        from effx.offload import DiskStore, StoreError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        store = DiskStore({str(tmp_path)!r})
        small = torch.arange(1000, dtype=torch.float32)
        store.write("small", small)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
        try:
            store.write("large", torch.zeros(1 << 20))
        except StoreError as e:
            print("ERROR:", e)
        assert "large" not in store, "partial blob left behind"
        assert torch.equal(store.read("small"), small)
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERROR: effx.offload: cannot write blob 'large' (4194304 bytes)" in out.stdout
    assert "File too large" in out.stdout and out.stdout.strip().endswith("OK")
    assert sorted(os.listdir(tmp_path)) == ["small.blob"]


def test_engine_reports_bad_blob_by_name(tmp_path):
    layers = [llama_layer(j) for j in range(3)]
    with OffloadEngine(layers, Policy(weights_gpu=0, weights_cpu=0), disk_dir=tmp_path) as eng:
        _damage(os.path.join(tmp_path, "layer1.mlp.up_proj.weight.blob"), "corrupted")
        eng.load_layer(0)  # starts the prefetch of layer 1, which fails on the I/O thread
        with pytest.raises(StoreError, match="blob 'layer1.mlp.up_proj.weight' is corrupted"):
            eng.load_layer(1)
        assert torch.equal(eng.load_layer(2)["mlp.up_proj.weight"], layers[2]["mlp.up_proj.weight"])


def test_prefetch_overlaps_compute_by_event_order(tmp_path):
    layers = [llama_layer(j) for j in range(5)]
    with OffloadEngine(layers, Policy(weights_gpu=0, weights_cpu=30), disk_dir=tmp_path) as eng:
        eng.clear_events()
        for j in range(5):
            w = eng.load_layer(j)
            eng.record("compute_begin", j)
            # Layer j's compute cannot end before layer j+1 has loaded: this completes only if the
            # load runs concurrently (a serial engine would load j+1 inside load_layer(j+1)).
            assert eng.wait_event("load_end", (j + 1) % 5, timeout=60), f"no overlap at layer {j}"
            x = torch.randn(2, HIDDEN) @ w["self_attn.q_proj.weight"].T
            eng.record("compute_end", j)
            assert x.shape == (2, HIDDEN)
        ev = eng.events()
        seq = {(kind, layer): s for s, kind, layer in ev}
        first = {}
        for s, kind, layer in ev:
            first.setdefault((kind, layer), s)
        for j in range(4):
            assert first[("compute_begin", j)] < seq[("load_end", j + 1)] < first[("compute_end", j)]
            assert first[("load_begin", j + 1)] < first[("compute_end", j)]


def test_compression_groups_of_64_and_engine(tmp_path):
    w = torch.randn(256, 96)
    c = offload.compress(w, 0)
    assert c.codes.shape == (96, 256 // 8) and c.scale.shape == (96, 256 // 64)
    back = offload.decompress(c)
    # Every value within half a quantization step of its group (groups along dim 0).
    step = c.scale.float().T.repeat_interleave(64, 0)
    assert back.shape == w.shape and bool(((back - w).abs() <= step / 2 + 1e-6).all())
    with pytest.raises(ValueError, match="multiple of 64, got 96"):
        offload.compress(w, 1)
    kv = torch.randn(2, 4, 10, 128, dtype=torch.float16)
    assert offload.decompress(offload.compress(kv, -1)).shape == kv.shape

    layers = [llama_layer(j) for j in range(3)]
    plain = OffloadEngine(layers, Policy(weights_gpu=0, weights_cpu=50), disk_dir=tmp_path / "p")
    small = OffloadEngine(layers, Policy(weights_gpu=0, weights_cpu=50, compress_weights=True), disk_dir=tmp_path / "c")
    ratio = sum(small.tier_bytes().values()) / sum(plain.tier_bytes().values())
    assert ratio < 0.2  # fp32 -> 4-bit codes plus fp32 scale/zero per 64 values
    for j in range(3):
        got = small.load_layer(j)
        for n, t in layers[j].items():
            err = ((got[n] - t).norm() / t.norm()).item()
            assert got[n].shape == t.shape and err < (0.12 if t.dim() == 2 else 1e-7), (n, err)
    plain.close()
    small.close()


def test_block_schedule():
    steps = offload.block_schedule(3, 2)
    assert [(s["layer"], s["batch"]) for s in steps] == [(j, k) for j in range(3) for k in range(2)]
    assert [s["load_weight_layer"] for s in steps] == [1, -1, 2, -1, 0, -1]
    assert (steps[1]["load_cache_layer"], steps[1]["load_cache_batch"]) == (1, 0)
    assert (steps[2]["store_cache_layer"], steps[2]["store_cache_batch"]) == (0, 1)
    with pytest.raises(ValueError, match="num_gpu_batches must be >= 1"):
        offload.block_schedule(3, 0)


# No generated tokens: the cost is the prefill's. With writes from the GPU very slow, the
# prompt's cache and the activations stay on the GPU, and the optimum sits on the grid.
SPEC = offload.ModelSpec(num_layers=4, hidden=256, intermediate=512, num_heads=4, num_kv_heads=4, prompt_len=16,
                         gen_len=0)


def _hardware_with_known_optimum(bs, nb):
    """GPU memory for 30% of the weights (plus cache and activations), CPU memory for 50%,
    disk for 20%; the disk read stream is then the bottleneck at 0.2 of the weights per layer
    (moving cache off the GPU to make room would cost far more in its writes)."""
    w = SPEC.layer_weight_bytes
    seqs = bs * nb
    cache_full = seqs * (SPEC.prompt_len + SPEC.gen_len) * SPEC.kv_bytes_per_token
    act = seqs * SPEC.hidden * SPEC.dtype_bytes
    L = SPEC.num_layers
    return offload.Hardware(
        gpu_mem=2 * w + cache_full + 2 * act + 0.3 * L * w + L * cache_full + L * act + 1,
        cpu_mem=2 * w + 0.5 * L * w + 1, disk_mem=0.2 * L * w + 1,
        h2d_gbps=10, d2h_gbps=1e-6, disk_read_gbps=1, disk_write_gbps=1e-6, matmul_tflops=1e6)


def _simplex(step):
    n = round(1 / step)
    return [(a * step, b * step, (n - a - b) * step) for a in range(n + 1) for b in range(n + 1 - a)]


def test_lp_matches_brute_force_on_a_grid():
    bs, nb = 2, 2
    hw = _hardware_with_known_optimum(bs, nb)
    policy, t_lp = offload.search_policy(SPEC, hw, batch_sizes=(bs,), num_gpu_batches=(nb,))
    assert (policy.gpu_batch_size, policy.num_gpu_batches) == (bs, nb)
    # The reported time is the cost model's time of the returned policy.
    assert offload.predict_time_per_token(policy, SPEC, hw) == pytest.approx(t_lp, rel=1e-6)
    best = float("inf")
    for w, c, h in itertools.product(_simplex(0.1), _simplex(0.25), _simplex(0.25)):
        p = Policy(weights_gpu=100 * w[0], weights_cpu=min(100 * w[1], 100 - 100 * w[0]),
                   cache_gpu=100 * c[0], cache_cpu=min(100 * c[1], 100 - 100 * c[0]),
                   act_gpu=100 * h[0], act_cpu=min(100 * h[1], 100 - 100 * h[0]), gpu_batch_size=bs, num_gpu_batches=nb)
        best = min(best, offload.predict_time_per_token(p, SPEC, hw))
    assert t_lp <= best * (1 + 1e-9)
    assert t_lp == pytest.approx(best, rel=1e-5)
    assert t_lp == pytest.approx(SPEC.num_layers * 0.2 * SPEC.layer_weight_bytes / 1e9 / (bs * nb), rel=1e-5)


def test_time_per_token_counts_the_prefill_and_every_decode_step():
    """Everything fits on the GPU, so compute alone sets the time: a causal prefill of P
    tokens (2 flops per weight per token, QK^T and PV over half a P x P matrix), then
    gen_len - 1 decode steps over the growing context, per generated token of the block."""
    hw = offload.Hardware(gpu_mem=1e15, cpu_mem=1e15, disk_mem=1e15, h2d_gbps=10, d2h_gbps=10, disk_read_gbps=1,
                          disk_write_gbps=1, matmul_tflops=1.0)
    spec = offload.ModelSpec(num_layers=6, hidden=512, intermediate=1408, num_heads=8, num_kv_heads=2,
                             prompt_len=384, gen_len=1)
    seqs, P, L, params, d = 4, spec.prompt_len, spec.num_layers, spec.layer_params, spec.hidden
    prefill = seqs * P * (2 * params + 2 * P * d) / 1e12
    _, t = offload.search_policy(spec, hw, batch_sizes=(seqs,), num_gpu_batches=(1,))
    assert t == pytest.approx(L * prefill / seqs, rel=1e-6)
    longer = dataclasses_replace(spec, gen_len=33)
    decode = seqs * (2 * params + 4 * (P + 33 / 2) * d) / 1e12
    _, t33 = offload.search_policy(longer, hw, batch_sizes=(seqs,), num_gpu_batches=(1,))
    assert t33 == pytest.approx(L * (prefill + 32 * decode) / (seqs * 33), rel=1e-6)


def test_search_policy_prefers_bigger_blocks_and_rejects_impossible_hardware():
    hw = offload.Hardware(gpu_mem=64e9, cpu_mem=200e9, disk_mem=1e12, h2d_gbps=25, d2h_gbps=25, disk_read_gbps=3,
                          disk_write_gbps=2, matmul_tflops=300)
    big = offload.ModelSpec(num_layers=80, hidden=8192, intermediate=28672, num_heads=64, num_kv_heads=8)
    policy, t = offload.search_policy(big, hw)
    assert 0 < t < float("inf")
    assert policy.weights_gpu < 100  # a 70B model in fp16 does not fit 64 GB
    assert policy.gpu_batch_size * policy.num_gpu_batches > 1  # weights amortized over a block
    tiny = dataclasses_replace(hw, gpu_mem=1e6, cpu_mem=1e6, disk_mem=1e6)
    with pytest.raises(ValueError, match="no placement fits"):
        offload.search_policy(big, tiny)


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_hardware_measure_positive(tmp_path):
    hw = offload.Hardware.measure("cpu", str(tmp_path), nbytes=16 << 20)
    for f in ("h2d_gbps", "d2h_gbps", "disk_read_gbps", "disk_write_gbps", "matmul_tflops", "disk_mem"):
        assert getattr(hw, f) > 0, f
    assert os.listdir(tmp_path) == []
