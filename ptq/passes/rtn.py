"""RTN: round-to-nearest min/max quantization of every linear of a layer (the baseline).

For ``W [N, K]``: ``q = clamp(round(W / s) + z, 0, 2^b - 1)`` per row and group (see ptq.quant.primitives).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptq.pipeline import LayerContext, Pass
from ptq.quant.qweight import QuantizedWeight


class RTNPass(Pass):
    name = "rtn"
    needs_calibration = False
    quantizes_weights = True
    mixed_bits = True  # reads per-linear widths (ctx.spec_for)

    @dataclass
    class Options:
        pass

    @torch.no_grad()
    def apply(self, ctx: LayerContext) -> None:
        for name in ctx.linears():
            lin = ctx.module(name)
            w = lin.weight.data
            qw = QuantizedWeight.from_float(w, ctx.spec_for(name, self.spec))
            deq = qw.dequantize()
            ctx.stats[f"{name}.wmse"] = float((deq - w.float()).pow(2).mean())
            lin.weight.data = deq.to(w.dtype)
            ctx.qweights[ctx.prefix + name] = qw
