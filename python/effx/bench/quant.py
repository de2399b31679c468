"""Benchmark suite ``quant``: group-wise quantize / dequantize against the same math written
in plain PyTorch ops (reshape into groups, amin/amax, round, shift-and-sum packing)."""

from __future__ import annotations

import torch

from effx import ops
from effx._shapes import quant_codes_per_word
from effx.bench.harness import Record, measure_roofs, median_time


def torch_quantize(x: torch.Tensor, bits: int, group_size: int):
    """Plain-PyTorch group quantization with int32 LSB-first packing (the baseline)."""
    per_word = quant_codes_per_word(bits)
    groups = x.float().reshape(*x.shape[:-1], -1, group_size)
    mn = groups.amin(-1, keepdim=True)
    mx = groups.amax(-1, keepdim=True)
    scale = ((mx - mn) / (2**bits - 1)).to(x.dtype).float()
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = ((groups - mn) * inv).clamp_(0, 2**bits - 1).round_().to(torch.int32)
    q = q.reshape(*x.shape[:-1], -1, per_word)
    shifts = torch.arange(0, 32, bits, device=x.device, dtype=torch.int32)
    codes = (q << shifts).sum(-1, dtype=torch.int32)
    return codes, scale.squeeze(-1).to(x.dtype), mn.squeeze(-1).to(x.dtype)


def torch_dequantize(codes, scale, zero, bits: int, group_size: int, dtype):
    per_word = quant_codes_per_word(bits)
    shifts = torch.arange(0, 32, bits, device=codes.device, dtype=torch.int32)
    q = (codes.unsqueeze(-1) >> shifts) & (2**bits - 1)
    q = q.reshape(*codes.shape[:-1], -1, group_size).float()
    out = q * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return out.reshape(*codes.shape[:-1], codes.shape[-1] * per_word).to(dtype)


def _cases(device: torch.device, quick: bool):
    if device.type == "cuda":
        rows, cols = (16384, 32768) if not quick else (4096, 8192)  # 1 GiB of fp16 when full
        for dtype in (torch.float16, torch.bfloat16):
            for bits in (2, 4):
                for group in (32, 128):
                    yield rows, cols, dtype, bits, group
    else:
        rows, cols = (4096, 4096) if not quick else (1024, 1024)  # 16M values when full
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for bits in (2, 4, 8):
                yield rows, cols, dtype, bits, 32


def run(device: torch.device, quick: bool = False) -> list[Record]:
    roofs = measure_roofs(device)
    records = []
    for rows, cols, dtype, bits, group in _cases(device, quick):
        x = torch.randn(rows, cols, device=device, dtype=dtype)
        codes, scale, zero = ops.quantize(x, bits, group)
        # Bytes that must move: x read once; codes, scale and zero written once.
        q_bytes = x.nbytes + codes.nbytes + scale.nbytes + zero.nbytes
        runs = 10 if device.type == "cpu" else 50
        t = median_time(lambda: ops.quantize(x, bits, group), device, runs=runs)
        t_base = median_time(lambda: torch_quantize(x, bits, group), device, runs=max(3, runs // 3))
        shape = {"rows": rows, "cols": cols, "bits": bits, "G": group}
        name = str(dtype).replace("torch.", "")
        records.append(Record("quant", "quantize", shape, name, roofs.device, t, q_bytes, 0.0,
                              "torch ops", t_base, roofs))
        t = median_time(lambda: ops.dequantize(codes, scale, zero, bits, group, dtype), device, runs=runs)
        t_base = median_time(lambda: torch_dequantize(codes, scale, zero, bits, group, dtype), device,
                             runs=max(3, runs // 3))
        records.append(Record("quant", "dequantize", shape, name, roofs.device, t, q_bytes, 0.0,
                              "torch ops", t_base, roofs))
        del x, codes, scale, zero
    return records
