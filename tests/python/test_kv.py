"""KV caches (SPECS.md sections 2 and 8): DenseCache and KIVICache against float64 references
of the attention and of KIVI's exact residual rule, over prefill and hundreds of decode steps."""

from __future__ import annotations

import math

import pytest
import torch

import effx.kv as kv
from common import ALL_DEVICES, DTYPES, TOL, rel_error
from reference.attention import attention_ref
from reference.kivi import KiviRow
from reference.quant import quantize_like_effx

# KIVI quantizes what the kernels compute on, so its reference follows the same codes; the
# remaining difference is fp32 accumulation (and the output dtype).
KIVI_TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# (device, CPU instruction set): every ISA variant of the CPU engine, and CUDA once.
BACKENDS = [("cpu", "avx512"), ("cpu", "avx2"), ("cpu", "baseline"),
            pytest.param("cuda", "avx512", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="no CUDA device"))]


def randn(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype=dtype, device=device)


class Runner:
    """Drives a cache and its float64 reference through the same steps."""

    def __init__(self, cache, batch, kv_heads, q_heads, head_dim, dtype, device, kivi=None):
        self.cache, self.b, self.h, self.hq, self.d = cache, batch, kv_heads, q_heads, head_dim
        self.dtype, self.device = dtype, device
        if kivi:
            self.rows = [KiviRow(dtype=dtype, **kivi) for _ in range(batch)]
        else:
            self.rows = [DenseRow() for _ in range(batch)]

    def step(self, tn, lengths=None, layer=0, window=None):
        q = randn(self.b, self.hq, tn, self.d, dtype=self.dtype, device=self.device)
        k = randn(self.b, self.h, tn, self.d, dtype=self.dtype, device=self.device)
        v = randn(self.b, self.h, tn, self.d, dtype=self.dtype, device=self.device)
        out, lse = self.cache.attend(layer, q, k, v, lengths=lengths, window=window, return_lse=True)
        worst = 0.0
        for b, row in enumerate(self.rows):
            valid = tn if lengths is None else lengths[b]
            # Attention sees the cache as it was plus the new tokens in full precision;
            # quantization of this step's tokens happens after it (SPECS.md section 2).
            n = len(row)
            kk, vv = row.kv() if n else (torch.zeros(self.h, 0, self.d, dtype=torch.float64),) * 2
            kk = torch.cat([kk, k[b, :, :valid].cpu().double()], 1)
            vv = torch.cat([vv, v[b, :, :valid].cpu().double()], 1)
            ref, ref_lse = attention_ref(q[b, :, :valid].cpu(), kk, vv, n, self.cache.sm_scale, window=window or 0)
            row.append(k[b, :, :valid].cpu(), v[b, :, :valid].cpu())
            worst = max(worst, rel_error(out[b, :, :valid], ref))
            assert torch.allclose(lse[b, :, :valid].cpu().double(), ref_lse, atol=1e-3, rtol=1e-3)
            assert (out[b, :, valid:] == 0).all() and (lse[b, :, valid:] == float("-inf")).all()
        assert not torch.isnan(out).any()
        return worst


class DenseRow:
    def __init__(self):
        self.k, self.v = [], []

    def __len__(self):
        return len(self.k)

    def append(self, k, v):
        self.k += list(k.double().unbind(1))
        self.v += list(v.double().unbind(1))

    def kv(self):
        return torch.stack(self.k, 1), torch.stack(self.v, 1)


# --- DenseCache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads,q_heads,head_dim", [(2, 2, 64), (2, 8, 128), (1, 8, 40)])
def test_dense_prefill_and_decode(device, dtype, kv_heads, q_heads, head_dim):
    torch.manual_seed(1)
    cache = kv.DenseCache(2, 2, kv_heads, head_dim, 200, dtype=dtype, device=device)
    run = Runner(cache, 2, kv_heads, q_heads, head_dim, dtype, device)
    errs = [run.step(37)] + [run.step(1) for _ in range(20)] + [run.step(5)]
    assert max(errs) <= TOL[dtype]
    assert cache.seq_len(0) == 37 + 20 + 5 and cache.seq_len(1) == 0


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_dense_ragged_batch(device):
    torch.manual_seed(2)
    cache = kv.DenseCache(1, 3, 2, 64, 128, dtype=torch.float32, device=device)
    run = Runner(cache, 3, 2, 4, 64, torch.float32, device)
    errs = [run.step(20, lengths=[20, 7, 13])] + [run.step(1) for _ in range(5)]
    errs.append(run.step(4, lengths=[4, 0, 2]))
    assert max(errs) <= TOL[torch.float32]
    assert cache.lengths(0).tolist() == [29, 12, 20]


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_tree_attention_and_commit(device, dtype):
    torch.manual_seed(3)
    b, h, hq, d = 2, 2, 4, 64
    cache = kv.DenseCache(1, b, h, d, 64, dtype=dtype, device=device)
    run = Runner(cache, b, h, hq, d, dtype, device)
    run.step(10)
    parents = [-1, 0, 0, 1, 1, 2, -1]
    q = randn(b, hq, 7, d, dtype=dtype, device=device)
    k = randn(b, h, 7, d, dtype=dtype, device=device)
    v = randn(b, h, 7, d, dtype=dtype, device=device)
    out = cache.attend(0, q, k, v, parents=parents)
    for row in range(b):
        kk, vv = run.rows[row].kv()
        ref, _ = attention_ref(q[row].cpu(), torch.cat([kk, k[row].cpu().double()], 1),
                               torch.cat([vv, v[row].cpu().double()], 1), 10, cache.sm_scale, parents=parents)
        assert rel_error(out[row], ref) <= TOL[dtype]
    assert cache.seq_len() == 10  # tree tokens wait for the commit
    cache.commit_tree([[0, 1, 4], [6]])
    assert cache.lengths(0).tolist() == [13, 11]
    run.rows[0].append(k[0, :, [0, 1, 4]].cpu(), v[0, :, [0, 1, 4]].cpu())
    run.rows[1].append(k[1, :, [6]].cpu(), v[1, :, [6]].cpu())
    assert run.step(1) <= TOL[dtype]



@pytest.mark.parametrize("isa", ["amx", "avx512bf16", "avx512", "avx2", "baseline"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads,q_heads,head_dim", [(2, 8, 64), (1, 2, 40), (1, 3, 33)])
def test_dense_long_cache_every_cpu_isa(isa, dtype, kv_heads, q_heads, head_dim, monkeypatch):
    """Cached blocks read in place (several whole blocks, and blocks of 22 and 3 tokens), decode
    rows and many-row (block GEMM) prefill chunks and trees, head_dim not a multiple of the
    vector width (and odd), each CPU instruction set; bf16 with avx512bf16 on a CPU that has it
    runs the many-row products on bf16 pairs (bf16_gemm.h), except at the odd head_dim, and with
    amx on AMX tiles where the CPU has them (head_dim 40: 16 pairs on tiles, 4 on vectors)."""
    monkeypatch.setenv("EFFX_CPU_ISA", isa)
    torch.manual_seed(11)
    cache = kv.DenseCache(1, 2, kv_heads, head_dim, 400, dtype=dtype)
    run = Runner(cache, 2, kv_heads, q_heads, head_dim, dtype, "cpu")
    errs = [run.step(150, lengths=[150, 131])] + [run.step(1) for _ in range(3)] + [run.step(40)]
    parents = [-1, 0, 0, 1, 2, -1, 5] * 3
    parents = [p if p < 0 or i < 7 else p + 7 * (i // 7) for i, p in enumerate(parents)]
    q = randn(2, q_heads, len(parents), head_dim, dtype=dtype, device="cpu")
    k = randn(2, kv_heads, len(parents), head_dim, dtype=dtype, device="cpu")
    v = randn(2, kv_heads, len(parents), head_dim, dtype=dtype, device="cpu")
    out = cache.attend(0, q, k, v, parents=parents)
    for row in range(2):
        kk, vv = run.rows[row].kv()
        n = kk.shape[1]
        ref, _ = attention_ref(q[row], torch.cat([kk, k[row].double()], 1), torch.cat([vv, v[row].double()], 1),
                               n, cache.sm_scale, parents=parents)
        errs.append(rel_error(out[row], ref))
    assert max(errs) <= TOL[dtype]


def test_cpu_isa_cap_empty_is_none_and_unknown_is_an_error(monkeypatch):
    """EFFX_CPU_ISA= (empty) caps nothing, so the op gives bit for bit what it gives unset; a
    misspelt value is refused by name instead of quietly running on the baseline path."""
    torch.manual_seed(12)
    cache = kv.DenseCache(1, 1, 2, 64, 64, dtype=torch.float32)
    q, k, v = (randn(1, h, 20, 64, dtype=torch.float32, device="cpu") for h in (8, 2, 2))
    monkeypatch.delenv("EFFX_CPU_ISA", raising=False)
    unset = cache.attend(0, q, k, v)
    cache.crop(0)
    monkeypatch.setenv("EFFX_CPU_ISA", "")
    assert torch.equal(cache.attend(0, q, k, v), unset)
    cache.crop(0)
    monkeypatch.setenv("EFFX_CPU_ISA", "avx-2")
    with pytest.raises(ValueError, match=r"EFFX_CPU_ISA='avx-2'.*expected amx, avx512bf16, avx512, avx2 or baseline"):
        cache.attend(0, q, k, v)


@pytest.mark.parametrize("device,isa", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads,q_heads,head_dim", [(2, 8, 64), (1, 2, 40)])
def test_dense_sliding_window(device, isa, dtype, kv_heads, q_heads, head_dim, monkeypatch):
    """A window narrower than the prefill, then decoding past it in a ragged batch: whole cached
    blocks fall out of the window (skipped) and the rest is masked per query."""
    monkeypatch.setenv("EFFX_CPU_ISA", isa)
    torch.manual_seed(14)
    cache = kv.DenseCache(1, 2, kv_heads, head_dim, 400, dtype=dtype, device=device)
    run = Runner(cache, 2, kv_heads, q_heads, head_dim, dtype, device)
    worst = run.step(150, lengths=[150, 97], window=40)
    for tn, window in [(1, 40)] * 20 + [(5, 3)] + [(1, 300)] * 3 + [(1, 130)] * 20:
        worst = max(worst, run.step(tn, window=window))
    assert worst < TOL[dtype]


def test_dense_crop():
    torch.manual_seed(4)
    cache = kv.DenseCache(1, 1, 1, 32, 64, dtype=torch.float32)
    run = Runner(cache, 1, 1, 1, 32, torch.float32, "cpu")
    run.step(12)
    cache.crop(9)
    run.rows[0].k, run.rows[0].v = run.rows[0].k[:9], run.rows[0].v[:9]
    assert cache.seq_len() == 9 and run.step(2) <= 1e-5


# --- KIVI ---------------------------------------------------------------------------------------


def kivi_cache(batch, kv_heads, head_dim, capacity, *, bits, group_size, residual, dtype, device, layers=1):
    cache = kv.KIVICache(layers, batch, kv_heads, head_dim, capacity, bits=bits, group_size=group_size,
                         residual=residual, dtype=dtype, device=device)
    return cache, dict(bits=bits, group_size=group_size, residual=residual)


@pytest.mark.parametrize("device,isa", BACKENDS)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kivi_sliding_window(device, isa, bits, dtype, monkeypatch):
    """KIVI keeps every token at its position, so a window applies over codes, residual and new
    tokens alike: a prefill past the window, then decoding (on the codes) past it."""
    monkeypatch.setenv("EFFX_CPU_ISA", isa)
    torch.manual_seed(15)
    cache, opts = kivi_cache(2, 2, 64, 1100, bits=bits, group_size=32, residual=64, dtype=dtype, device=device)
    run = Runner(cache, 2, 2, 8, 64, dtype, device, kivi=opts)
    worst = run.step(300, lengths=[300, 211], window=100)
    for tn, window in [(1, 100)] * 30 + [(3, 2)] + [(1, 700)] * 3:
        worst = max(worst, run.step(tn, window=window))
    assert worst < KIVI_TOL[dtype]


@pytest.mark.parametrize("device,isa", [("cpu", "amx"), ("cpu", "avx512bf16")] + BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("policy", ["dense", "kivi2"])
def test_tree_sliding_window(device, isa, dtype, policy, monkeypatch):
    """A token tree past the window: a node at depth d sits at position n + d, so it sees the
    cached tokens after n + d - window (the nodes of one tree are no farther apart than the
    window); trees of 21 nodes (GEMM-sized units on the CPU) under windows of 100 and of 21,
    where depth and index would disagree, each committed and followed by a windowed decode."""
    monkeypatch.setenv("EFFX_CPU_ISA", isa)
    torch.manual_seed(16)
    b, h, hq, d = 2, 2, 8, 64
    if policy == "dense":
        cache, opts, tol = kv.DenseCache(1, b, h, d, 600, dtype=dtype, device=device), None, TOL[dtype]
    else:
        cache, opts = kivi_cache(b, h, d, 600, bits=2, group_size=32, residual=64, dtype=dtype, device=device)
        tol = KIVI_TOL[dtype]
    run = Runner(cache, b, h, hq, d, dtype, device, kivi=opts)
    worst = run.step(300, lengths=[300, 211], window=100)
    parents = [-1, 0, 0, 1, 2, -1, 5] * 3
    parents = [p if p < 0 or i < 7 else p + 7 * (i // 7) for i, p in enumerate(parents)]
    parents[7], parents[14] = 4, 10  # depths up to 6
    tn = len(parents)
    for window, paths in ((100, [[0, 1, 3], [5, 6]]), (21, [[0, 2, 4, 7, 8], []])):
        q = randn(b, hq, tn, d, dtype=dtype, device=device)
        k = randn(b, h, tn, d, dtype=dtype, device=device)
        v = randn(b, h, tn, d, dtype=dtype, device=device)
        out = cache.attend(0, q, k, v, parents=parents, window=window)
        for row in range(b):
            kk, vv = run.rows[row].kv()
            ref, _ = attention_ref(q[row].cpu(), torch.cat([kk, k[row].cpu().double()], 1),
                                   torch.cat([vv, v[row].cpu().double()], 1), kk.shape[1], cache.sm_scale,
                                   parents=parents, window=window)
            worst = max(worst, rel_error(out[row], ref))
        cache.commit_tree(paths)
        for row, path in enumerate(paths):
            if path:
                run.rows[row].append(k[row, :, path].cpu(), v[row, :, path].cpu())
        worst = max(worst, run.step(1, window=window))
    assert worst < tol
    with pytest.raises(ValueError, match=r"attend: a token tree with a sliding window must have at most window "
                                         r"\(20\) tokens, got 21"):
        cache.attend(0, q, k, v, parents=parents, window=20)


def check_state(cache, run, layer=0):
    state = cache.quantized_lengths(layer)
    for b, row in enumerate(run.rows):
        assert state[b].tolist() == [len(row), row.kq, row.vq]
        n = len(row)
        assert row.kq == n - n % cache.residual and row.vq == max(0, n - cache.residual)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_residual_rule_over_hundreds_of_steps(device, bits):
    torch.manual_seed(5)
    cache, opts = kivi_cache(2, 2, 64, 512, bits=bits, group_size=16, residual=32, dtype=torch.float32,
                             device=device)
    run = Runner(cache, 2, 2, 4, 64, torch.float32, device, kivi=opts)
    worst = run.step(77)  # not a multiple of R (32) or G (16)
    check_state(cache, run)
    assert run.rows[0].kq == 64 and run.rows[0].vq == 45
    for step in range(300):
        worst = max(worst, run.step(1))
        if step % 7 == 0:
            check_state(cache, run)
    check_state(cache, run)
    assert worst <= KIVI_TOL[torch.float32]


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads,q_heads,head_dim", [(2, 2, 64), (2, 8, 128), (1, 8, 64)])
def test_kivi_gqa_dtypes_head_dims(device, dtype, kv_heads, q_heads, head_dim):
    torch.manual_seed(6)
    cache, opts = kivi_cache(2, kv_heads, head_dim, 256, bits=2, group_size=32, residual=64, dtype=dtype,
                             device=device)
    run = Runner(cache, 2, kv_heads, q_heads, head_dim, dtype, device, kivi=opts)
    errs = [run.step(100)] + [run.step(1) for _ in range(40)] + [run.step(3)]
    check_state(cache, run)
    assert max(errs) <= KIVI_TOL[dtype]


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("bits,group_size", [(2, 16), (4, 32), (4, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kivi_decode_on_codes_every_cpu_isa(isa, bits, group_size, dtype, monkeypatch):
    """Decode computes on the codes (scales and minima folded); every code width per vector,
    ragged rows, GQA 4, the value residual wrapping around its ring."""
    monkeypatch.setenv("EFFX_CPU_ISA", isa)
    torch.manual_seed(12)
    cache, opts = kivi_cache(2, 2, 64, 400, bits=bits, group_size=group_size, residual=32, dtype=dtype, device="cpu")
    run = Runner(cache, 2, 2, 8, 64, dtype, "cpu", kivi=opts)
    errs = [run.step(150, lengths=[150, 109])] + [run.step(1) for _ in range(45)]
    check_state(cache, run)
    assert max(errs) <= KIVI_TOL[dtype]


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_kivi_ragged_batch(device):
    torch.manual_seed(7)
    cache, opts = kivi_cache(3, 2, 64, 256, bits=2, group_size=16, residual=32, dtype=torch.float32,
                             device=device)
    run = Runner(cache, 3, 2, 4, 64, torch.float32, device, kivi=opts)
    errs = [run.step(70, lengths=[70, 33, 5])] + [run.step(1) for _ in range(50)]
    errs.append(run.step(6, lengths=[6, 0, 3]))
    check_state(cache, run)
    assert max(errs) <= KIVI_TOL[torch.float32]


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_kivi_constant_groups_are_exact(device):
    cache, _ = kivi_cache(1, 1, 32, 64, bits=2, group_size=16, residual=16, dtype=torch.float32, device=device)
    k = torch.full((1, 1, 40, 32), 0.75, device=device)
    v = torch.full((1, 1, 40, 32), -1.5, device=device)
    q = torch.randn(1, 1, 40, 32, device=device)
    cache.attend(0, q, k, v)
    out = cache.attend(0, q[:, :, :1], k[:, :, :1], v[:, :, :1])
    assert torch.equal(out, torch.full_like(out, -1.5))  # every value exact, keys too


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_kivi_4bit_error_below_2bit(device):
    torch.manual_seed(8)
    errs = {}
    q = torch.randn(1, 4, 1, 128, device=device)
    k = torch.randn(1, 2, 600, 128, device=device)
    v = torch.randn(1, 2, 600, 128, device=device)
    for bits in (2, 4):
        cache, _ = kivi_cache(1, 2, 128, 640, bits=bits, group_size=32, residual=128, dtype=torch.float32,
                              device=device)
        cache.attend(0, torch.randn(1, 4, 599, 128, device=device), k[:, :, :599], v[:, :, :599])
        out = cache.attend(0, q, k[:, :, 599:], v[:, :, 599:])
        ref, _ = attention_ref(q[0].cpu(), k[0].cpu().double(), v[0].cpu().double(), 599, 1 / math.sqrt(128))
        errs[bits] = rel_error(out[0], ref)
    assert 0 < errs[4] < errs[2] / 2, errs


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_kivi_tree_commit_and_crop(device):
    torch.manual_seed(9)
    cache, opts = kivi_cache(1, 2, 64, 256, bits=2, group_size=16, residual=32, dtype=torch.float32,
                             device=device)
    run = Runner(cache, 1, 2, 4, 64, torch.float32, device, kivi=opts)
    run.step(50)
    parents = [-1, 0, 1, 0]
    q = torch.randn(1, 4, 4, 64, device=device)
    k = torch.randn(1, 2, 4, 64, device=device)
    v = torch.randn(1, 2, 4, 64, device=device)
    out = cache.attend(0, q, k, v, parents=parents)
    kk, vv = run.rows[0].kv()
    ref, _ = attention_ref(q[0].cpu(), torch.cat([kk, k[0].cpu().double()], 1),
                           torch.cat([vv, v[0].cpu().double()], 1), 50, cache.sm_scale, parents=parents)
    assert rel_error(out[0], ref) <= KIVI_TOL[torch.float32]
    cache.commit_tree([0, 1, 2])
    run.rows[0].append(k[0, :, :3].cpu(), v[0, :, :3].cpu())
    check_state(cache, run)
    assert run.step(1) <= KIVI_TOL[torch.float32]
    # 54 tokens: keys [0, 32) and values [0, 22) quantized, so crop can go back to 32 but not 31
    with pytest.raises(ValueError, match=r"effx\.kv\.KIVICache\.crop: cannot crop row 0 of layer 0 to 31 tokens"):
        cache.crop(31)
    cache.crop(40)
    row = run.rows[0]
    row.keys, row.values = row.keys[:40], row.values[:40]
    assert cache.seq_len() == 40 and run.step(1) <= KIVI_TOL[torch.float32]


def test_kivi_quantize_helpers_match_reference():
    torch.manual_seed(10)
    k = torch.randn(2, 3, 64, 48)
    v = torch.randn(2, 3, 64, 48)
    qk = kv.kivi_quantize_keys(k, 2, 32)
    assert qk.codes.shape == (2, 3, 48, 4) and qk.scale.shape == (2, 3, 48, 2)
    back = kv.kivi_dequantize_keys(qk)
    assert back.shape == k.shape
    assert rel_error(back, quantize_like_effx(k.transpose(2, 3), 2, 32).transpose(2, 3)) <= 1e-6
    qv = kv.kivi_quantize_values(v, 4, 16)
    assert qv.codes.shape == (2, 3, 64, 6) and qv.scale.shape == (2, 3, 64, 3)
    assert rel_error(kv.kivi_dequantize_values(qv), quantize_like_effx(v, 4, 16)) <= 1e-6


def test_kivi_nbytes_against_fp16():
    cache = kv.KIVICache(1, 1, 1, 128, 16384, bits=2, group_size=32, residual=128, dtype=torch.float16)
    dense = kv.DenseCache(1, 1, 1, 128, 16384, dtype=torch.float16)
    assert dense.nbytes() == 2 * 16384 * 128 * 2
    assert cache.nbytes() <= 0.2 * dense.nbytes()
    # 96 bytes per token and kv-head at D = 128, G = 32 (SPECS.md), plus the two residuals
    assert cache.nbytes() == 16384 * 96 + 2 * 128 * 128 * 2 + 3 * 8


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    torch.manual_seed(11)
    cache = kv.KIVICache(1, 2, 2, 64, 128, bits=2, group_size=16, residual=32, dtype=dtype)
    cache.attend(0, torch.randn(2, 4, 40, 64).to(dtype), torch.randn(2, 2, 40, 64).to(dtype),
                 torch.randn(2, 2, 40, 64).to(dtype))
    s = cache._layers[0]
    storage = [s[n] for n in kv.KIVICache._STORAGE]
    q = torch.randn(2, 4, 3, 64).to(dtype)
    k = torch.randn(2, 2, 3, 64).to(dtype)
    v = torch.randn(2, 2, 3, 64).to(dtype)
    torch.library.opcheck(torch.ops.effx.kivi_attention.default,
                          (q, k, v, *storage, None, torch.tensor([-1, 0, 0]), 2, 16, True, 0.125))
    torch.library.opcheck(torch.ops.effx.kivi_attention.default,
                          (q, k, v, *storage, None, None, 2, 16, True, 0.125, 7))
    torch.library.opcheck(torch.ops.effx.kivi_append_.default, (k, v, *storage, torch.tensor([3, 1]), 2, 16))
    dense = kv.DenseCache(1, 2, 2, 64, 16, dtype=dtype)
    torch.library.opcheck(torch.ops.effx.dense_attention.default,
                          (q, k, v, dense.k[0], dense.v[0], torch.tensor([0, 5]), torch.tensor([3, 2]), None,
                           True, 0.125))
    torch.library.opcheck(torch.ops.effx.dense_attention.default,
                          (q, k, v, dense.k[0], dense.v[0], torch.tensor([4, 9]), None, None, True, 0.125, 5))


def test_compile_fullgraph_decode_step():
    cache = kv.DenseCache(1, 1, 2, 64, 32, dtype=torch.float32)
    lengths = torch.tensor([4])

    def step(q, k, v):
        out, lse = torch.ops.effx.dense_attention(q, k, v, cache.k[0], cache.v[0], lengths, None, None, True, 0.125)
        return out * 2, lse

    q, k, v = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64)
    got = torch.compile(step, fullgraph=True)(q, k, v)
    want = step(q, k, v)
    torch.testing.assert_close(got[0], want[0])


# --- bad inputs ---------------------------------------------------------------------------------


def test_bad_cache_construction():
    with pytest.raises(ValueError, match=r"effx\.kv\.KIVICache: group_size must divide head_dim \(64\), got 48"):
        kv.KIVICache(1, 1, 1, 64, 128, group_size=48)
    with pytest.raises(ValueError, match=r"effx\.kv\.KIVICache: residual must be a positive multiple of "
                                         r"group_size \(32\), got 100"):
        kv.KIVICache(1, 1, 1, 64, 128, residual=100)
    with pytest.raises(ValueError, match=r"effx\.kv\.KIVICache: bits must be 2 or 4, got 8"):
        kv.KIVICache(1, 1, 1, 64, 128, bits=8)
    with pytest.raises(ValueError, match=r"effx\.kv\.KIVICache: group_size must be a positive multiple of 16 "
                                         r"at 2 bits"):
        kv.KIVICache(1, 1, 1, 64, 128, group_size=8, residual=32)
    with pytest.raises(ValueError, match=r"effx\.kv\.DenseCache: capacity must be a positive int, got 0"):
        kv.DenseCache(1, 1, 1, 64, 0)


@pytest.mark.parametrize("make", [
    lambda: kv.DenseCache(1, 2, 2, 32, 16, dtype=torch.float32),
    lambda: kv.KIVICache(1, 2, 2, 32, 16, group_size=16, residual=16, dtype=torch.float32),
], ids=["dense", "kivi"])
def test_bad_attend_inputs(make):
    cache = make()
    name = type(cache).__name__
    q, k, v = torch.randn(2, 4, 3, 32), torch.randn(2, 2, 3, 32), torch.randn(2, 2, 3, 32)
    with pytest.raises(ValueError, match=rf"effx\.kv\.{name}\.attend: q heads \(3\) must be a multiple of kv heads \(2\)"):
        cache.attend(0, q[:, :3], k, v)
    with pytest.raises(ValueError, match=rf"{name}\.attend: k_new must be torch.float32 on cpu like the cache, got "
                                         r"torch.float16"):
        cache.attend(0, q, k.half(), v)
    with pytest.raises(ValueError, match=rf"{name}\.attend: k_new must have shape \[2, 2, tokens >= 1, 32\], got "
                                         r"\[2, 1, 3, 32\]"):
        cache.attend(0, q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match=rf"{name}\.attend: v_new must have the shape of k_new"):
        cache.attend(0, q, k, v[:, :, :2])
    with pytest.raises(ValueError, match=rf"{name}\.attend: layer must be in \[0, 1\), got 1"):
        cache.attend(1, q, k, v)
    with pytest.raises(ValueError, match=rf"{name}\.attend: parents\[i\] must be in \[-1, i\)"):
        cache.attend(0, q, k, v, parents=[-1, 1, 0])
    for window in (0, 2.5, True):
        with pytest.raises(ValueError, match=rf"{name}\.attend: window must be a positive int or None, got {window}"):
            cache.attend(0, q, k, v, window=window)
    # A window that hides nothing yet is no window: every policy takes it.
    cache.attend(0, torch.randn(2, 4, 15, 32), torch.randn(2, 2, 15, 32), torch.randn(2, 2, 15, 32), window=15)
    with pytest.raises(ValueError, match=rf"{name}\.attend: a token tree with a sliding window must have at most "
                                         r"window \(2\) tokens, got 3"):
        cache.attend(0, q, k, v, parents=[-1, 0, 0], window=2)
    with pytest.raises(ValueError, match=rf"{name}\.attend: capacity exceeded in row 0: 15 cached \+ 3 new > "
                                         r"capacity 16"):
        cache.attend(0, q, k, v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bad_device():
    cache = kv.DenseCache(1, 1, 1, 32, 16, dtype=torch.float32, device="cuda")
    with pytest.raises(ValueError, match=r"q must be torch.float32 on cuda like the cache, got torch.float32 on cpu"):
        cache.attend(0, torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32, device="cuda"),
                     torch.randn(1, 1, 1, 32, device="cuda"))


def test_bad_op_inputs():
    cache = kv.KIVICache(1, 1, 2, 32, 32, group_size=16, residual=16, dtype=torch.float32)
    s = [cache._layers[0][n] for n in kv.KIVICache._STORAGE]
    q, k = torch.randn(1, 2, 2, 32), torch.randn(1, 2, 2, 32)
    with pytest.raises(RuntimeError, match=r"effx\.kivi_attention: group_size must divide head_dim \(32\), got 48"):
        torch.ops.effx.kivi_attention(q, k, k, *s, None, None, 2, 48, True, 1.0)
    with pytest.raises(RuntimeError, match=r"effx\.kivi_attention: k_scale must be Float, got Half"):
        torch.ops.effx.kivi_attention(q, k, k, s[0], s[1].half(), *s[2:], None, None, 2, 16, True, 1.0)
    with pytest.raises(RuntimeError, match=r"effx\.kivi_append_: lengths\[0\] \+ new tokens \(0 \+ 40\) must not "
                                           r"exceed the cache capacity \(32\)"):
        torch.ops.effx.kivi_append_(torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32), *s, None, 2, 16)
    with pytest.raises(RuntimeError, match=r"effx\.dense_attention: q heads \(3\) must be a multiple of kv heads \(2\)"):
        torch.ops.effx.dense_attention(torch.randn(1, 3, 2, 32), k, k, torch.zeros(1, 2, 8, 32),
                                       torch.zeros(1, 2, 8, 32), torch.tensor([0]), None, None, True, 1.0)
    with pytest.raises(RuntimeError, match=r"effx\.dense_attention: k_new must have the dtype of q \(Float\), got Half"):
        torch.ops.effx.dense_attention(q, k.half(), k, torch.zeros(1, 2, 8, 32), torch.zeros(1, 2, 8, 32),
                                       torch.tensor([0]), None, None, True, 1.0)
    cached = (torch.zeros(1, 2, 8, 32), torch.zeros(1, 2, 8, 32), torch.tensor([3]))
    with pytest.raises(RuntimeError, match=r"effx\.dense_attention: window must be >= 0 \(0: no sliding window\), "
                                           r"got -1"):
        torch.ops.effx.dense_attention(q, k, k, *cached, None, None, True, 1.0, -1)
    with pytest.raises(RuntimeError, match=r"effx\.dense_attention: a sliding window needs causal attention"):
        torch.ops.effx.dense_attention(q, k, k, *cached, None, None, False, 1.0, 4)
    with pytest.raises(RuntimeError, match=r"effx\.dense_attention: a token tree with a sliding window must have at "
                                           r"most window \(1\) tokens, got 2"):
        torch.ops.effx.dense_attention(q, k, k, *cached, None, torch.tensor([-1, 0]), True, 1.0, 1)


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_extend_stores_without_attending(device):
    torch.manual_seed(12)
    cache, opts = kivi_cache(2, 2, 64, 256, bits=4, group_size=16, residual=32, dtype=torch.float32, device=device)
    run = Runner(cache, 2, 2, 4, 64, torch.float32, device, kivi=opts)
    k, v = torch.randn(2, 2, 70, 64, device=device), torch.randn(2, 2, 70, 64, device=device)
    cache.extend(0, k, v, lengths=[70, 41])
    for b, row in enumerate(run.rows):
        valid = (70, 41)[b]
        row.append(k[b, :, :valid].cpu(), v[b, :, :valid].cpu())
    check_state(cache, run)
    assert run.step(1) <= KIVI_TOL[torch.float32]
    with pytest.raises(ValueError, match=r"KIVICache\.extend: k_new must have shape \[2, 2, tokens >= 1, 64\]"):
        cache.extend(0, k[:1], v[:1])
