"""effx.ops.quantize / dequantize against the float64 reference of SPECS.md section 1."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import effx
from common import ALL_DEVICES, DTYPES, TOL, rel_error
from reference.quant import dequantize_ref, pack_ref, quantize_ref, unpack_ref

# Where the float64 value lies this close to a rounding tie, fp32 arithmetic may round to
# either neighbour; elsewhere the codes must match the reference exactly.
TIE_BAND = 1e-3
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def check_against_reference(x: torch.Tensor, bits: int, group_size: int):
    codes, scale, zero = effx.ops.quantize(x, bits, group_size)
    n = x.shape[-1]
    lead = tuple(x.shape[:-1])
    assert codes.dtype == torch.int32 and codes.device == x.device
    assert codes.shape == lead + (-(-n * bits // 32),)
    assert scale.shape == zero.shape == lead + (n // group_size,)
    assert scale.dtype == zero.dtype == x.dtype

    ref_codes, ref_v, ref_scale, ref_zero = quantize_ref(x.cpu(), bits, group_size)
    assert torch.equal(zero.cpu().double(), ref_zero), "zero must be the group minimum, exactly"
    # scale may differ from the float64 value by one rounding of the stored dtype
    assert torch.allclose(scale.cpu().double(), ref_scale, rtol=ULP[x.dtype], atol=0)

    got = unpack_ref(codes.cpu(), bits, n)
    near_tie = ((ref_v - ref_v.floor()) - 0.5).abs() < TIE_BAND
    exact = got == ref_codes
    assert exact[~near_tie].all(), f"{int((~exact & ~near_tie).sum())} codes differ from the reference"
    assert ((got - ref_v.floor()).abs() <= 1)[near_tie].all()
    # padding bits of the last word of every row are zero
    assert torch.equal(pack_ref(got, bits), codes.cpu())

    for out_dtype in DTYPES:
        back = effx.ops.dequantize(codes, scale, zero, bits, group_size, out_dtype)
        assert back.shape == x.shape and back.dtype == out_dtype and back.device == x.device
        expect = dequantize_ref(got, scale.cpu(), zero.cpu(), group_size)
        assert not torch.isnan(back).any()
        assert rel_error(back, expect) <= TOL[out_dtype]
    # quantization error bound of round-to-nearest: half a step per value
    back = effx.ops.dequantize(codes, scale, zero, bits, group_size, torch.float32).cpu().double()
    step = scale.cpu().double().repeat_interleave(group_size, -1)
    slack = step * 1e-4 + x.abs().cpu().double() * ULP[x.dtype]
    assert ((back - x.cpu().double()).abs() <= step / 2 + slack).all()
    return codes, scale, zero


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(
    "shape,group_size",
    [((3, 7, 96), 32), ((5, 96), 48), ((2, 3, 5, 40), 8), ((1, 128), 128), ((11, 3, 24), 3), ((33,), 11)],
)
def test_matches_reference(device, dtype, bits, shape, group_size):
    torch.manual_seed(sum(shape) + bits + group_size)
    x = (torch.randn(shape) * 3 + 0.5).to(device=device, dtype=dtype)
    check_against_reference(x, bits, group_size)


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_large_input_uses_all_threads_consistently(device):
    torch.manual_seed(0)
    x = torch.randn(1031, 1024, device=device)
    check_against_reference(x, 2, 32)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize(
    "make",
    [
        lambda d: torch.randn(64, 6, 5, device=d).permute(1, 2, 0),  # transposed: copied
        lambda d: torch.randn(6, 5, 100, device=d)[..., 10:74],  # sliced rows: strided view
        lambda d: torch.randn(1, 5, 64, device=d).expand(3, 5, 64),  # stride 0 on a dim
        lambda d: torch.randn(12, 64, device=d)[::3],  # every third row
    ],
    ids=["permuted", "sliced", "expanded", "row-step"],
)
def test_non_contiguous_equals_contiguous(device, make):
    x = make(device)
    assert not x.is_contiguous()
    got = effx.ops.quantize(x, 4, 32)
    want = effx.ops.quantize(x.contiguous(), 4, 32)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_groups_are_exact(device, dtype, bits):
    x = torch.randn(4, 96, device=device).to(dtype)
    x[0, :32] = 1.75
    x[1] = 0.0
    x[2, 32:64] = -3.0e3 if dtype != torch.float16 else -3.0e2
    codes, scale, zero = effx.ops.quantize(x, bits, 32)
    back = effx.ops.dequantize(codes, scale, zero, bits, 32, dtype)
    assert not torch.isnan(back).any() and not torch.isnan(scale).any()
    assert torch.equal(back[0, :32], x[0, :32])
    assert torch.equal(back[1], x[1])
    assert torch.equal(back[2, 32:64], x[2, 32:64])
    assert scale[0, 0] == 0 and scale[1].eq(0).all()


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_tiny_and_huge_ranges_never_nan(device):
    x = torch.zeros(3, 32, device=device)
    x[0, 1] = 1e-40  # subnormal range: scale is not a normal fp32, treated as constant
    x[1] = torch.linspace(-1, 1, 32) * 1.7e38  # max - min close to FLT_MAX
    x[2, ::2] = 1e-30
    codes, scale, zero = effx.ops.quantize(x, 2, 32)
    back = effx.ops.dequantize(codes, scale, zero, 2, 32)
    assert torch.isfinite(back).all() and torch.isfinite(scale).all()
    assert (back[0] - x[0]).abs().max() <= 1e-40
    assert rel_error(back[1], x[1]) < 0.5
    assert rel_error(back[2], x[2]) < 1e-6


def test_packing_layout_is_lsb_first():
    # values 0..3 repeated in one group: min 0, max 3, scale 1, codes equal the values
    x = (torch.arange(40) % 4).float().reshape(1, 40)
    codes, scale, zero = effx.ops.quantize(x, 2, 40)
    assert scale.item() == 1.0 and zero.item() == 0.0
    assert [c & 0xFFFFFFFF for c in codes[0].tolist()] == [0xE4E4E4E4, 0xE4E4E4E4, 0x0000E4E4]
    x = torch.tensor([[0.0, 15.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    codes, _, _ = effx.ops.quantize(x, 4, 9)
    assert [c & 0xFFFFFFFF for c in codes[0].tolist()] == [0x654321F0, 0x7]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    groups=st.integers(1, 6),
    group_size=st.sampled_from([1, 2, 3, 5, 8, 16, 32, 33, 64]),
    bits=st.sampled_from([2, 4, 8]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    constant_rows=st.integers(0, 2),
)
def test_property_random_shapes(rows, groups, group_size, bits, dtype, seed, constant_rows):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, groups * group_size, generator=g) * 10).to(dtype)
    x[:constant_rows] = x[:constant_rows, :1]
    check_against_reference(x, bits, group_size)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    x = torch.randn(3, 5, 64, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.effx.quantize.default, (x, 4, 32))
    codes, scale, zero = effx.ops.quantize(x, 4, 32)
    torch.library.opcheck(torch.ops.effx.dequantize.default, (codes, scale, zero, 4, 32, torch.float32))


def test_torch_compile_fullgraph():
    def roundtrip(x):
        codes, scale, zero = effx.ops.quantize(x * 2, 2, 16)
        return effx.ops.dequantize(codes, scale, zero, 2, 16) + 1

    x = torch.randn(4, 7, 48)
    compiled = torch.compile(roundtrip, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x), roundtrip(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cuda_agrees_with_cpu(dtype, bits):
    torch.manual_seed(bits)
    x = torch.randn(37, 4, 160, dtype=dtype)
    cpu = effx.ops.quantize(x, bits, 32)
    gpu = effx.ops.quantize(x.cuda(), bits, 32)
    assert torch.equal(cpu[1], gpu[1].cpu()) and torch.equal(cpu[2], gpu[2].cpu())
    diff = unpack_ref(cpu[0], bits, 160) - unpack_ref(gpu[0].cpu(), bits, 160)
    assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 1e-3


# --- bad inputs: every message names the op, the argument, what was expected and what was seen


def _raises(match, fn, *args):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def test_bad_quantize_inputs():
    q = torch.ops.effx.quantize
    x = torch.randn(4, 128)
    _raises(r"effx\.quantize: group_size must divide the last dim of x \(128\), got 48", q, x, 2, 48)
    _raises(r"effx\.quantize: bits must be 2, 4 or 8, got 3", q, x, 3, 32)
    _raises(r"effx\.quantize: group_size must be a positive int32, got 0", q, x, 2, 0)
    _raises(r"effx\.quantize: group_size must be a positive int32, got -32", q, x, 2, -32)
    _raises(r"effx\.quantize: x must be float32, float16 or bfloat16, got Int", q, x.int(), 2, 32)
    _raises(r"effx\.quantize: x must be float32, float16 or bfloat16, got Double", q, x.double(), 2, 32)
    _raises(r"effx\.quantize: x must be non-empty, got shape \[0, 128\]", q, torch.empty(0, 128), 2, 32)
    _raises(r"effx\.quantize: x must have at least 1 dim, got a 0-dim tensor", q, torch.tensor(1.0), 2, 1)


def test_bad_dequantize_inputs():
    dq = torch.ops.effx.dequantize
    codes, scale, zero = effx.ops.quantize(torch.randn(4, 128), 2, 32)
    _raises(r"effx\.dequantize: codes must be int32, got Long", dq, codes.long(), scale, zero, 2, 32, torch.float32)
    _raises(r"effx\.dequantize: codes must have shape \[4, 16\] for scale of shape \[4, 4\] at 4 bits and "
            r"group_size 32, got \[4, 8\]", dq, codes, scale, zero, 4, 32, torch.float32)
    _raises(r"effx\.dequantize: codes must have shape \[4, 4\] .* got \[4, 8\]", dq, codes, scale, zero, 2, 16,
            torch.float32)
    _raises(r"effx\.dequantize: zero must have the shape of scale \(\[4, 4\]\), got \[4, 3\]", dq, codes, scale,
            zero[:, :3], 2, 32, torch.float32)
    _raises(r"effx\.dequantize: zero must have the dtype of scale \(Float\), got Half", dq, codes, scale,
            zero.half(), 2, 32, torch.float32)
    _raises(r"effx\.dequantize: scale must be float32, float16 or bfloat16, got Double", dq, codes,
            scale.double(), zero.double(), 2, 32, torch.float32)
    _raises(r"effx\.dequantize: dtype must be float32, float16 or bfloat16, got Int", dq, codes, scale, zero, 2,
            32, torch.int32)
    _raises(r"effx\.dequantize: bits must be 2, 4 or 8, got 16", dq, codes, scale, zero, 16, 32, torch.float32)
    _raises(r"effx\.dequantize: scale must be a non-empty tensor", dq, codes[:0], scale[:0], zero[:0], 2, 32,
            torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bad_devices():
    codes, scale, zero = effx.ops.quantize(torch.randn(4, 128), 2, 32)
    _raises(r"effx\.dequantize: scale must be on the device of codes \(cpu\), got cuda:0",
            torch.ops.effx.dequantize, codes, scale.cuda(), zero, 2, 32, torch.float32)
