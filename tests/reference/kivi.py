"""Float64 reference of the KIVI cache (SPECS.md section 2), written from the spec: what
every token looks like after the residual rule (keys quantized per channel in whole blocks of
R tokens once R gathered; values per token, oldest first, while more than R are held).
Quantization follows effx's documented arithmetic (reference.quant.quantize_like_effx)."""

from __future__ import annotations

import torch

from reference.quant import quantize_like_effx


class KiviRow:
    """One batch row of one layer: the keys and values attention sees, as float64."""

    def __init__(self, bits: int, group_size: int, residual: int, dtype: torch.dtype):
        self.bits, self.group_size, self.residual, self.dtype = bits, group_size, residual, dtype
        self.keys: list[torch.Tensor] = []  # [H, D] per token, as attention sees it
        self.values: list[torch.Tensor] = []
        self.kq = 0  # keys quantized
        self.vq = 0  # values quantized

    def __len__(self) -> int:
        return len(self.keys)

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[H, n, D] keys and values."""
        return torch.stack(self.keys, 1), torch.stack(self.values, 1)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [H, tn, D] in the cache dtype."""
        R = self.residual
        for i in range(k.shape[1]):
            if len(self.values) - self.vq == R:  # R values held: the oldest leaves the window
                raw = self.values[self.vq].to(self.dtype)
                self.values[self.vq] = quantize_like_effx(raw, self.bits, self.group_size)
                self.vq += 1
            self.keys.append(k[:, i].double())
            self.values.append(v[:, i].double())
            if len(self.keys) - self.kq == R:  # a whole block of R keys: per channel
                block = torch.stack(self.keys[self.kq:], 1).to(self.dtype)  # [H, R, D]
                deq = quantize_like_effx(block.transpose(1, 2), self.bits, self.group_size).transpose(1, 2)
                for j in range(R):
                    self.keys[self.kq + j] = deq[:, j]
                self.kq += R
