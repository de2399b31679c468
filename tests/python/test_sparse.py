"""effx sparse MLP / attention-head kernels and effx.sparse against the float64 reference of
SPECS.md section 4, plus predictor training and SparseMLP."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import effx
import effx.sparse as sp
from common import ALL_DEVICES, DTYPES, TOL, rel_error
from reference.sparse import (dense_attention_step_ref, sparse_down_ref, sparse_mlp_ref, sparse_up_ref)

ACTS = ["relu", "gelu", "gelu_tanh", "silu", "none"]


def make_mlp(batch, d, n, dtype, device, *, gated=False, bias=True, seed=0, d_out=None):
    g = torch.Generator().manual_seed(seed)
    d_out = d if d_out is None else d_out

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return dict(
        x=r(batch, d),
        w_up=r(n, d, scale=d**-0.5),
        w_gate=r(n, d, scale=d**-0.5) if gated else None,
        w_down_t=r(n, d_out, scale=n**-0.5),
        b_up=r(n, scale=0.5) if bias else None,
        b_gate=r(n, scale=0.5) if bias and gated else None,
        b_down=r(d_out, scale=0.5) if bias else None,
    )


def random_sets(n, k, batch=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if batch is None:
        return torch.randperm(n, generator=g)[:k]
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)])


# --- the kernels against the reference


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_up_matches_reference(device, dtype, activation, gated, per_row):
    batch, d, n, k = 5, 67, 50, 13
    m = make_mlp(batch, d, n, dtype, device, gated=gated, seed=k + gated)
    idx = random_sets(n, k, batch if per_row else None).to(device)
    h = effx.ops.sparse_mlp_up(m["x"], m["w_up"], idx, activation, m["w_gate"], m["b_up"], m["b_gate"])
    assert h.shape == (batch, k) and h.dtype == dtype and h.device.type == device
    want = sparse_up_ref(m["x"], m["w_up"], idx, activation, m["w_gate"], m["b_up"], m["b_gate"])
    assert not torch.isnan(h).any()
    assert rel_error(h, want) <= TOL[dtype]


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("batch,d,n,k", [(1, 96, 40, 7), (6, 33, 50, 50), (3, 300, 17, 1), (9, 520, 64, 37)])
def test_down_matches_reference(device, dtype, per_row, batch, d, n, k):
    m = make_mlp(batch, d, n, dtype, device, seed=d)
    idx = random_sets(n, k, batch if per_row else None, seed=d).to(device)
    h = torch.randn(batch, k).to(device=device, dtype=dtype)
    y = effx.ops.sparse_mlp_down(h, m["w_down_t"], idx, m["b_down"])
    assert y.shape == (batch, d) and y.dtype == dtype
    assert rel_error(y, sparse_down_ref(h, m["w_down_t"], idx, m["b_down"])) <= TOL[dtype]
    y = effx.ops.sparse_mlp_down(h, m["w_down_t"], idx)
    assert rel_error(y, sparse_down_ref(h, m["w_down_t"], idx)) <= TOL[dtype]


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu"])
def test_sparse_mlp_matches_reference(device, dtype, activation):
    gated = activation == "swiglu"
    batch, d, n, k = 4, 128, 344, 35
    m = make_mlp(batch, d, n, dtype, device, gated=gated, seed=3, d_out=72)
    idx = random_sets(n, k, seed=5).to(device)
    y = sp.sparse_mlp(m["x"], m["w_up"], m["w_down_t"], idx, activation, m["w_gate"], m["b_up"], m["b_down"],
                      b_gate=m["b_gate"])
    assert y.shape == (batch, 72) and y.dtype == dtype
    ref_act = "silu" if gated else activation
    want = sparse_mlp_ref(m["x"], m["w_up"], m["w_down_t"], idx, ref_act, m["w_gate"], m["b_up"], m["b_down"],
                          m["b_gate"])
    assert rel_error(y, want) <= TOL[dtype]
    # the fused op equals its two halves run separately
    h = effx.ops.sparse_mlp_up(m["x"], m["w_up"], idx, ref_act, m["w_gate"], m["b_up"], m["b_gate"])
    assert torch.equal(y, effx.ops.sparse_mlp_down(h, m["w_down_t"], idx, m["b_down"]))


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_and_full_index_sets(device, dtype):
    batch, d, n = 3, 40, 24
    m = make_mlp(batch, d, n, dtype, device, gated=True)
    for idx in (torch.empty(0, dtype=torch.long), torch.empty(batch, 0, dtype=torch.int32)):
        idx = idx.to(device)
        h = effx.ops.sparse_mlp_up(m["x"], m["w_up"], idx, "silu", m["w_gate"])
        assert h.shape == (batch, 0)
        y = effx.ops.sparse_mlp_down(h, m["w_down_t"], idx, m["b_down"])
        assert torch.equal(y, m["b_down"].expand(batch, d))
        assert torch.equal(effx.ops.sparse_mlp_down(h, m["w_down_t"], idx), torch.zeros(batch, d, dtype=dtype,
                                                                                         device=device))
    # every neuron, in a scrambled order: the dense MLP
    idx = torch.randperm(n).to(device)
    y = sp.sparse_mlp(m["x"], m["w_up"], m["w_down_t"], idx, "swiglu", m["w_gate"], m["b_up"], m["b_down"])
    x, wu, wg, w2t = (m[a].double().cpu() for a in ("x", "w_up", "w_gate", "w_down_t"))
    dense = (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T + m["b_up"].double().cpu())) @ w2t + m["b_down"].double().cpu()
    assert rel_error(y, dense) <= TOL[dtype]
    # empty batch
    h = effx.ops.sparse_mlp_up(m["x"][:0], m["w_up"], idx[:5], "relu")
    assert h.shape == (0, 5)
    assert effx.ops.sparse_mlp_down(h, m["w_down_t"], idx[:5]).shape == (0, d)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_row_equals_shared_when_rows_agree(device, dtype):
    batch, d, n, k = 6, 200, 90, 31
    m = make_mlp(batch, d, n, dtype, device, gated=True, seed=11)
    idx = random_sets(n, k, seed=2).to(device)
    rows = idx.expand(batch, k)
    shared = sp.sparse_mlp(m["x"], m["w_up"], m["w_down_t"], idx, "silu", m["w_gate"], m["b_up"], m["b_down"])
    per_row = sp.sparse_mlp(m["x"], m["w_up"], m["w_down_t"], rows, "silu", m["w_gate"], m["b_up"], m["b_down"])
    # batch tiles of the up projection group the additions differently: close, not bitwise
    assert rel_error(per_row, shared) <= TOL[dtype]
    h = torch.randn(batch, k).to(device=device, dtype=dtype)
    down_shared = effx.ops.sparse_mlp_down(h, m["w_down_t"], idx)
    down_rows = effx.ops.sparse_mlp_down(h, m["w_down_t"], rows)
    if device == "cpu":
        assert torch.equal(down_shared, down_rows)  # index order either way
    else:
        assert rel_error(down_rows, down_shared) <= TOL[dtype]
    # different sets per row: each row must see only its own neurons
    idx2 = random_sets(n, k, batch, seed=4).to(device)
    y = sp.sparse_mlp(m["x"], m["w_up"], m["w_down_t"], idx2, "silu", m["w_gate"], m["b_up"], m["b_down"])
    for b in range(batch):
        yb = sp.sparse_mlp(m["x"][b:b + 1], m["w_up"], m["w_down_t"], idx2[b], "silu", m["w_gate"], m["b_up"],
                           m["b_down"])
        assert rel_error(y[b:b + 1], yb) <= TOL[dtype]


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_are_read_exactly(device, dtype):
    """One-hot inputs pick single weights: subnormal, huge and signed values must come back
    bit for bit through the widening in both projections (vector body and tail)."""
    info = torch.finfo(dtype)
    d, n = 83, 20
    w = torch.randn(n, d, dtype=torch.float64)
    w[0, :8] = torch.tensor([info.tiny / 4, info.smallest_normal, -info.tiny / 2, info.max, -info.max, 0.0, -0.0, 1.0])
    w[5, 70:] = info.tiny / 8  # tail of the row, below the smallest normal
    w = w.to(dtype).to(device)
    eye = torch.eye(d, dtype=dtype, device=device)
    idx = torch.tensor([0, 5, 19, 3], device=device)
    h = effx.ops.sparse_mlp_up(eye, w, idx, "none")
    assert torch.equal(h, w[idx].T)
    y = effx.ops.sparse_mlp_down(torch.eye(4, dtype=dtype, device=device), w, idx)
    assert torch.equal(y, w[idx])


def test_fp16_subnormal_weights_survive_flush_denormal():
    """fp16 subnormals are normal fp32 values: with torch.set_flush_denormal (the CPU's DAZ and
    FTZ flags) on, the widening still returns them bit for bit instead of zero."""
    d, n = 83, 20
    w = torch.randn(n, d, dtype=torch.float64) * 1e-6  # |w| < 2^-14: fp16 subnormals
    w[3, 5:9] = torch.tensor([2.0**-24, -(2.0**-24), 2.0**-15, 1.0])
    w = w.to(torch.float16)
    assert (w[w != 0].abs() < torch.finfo(torch.float16).smallest_normal).float().mean() > 0.9
    eye = torch.eye(d, dtype=torch.float16)
    idx = torch.tensor([0, 3, 19, 7])
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no denormal flush mode")
    try:
        h = effx.ops.sparse_mlp_up(eye, w, idx, "none")
        y = effx.ops.sparse_mlp_down(torch.eye(4, dtype=torch.float16), w, idx)
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(h, w[idx].T) and torch.equal(y, w[idx])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_down_is_bitwise_deterministic_across_threads(dtype):
    batch, d, n, k = 3, 1100, 600, 400  # large enough to run threaded
    m = make_mlp(batch, d, n, dtype, "cpu", seed=7)
    idx = random_sets(n, k, seed=7)
    h = torch.randn(batch, k).to(dtype)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3, 1):
            torch.set_num_threads(threads)
            outs.append(effx.ops.sparse_mlp_down(h, m["w_down_t"], idx, m["b_down"]))
            outs.append(effx.ops.sparse_mlp_up(m["x"], m["w_up"], idx, "gelu", None, m["b_up"]))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(outs[0::2], outs[2::2]):
        assert torch.equal(a, b)
    for a, b in zip(outs[1::2], outs[3::2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_non_contiguous_inputs_equal_contiguous(device):
    batch, d, n, k = 4, 64, 48, 9
    m = make_mlp(batch, d, n, torch.float32, device, gated=True)
    idx = random_sets(n, k).to(device)
    x_wide = torch.randn(batch, d + 10, device=device)[:, 5:5 + d]  # strided rows
    w_rowstep = torch.randn(2 * n, d, device=device)[::2]  # every other row
    w_t_view = torch.randn(d, n, device=device).T  # a transposed view: copied
    idx_strided = torch.stack([idx, idx]).T[:, 0]  # non-contiguous indices
    got = effx.ops.sparse_mlp_up(x_wide, w_rowstep, idx_strided, "silu", m["w_gate"])
    want = effx.ops.sparse_mlp_up(x_wide.contiguous(), w_rowstep.contiguous(), idx, "silu", m["w_gate"].contiguous())
    assert torch.equal(got, want)
    h_wide = torch.randn(batch, k + 3, device=device)[:, :k]
    got = effx.ops.sparse_mlp_down(h_wide, w_t_view, idx_strided)
    want = effx.ops.sparse_mlp_down(h_wide.contiguous(), w_t_view.contiguous(), idx)
    assert torch.equal(got, want)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 9),
    d=st.integers(1, 150),
    n=st.integers(1, 80),
    frac=st.floats(0.0, 1.0),
    per_row=st.booleans(),
    gated=st.booleans(),
    activation=st.sampled_from(ACTS),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes(batch, d, n, frac, per_row, gated, activation, dtype, seed):
    k = int(round(frac * n))
    m = make_mlp(batch, d, n, dtype, "cpu", gated=gated, seed=seed % 1000)
    idx = random_sets(n, k, batch if per_row else None, seed=seed % 997)
    y = sp.sparse_mlp(m["x"], m["w_up"], m["w_down_t"], idx, activation, m["w_gate"], m["b_up"], m["b_down"],
                      b_gate=m["b_gate"])
    want = sparse_mlp_ref(m["x"], m["w_up"], m["w_down_t"], idx, activation, m["w_gate"], m["b_up"], m["b_down"],
                          m["b_gate"])
    assert not torch.isnan(y).any()
    # relative to the scale of the terms, so near-cancelling sums do not inflate the error
    h = sparse_up_ref(m["x"], m["w_up"], idx, activation, m["w_gate"], m["b_up"], m["b_gate"])
    scale = sparse_down_ref(h.abs(), m["w_down_t"].abs(), idx, m["b_down"].abs()).norm().item() + 1e-30
    assert (y.double() - want).norm().item() <= TOL[dtype] * scale


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    m = make_mlp(3, 32, 20, dtype, device, gated=True)
    idx = torch.tensor([4, 0, 9], device=device)
    torch.library.opcheck(torch.ops.effx.sparse_mlp_up.default,
                          (m["x"], m["w_up"], idx, "silu", m["w_gate"], m["b_up"], m["b_gate"], 1, True))
    h = effx.ops.sparse_mlp_up(m["x"], m["w_up"], idx)
    torch.library.opcheck(torch.ops.effx.sparse_mlp_down.default, (h, m["w_down_t"], idx, m["b_down"], 1, True))
    torch.library.opcheck(torch.ops.effx.sparse_mlp.default,
                          (m["x"], m["w_up"], m["w_down_t"], idx.expand(3, 3), "relu", None, m["b_up"], m["b_down"],
                           None, False))


def test_torch_compile_fullgraph():
    m = make_mlp(4, 48, 30, torch.float32, "cpu", gated=True)

    def block(x, idx):
        return sp.sparse_mlp(x * 2, m["w_up"], m["w_down_t"], idx, "swiglu", m["w_gate"], check_indices=False) + 1

    idx = torch.tensor([3, 7, 1, 29])
    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(m["x"], idx), block(m["x"], idx))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3, 16, 37])
@pytest.mark.parametrize("per_row", [False, True])
def test_cuda_agrees_with_cpu_and_is_deterministic(dtype, batch, per_row):
    d, n, k = 4096 + 8, 1000, 333
    m = make_mlp(batch, d, n, dtype, "cpu", gated=True, seed=batch)
    idx = random_sets(n, k, batch if per_row else None, seed=batch)
    args = ("silu", m["w_gate"], m["b_up"], m["b_down"])
    cpu = sp.sparse_mlp(m["x"], m["w_up"], m["w_down_t"], idx, *args)
    cuda_args = [a.cuda() for a in (m["x"], m["w_up"], m["w_down_t"], idx)]
    moved = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    gpu = sp.sparse_mlp(*cuda_args, *moved)
    assert rel_error(gpu, cpu) <= TOL[dtype]
    assert torch.equal(gpu, sp.sparse_mlp(*cuda_args, *moved))  # bitwise, run to run


# --- bad inputs: every message names the op, the argument, what was expected and what was seen


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(RuntimeError, match=match):
        fn(*args, **kwargs)


def test_bad_up_inputs():
    up = torch.ops.effx.sparse_mlp_up
    x, w, idx = torch.randn(4, 64), torch.randn(50, 64), torch.tensor([1, 5, 7])
    _raises(r"effx\.sparse_mlp_up: idx must be in \[0, 50\), got 50 at position 1", up, x, w, torch.tensor([3, 50]))
    _raises(r"effx\.sparse_mlp_up: idx must be in \[0, 50\), got -1 at position 0", up, x, w, torch.tensor([-1]))
    _raises(r"effx\.sparse_mlp_up: idx must not repeat an index within a set, got 5 again at position 2",
            up, x, w, torch.tensor([5, 1, 5]))
    _raises(r"effx\.sparse_mlp_up: idx must not repeat an index within a set, got 2 again at position 1 of row 3",
            up, x, w, torch.tensor([[0, 1], [0, 1], [0, 1], [2, 2]]))
    _raises(r"effx\.sparse_mlp_up: idx must be in \[0, 50\), got 99 at position 0 of row 1", up, x, w,
            torch.tensor([[0, 1], [99, 1], [0, 1], [2, 3]]))
    _raises(r"effx\.sparse_mlp_up: idx must be int32 or int64, got Float", up, x, w, idx.float())
    _raises(r"effx\.sparse_mlp_up: idx must be 1-D \[k\] \(one set for the batch\) or 2-D \[4, k\] \(one set per "
            r"row\), got shape \[3, 3\]", up, x, w, idx.expand(3, 3))
    _raises(r"effx\.sparse_mlp_up: activation must be one of none, relu, gelu, gelu_tanh, silu, got 'tanh'",
            up, x, w, idx, "tanh")
    _raises(r"effx\.sparse_mlp_up: x must be 2-D \[batch, d\], got shape \[2, 2, 64\]", up, x.view(2, 2, 64), w, idx)
    _raises(r"effx\.sparse_mlp_up: x must be float32, float16 or bfloat16, got Double", up, x.double(), w, idx)
    _raises(r"effx\.sparse_mlp_up: w_up must have the dtype of x \(Float\), got Half", up, x, w.half(), idx)
    _raises(r"effx\.sparse_mlp_up: w_up must have shape \[n, 64\] to match x, got \[50, 63\]", up, x, w[:, :63], idx)
    _raises(r"effx\.sparse_mlp_up: w_gate must have the shape of w_up \(\[50, 64\]\), got \[49, 64\]", up, x, w, idx,
            "silu", w[:49])
    _raises(r"effx\.sparse_mlp_up: b_up must have shape \[50\], got \[64\]", up, x, w, idx, "relu", None,
            torch.randn(64))
    _raises(r"effx\.sparse_mlp_up: b_gate must be None when w_gate is None", up, x, w, idx, "relu", None, None,
            torch.randn(50))
    _raises(r"effx\.sparse_mlp_up: rows_per_index must divide the rows of w_up \(50\), got 3", up, x, w, idx,
            "none", None, None, None, 3)
    _raises(r"effx\.sparse_mlp_up: rows_per_index must be >= 1, got 0", up, x, w, idx, "none", None, None, None, 0)
    _raises(r"effx\.sparse_mlp_up: idx must be in \[0, 10\), got 10 at position 0", up, x, w, torch.tensor([10]),
            "none", None, None, None, 5)


def test_bad_down_and_fused_inputs():
    down = torch.ops.effx.sparse_mlp_down
    h, w, idx = torch.randn(4, 3), torch.randn(50, 64), torch.tensor([1, 5, 7])
    _raises(r"effx\.sparse_mlp_down: h must have k \* rows_per_index = 3 columns for idx of shape \[3\], got 4",
            down, torch.randn(4, 4), w, idx)
    _raises(r"effx\.sparse_mlp_down: idx must not repeat an index within a set, got 1 again at position 2",
            down, h, w, torch.tensor([1, 2, 1]))
    _raises(r"effx\.sparse_mlp_down: w_down_t must be 2-D \[n, d\] \(the down projection transposed\), got shape "
            r"\[50\]", down, h, w[:, 0], idx)
    _raises(r"effx\.sparse_mlp_down: b_down must have shape \[64\], got \[50\]", down, h, w, idx, torch.randn(50))
    _raises(r"effx\.sparse_mlp_down: w_down_t must have the dtype of h \(Float\), got BFloat16", down, h,
            w.bfloat16(), idx)
    _raises(r"effx\.sparse_mlp_down: b_down must have the dtype of h \(Float\), got Half", down, h, w, idx,
            torch.randn(64).half())
    fused = torch.ops.effx.sparse_mlp
    x = torch.randn(4, 64)
    _raises(r"effx\.sparse_mlp: w_down_t must be 2-D \[n, d\] with the n = 50 rows of w_up, got shape \[40, 64\]",
            fused, x, w, w[:40], idx)
    _raises(r"effx\.sparse_mlp: idx must be in \[0, 50\), got 77 at position 0", fused, x, w, w, torch.tensor([77]))
    with pytest.raises(ValueError, match="activation 'swiglu' needs w_gate"):
        sp.sparse_mlp(x, w, w, idx, "swiglu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bad_devices_and_cuda_index_checks():
    x, w, idx = torch.randn(4, 64), torch.randn(50, 64), torch.tensor([1, 5, 7])
    _raises(r"effx\.sparse_mlp_up: w_up must be on the device of x \(cpu\), got cuda:0",
            torch.ops.effx.sparse_mlp_up, x, w.cuda(), idx)
    _raises(r"effx\.sparse_mlp_up: idx must be on the device of x \(cuda:0\), got cpu",
            torch.ops.effx.sparse_mlp_up, x.cuda(), w.cuda(), idx)
    _raises(r"effx\.sparse_mlp_up: idx must be in \[0, 50\), got 50 at position 1",
            torch.ops.effx.sparse_mlp_up, x.cuda(), w.cuda(), torch.tensor([3, 50], device="cuda"))


# --- attention-head sparsity


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(8, 8), (8, 2)])
def test_sparse_heads_keep_kv_for_skipped_heads(device, dtype, num_q_heads, num_kv_heads):
    """A decode loop where each step selects different heads (per row): every step's output
    equals dense attention with the unselected heads' outputs zeroed, including heads that
    were skipped at earlier steps (their K/V were still cached)."""
    torch.manual_seed(num_kv_heads)
    batch, d, head_dim, steps, k = 2, 48, 16, 6, 3
    g = torch.Generator().manual_seed(1)

    def r(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    w_q, b_q = r(num_q_heads * head_dim, d, scale=d**-0.5), r(num_q_heads * head_dim, scale=0.1)
    w_k, w_v = r(num_kv_heads * head_dim, d, scale=d**-0.5), r(num_kv_heads * head_dim, d, scale=d**-0.5)
    w_o = r(d, num_q_heads * head_dim, scale=(num_q_heads * head_dim) ** -0.5)
    b_o = r(d, scale=0.1)
    w_o_t = w_o.T.contiguous()
    k_cache = torch.zeros(batch, num_kv_heads, 0, head_dim, device=device, dtype=dtype)
    v_cache = k_cache.clone()
    for step in range(steps):
        x = r(batch, d, scale=1.0)
        heads = torch.stack([torch.randperm(num_q_heads, generator=g)[:k] for _ in range(batch)]).to(device)
        q, k_new, v_new = sp.sparse_head_qkv(x, w_q, w_k, w_v, heads, head_dim, b_q=b_q)
        assert q.shape == (batch, k, head_dim) and k_new.shape == (batch, num_kv_heads, head_dim)
        k_cache = torch.cat([k_cache, k_new.unsqueeze(2)], dim=2)
        v_cache = torch.cat([v_cache, v_new.unsqueeze(2)], dim=2)
        # attention for the selected heads only, each reading its GQA kv-head
        kv = sp.kv_heads_of(heads, num_q_heads, num_kv_heads)
        rows = torch.arange(batch, device=device).unsqueeze(1)
        ks, vs = k_cache[rows, kv], v_cache[rows, kv]  # [B, k, T, D]
        p = (torch.einsum("bkd,bktd->bkt", q.float(), ks.float()) / math.sqrt(head_dim)).softmax(-1)
        o = torch.einsum("bkt,bktd->bkd", p, vs.float()).to(dtype)
        y = sp.sparse_head_out(o, w_o_t, heads, b_o=b_o)
        # dense reference: every head computed, the unselected heads' outputs zeroed
        x64 = x.double().cpu()
        q_all = (x64 @ w_q.double().cpu().T + b_q.double().cpu()).view(batch, num_q_heads, head_dim)
        o_all = dense_attention_step_ref(q_all, k_cache.cpu(), v_cache.cpu(), num_kv_heads)
        mask = torch.zeros(batch, num_q_heads, 1, dtype=torch.float64)
        mask[rows.cpu(), heads.cpu()] = 1.0
        want = (o_all * mask).reshape(batch, -1) @ w_o.double().cpu().T + b_o.double().cpu()
        assert rel_error(y, want) <= 3 * TOL[dtype], f"step {step}"


def test_kv_heads_of_maps_gqa_groups():
    heads = torch.tensor([0, 3, 4, 7])
    assert sp.kv_heads_of(heads, 8, 2).tolist() == [0, 0, 1, 1]
    assert sp.kv_heads_of(heads, 8, 8).tolist() == [0, 3, 4, 7]
    with pytest.raises(ValueError, match="num_kv_heads \\(3\\) must divide num_q_heads \\(8\\)"):
        sp.kv_heads_of(heads, 8, 3)


# --- predictors and SparseMLP


class Block(nn.Module):
    """A residual ReLU MLP block: x + fc2(relu(fc1(x)))."""

    def __init__(self, d, n, out_scale=1.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, n, bias=False), nn.ReLU(), nn.Linear(n, d))
        with torch.no_grad():
            self.mlp[2].weight.mul_(out_scale)

    def forward(self, x):
        return x + self.mlp(x)


def test_predictor_learns_a_predictable_active_set():
    """Active set = sign pattern of fc1 x, linear in the block input: a rank-d predictor can
    learn it; recall at k must reach 0.95."""
    torch.manual_seed(0)
    d, n = 32, 256
    model = nn.Sequential(Block(d, n))
    data = [torch.randn(64, 3, d) for _ in range(24)]  # [batch, tokens, d]
    rec = sp.record_activations(model, data, {"mlp0": (model[0], model[0].mlp[2])})
    x, hidden = rec["mlp0"]
    assert x.shape == (24 * 64 * 3, d) and hidden.shape == (24 * 64 * 3, n)
    labels = sp.activation_labels(hidden, rule="positive")
    k = 160
    predictor, report = sp.train_predictor(x, labels, k, rank=d, epochs=15, lr=3e-3)
    assert 0.4 < report.positive_fraction < 0.6
    assert report.recall >= 0.95, report
    # an untrained predictor of the same shape is far worse: the recall comes from training
    untrained = sp.SparsePredictor(d, n, rank=d)
    assert sp.recall_at_k(untrained(x[-500:]), labels[-500:], k) < report.recall - 0.2


def test_lookahead_predictor_from_previous_layer():
    """Layer 1's active set predicted from layer 0's input (the residual stream changes
    slowly when the blocks' outputs are small)."""
    torch.manual_seed(1)
    d, n = 32, 128
    model = nn.Sequential(Block(d, n, out_scale=0.1), Block(d, n, out_scale=0.1))
    data = [torch.randn(256, d) for _ in range(16)]
    rec = sp.record_activations(model, data, {"ahead": (model[0], model[1].mlp[2]),
                                              "same": (model[1], model[1].mlp[2])}, max_rows=3000)
    assert rec["ahead"][0].shape == (3000, d)
    labels = sp.activation_labels(rec["ahead"][1], rule="positive")
    assert torch.equal(labels, sp.activation_labels(rec["same"][1]))
    predictor, report = sp.train_predictor(rec["ahead"][0], labels, 80, rank=d, epochs=20, lr=3e-3)
    assert report.recall >= 0.9, report
    mlp = sp.SparseMLP.from_dense(model[1].mlp, predictor=predictor, density=80 / n)
    x0 = torch.randn(2, d)
    planned = mlp.plan(x0)
    assert planned.shape == (80,) and torch.equal(planned, planned.sort().values)
    x1 = model[0](x0)
    want = sp.sparse_mlp(x1, mlp.w_up, mlp.w_down_t, planned, "relu", b_down=mlp.b_down)
    assert torch.equal(mlp(x1), want)  # the plan is used once ...
    assert mlp._planned is None  # ... then forgotten


def test_topk_labels_and_head_labels():
    hidden = torch.tensor([[0.1, -3.0, 2.0, 0.5], [-0.2, 0.0, 0.3, -0.4]])
    assert sp.activation_labels(hidden, rule="topk", k=2).tolist() == [[0, 1, 1, 0], [0, 0, 1, 1]]
    assert sp.activation_labels(hidden).tolist() == [[1, 0, 1, 1], [0, 0, 1, 0]]
    heads = torch.zeros(1, 4, 2)
    heads[0, 2] = 5.0
    heads[0, 0] = 1.0
    assert sp.head_labels(heads.reshape(1, 8), 4, fraction=0.5).tolist() == [[1, 0, 1, 0]]
    with pytest.raises(ValueError, match="rule 'topk' needs k"):
        sp.activation_labels(hidden, rule="topk")


class LlamaMLP(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.gate_proj = nn.Linear(d, n, bias=False)
        self.up_proj = nn.Linear(d, n, bias=False)
        self.down_proj = nn.Linear(n, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class GPTMLP(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(d, n), nn.Linear(n, d), nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("make", [lambda: LlamaMLP(40, 112), lambda: GPTMLP(40, 96),
                                  lambda: nn.Sequential(nn.Linear(40, 80), nn.GELU(), nn.Linear(80, 40))],
                         ids=["llama", "gpt", "sequential"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_mlp_module_at_density_one_equals_dense(make, dtype):
    torch.manual_seed(0)
    dense = make().to(dtype)
    mlp = sp.SparseMLP.from_dense(dense)
    x = torch.randn(2, 5, 40).to(dtype)
    y = mlp(x)
    assert y.shape == x.shape and y.dtype == dtype
    want = dense.double()(x.double())
    assert rel_error(y, want) <= TOL[dtype]


def test_sparse_mlp_module_density_and_per_row():
    torch.manual_seed(0)
    dense = LlamaMLP(32, 64)
    predictor = sp.SparsePredictor(32, 64, rank=16)
    mlp = sp.SparseMLP.from_dense(dense, predictor=predictor, density=0.25)
    assert mlp.k == 16
    x = torch.randn(3, 32)
    idx = predictor.select(x, 16)
    want = sp.sparse_mlp(x, mlp.w_up, mlp.w_down_t, idx, "silu", mlp.w_gate)
    assert torch.equal(mlp(x), want)
    mlp.per_row = True
    rows = predictor.select(x, 16, per_row=True)
    assert rows.shape == (3, 16)
    assert torch.equal(mlp(x), sp.sparse_mlp(x, mlp.w_up, mlp.w_down_t, rows, "silu", mlp.w_gate))
    mlp.density = 0.0
    assert torch.equal(mlp(x), torch.zeros(3, 32))  # no neurons and no bias
    with pytest.raises(ValueError, match="density must be in \\[0, 1\\], got 1.5"):
        mlp.density = 1.5
    with pytest.raises(ValueError, match="density below 1 needs a predictor"):
        sp.SparseMLP.from_dense(dense, density=0.5)
    with pytest.raises(ValueError, match="unknown MLP layout Linear"):
        sp.SparseMLP.from_dense(nn.Linear(3, 3))
    # the shared set keeps any neuron that one row ranks highly
    logits = predictor(x)
    best_of_row0 = logits[0].argmax().item()
    assert best_of_row0 in predictor.select(x, 16).tolist()


def test_bench_suite_reports_both_baselines():
    from effx.bench import SUITES

    records = SUITES["sparse"](torch.device("cpu"), quick=True)
    assert {r.op for r in records} == {"vs-dense", "vs-gather"}
    assert {r.shape["B"] for r in records} == {1, 4}
    for r in records:
        k, d = r.shape["k"], r.shape["d"]
        assert k == round(r.shape["density"] * r.shape["n"])
        assert r.bytes == 3 * k * d * 2 + 2 * r.shape["B"] * d * 2  # gate, up and down rows in bf16
        assert r.time_s > 0 and r.baseline_time_s > 0
