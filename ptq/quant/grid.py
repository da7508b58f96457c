"""The uniform grid of a range: scale and zero point from ``(xmin, xmax)`` (GPTQ quant.py, Frantar et al. 2023).

Kept apart from ptq.quant.primitives so that the clipping searches (ptq.quant.clipping), which primitives uses,
can build grids without an import cycle.
"""
from __future__ import annotations

import torch


def minmax_qparams(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool):
    """Scale and (float, integral) zero from ranges. Shapes broadcast; returns ``(scale, zero)``."""
    maxq = 2**bits - 1
    xmin = torch.clamp(xmin, max=0)
    xmax = torch.clamp(xmax, min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
    xmax = torch.where(dead, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero
