"""`QuantizedWeight`: the one container every pass produces and every exporter reads (none re-quantizes).

Fields (W is torch Linear layout ``[N, K]``):
  codes  uint8 ``[N, K]``     unsigned codes in ``[0, 2^bits - 1]`` (original column order)
  scale  fp32  ``[N, G]``     per-row, per-group scale
  zero   fp32  ``[N, G]``     integral zero points, or None for symmetric (implicit ``2^(bits-1)``)
  g_idx  int32 ``[K]``        group of each input column (``k // group_size``, or an act-order permutation)
  lut    fp32  ``[N, 2^bits]`` optional non-uniform levels (NUPES); then ``w_hat[n, k] = lut[n, codes[n, k]]``
  exponent                    optional power exponent(s) that produced the LUT (metadata)
  meta["lut_scaled"]          NUPES separable layout: ``w_hat[n, k] = scale[n, g_idx[k]] * lut[n, codes[n, k]]``
Dequantization (uniform): ``w_hat = scale[:, g_idx] * (codes - zero[:, g_idx])``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ptq.quant.primitives import QuantSpec, compute_qparams, default_g_idx, dequantize, expand_groups, quantize


@dataclass
class QuantizedWeight:
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    g_idx: torch.Tensor
    lut: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def sym(self) -> bool:
        return self.zero is None

    @property
    def act_order(self) -> bool:
        return not torch.equal(self.g_idx, default_g_idx(self.shape[1], self.group_size))

    def zeros(self) -> torch.Tensor:
        """Zero points ``[N, G]`` (explicit or the implicit symmetric ``2^(bits-1)``)."""
        if self.zero is not None:
            return self.zero
        return torch.full_like(self.scale, 2 ** (self.bits - 1))

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[N, K]``."""
        if self.lut is not None:
            w = torch.gather(self.lut.float(), 1, self.codes.long())
            if self.meta.get("lut_scaled"):  # NUPES separable layout: w = scale[n, g_idx[k]] * lut[n, code]
                w = expand_groups(self.scale.float(), self.g_idx) * w
            return w
        return dequantize(self.codes, self.scale, self.zeros(), self.g_idx)

    def nbytes_packed(self) -> int:
        """Storage bytes as exported: packed codes + fp16 scales (+ packed zeros / LUT)."""
        n, k = self.shape
        total = -(-n * k * self.bits // 8) + self.scale.numel() * 2
        if self.zero is not None:
            total += -(-self.zero.numel() * self.bits // 8)
        if self.lut is not None:
            total += self.lut.numel() * 2
        return total

    @classmethod
    def from_float(cls, w: torch.Tensor, spec: QuantSpec) -> "QuantizedWeight":
        """Round-to-nearest quantization of ``w [N, K]``."""
        scale, zero = compute_qparams(w, spec)
        gs = spec.gsize(w.shape[1])
        g_idx = default_g_idx(w.shape[1], gs)
        codes = quantize(w, scale, zero, spec.bits, g_idx)
        return cls(codes, scale, None if spec.sym else zero, spec.bits, gs, g_idx)
