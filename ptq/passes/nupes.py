"""NUPES / PowerQuant: non-uniform power-exponent weight quantization (Yvinec et al., arXiv 2308.05600).

Operator (see ptq.quant.power): ``q = round_half(sign(W)|W|^a / s)``, ``W^ = sign(q)(|q| s)^(1/a)``, ``s = r^a / L``
with ``r [N, G]`` the per-(row, group) range ``max |W|``, ``L = 2^(b-1) - 1/2``: ``2^b`` half-integer levels.

* ``mode: data-free`` (PowerQuant): per linear (``per_channel_exponent``: per output row) grid + golden-section
  search of ``a in [a_min, a_max]`` minimizing ``||W - W^(a)||_F^2``.
* ``mode: data-driven`` (NUPES): per decoder layer, the exact input second moment ``H = X^T X [K, K]`` of every
  linear (accumulated as the GPTQ pass does, with its true-sequential stages: linears later in the layer see the
  outputs of the already quantized ones). Per linear:

  1. ``a_0``: the same exponent search on the output error ``tr(E H E^T)`` of round-to-nearest, ``E = W^ - W``;
  2. sequential rounding on the power grid (ptq.quant.power_gptq: GPTQ's error feedback through the Cholesky
     factor of ``H^-1``, projection to the nearest power level), which can move a weight across any number of
     levels of the quantized space;
  3. the exponent optimised with the rounding inside: ``tr(E H E^T)`` of step 2 at ``a_0`` and ``a_0 +- delta``, a
     parabola through the three, its vertex evaluated; the lowest error wins (per row with
     ``per_channel_exponent``: GPTQ rows are independent, so each row keeps its own best exponent).

Chosen exponents are reported in ``ctx.stats["<linear>.exponent"]`` (mean for per-channel exponents),
``exponent_search`` (``a_0``), ``out_err_rtn`` and ``out_err`` (``tr(E H E^T) / tr(W H W^T)``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptq.passes.gptq import GPTQPass
from ptq.pipeline import LayerContext
from ptq.quant.power import fake_quantize_power, power_quantize, power_scale, search_exponent, to_qweight
from ptq.quant.power_gptq import gptq_power, inverse_factor
from ptq.quant.primitives import default_g_idx


def _rows_err(e: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``diag(E H E^T)`` ``[N]``."""
    return ((e @ H) * e).sum(1)


class NUPESPass(GPTQPass):
    name = "nupes"
    needs_calibration = True
    quantizes_weights = True
    mixed_bits = False  # one bit width for every linear (self.spec), unlike GPTQ

    @dataclass
    class Options:
        mode: str = "data-driven"  # data-driven | data-free
        per_channel_exponent: bool = False
        a_min: float = 0.2
        a_max: float = 1.0
        grid: int = 17
        golden_iters: int = 12
        delta: float = 0.08  # data-driven: exponent step of the line search around a_0 (0: a_0 only)
        act_order: bool = True
        true_sequential: bool = True
        damp: float = 0.01
        block_size: int = 128
        min_tokens: int = 16  # fewer calibration tokens (starved MoE expert): data-free search instead

        def __post_init__(self):
            if self.mode not in ("data-driven", "data-free"):
                raise ValueError(f"mode must be data-driven or data-free, got {self.mode!r}")
            if not 0 < self.a_min < self.a_max <= 1.0:
                raise ValueError("need 0 < a_min < a_max <= 1")
            if self.delta < 0:
                raise ValueError("delta must be >= 0")

    def _gs(self, k: int) -> int:
        return k if self.spec.group_size == -1 else self.spec.group_size

    @torch.no_grad()
    def apply(self, ctx: LayerContext) -> None:
        o = self.opts
        present = set(ctx.linears())
        if o.mode == "data-free" or not ctx.batches:
            for name in sorted(present, key=ctx.lmap.linears().index):
                self._set(ctx, name, self._data_free(ctx.module(name).weight.data.float()))
            return
        for names in filter(None, self._stages(ctx, present, o.true_sequential)):
            hs = self._hessians(ctx, names)
            for n in names:
                w = ctx.module(n).weight.data.float()
                acc = hs.pop(n)
                if acc.n < o.min_tokens:
                    self._set(ctx, n, self._data_free(w))
                    continue
                qw, a, st = self._data_driven(w, acc.H)
                for k, v in st.items():
                    ctx.stats[f"{n}.{k}"] = v
                self._set(ctx, n, (qw, a))

    def _set(self, ctx, name, qa):
        qw, a = qa
        lin = ctx.module(name)
        deq = qw.dequantize()
        ctx.stats[f"{name}.exponent"] = _mean(a)
        ctx.stats[f"{name}.wmse"] = float((deq - lin.weight.data.float()).pow(2).mean())
        lin.weight.data = deq.to(lin.weight.dtype)
        ctx.qweights[ctx.prefix + name] = qw

    def _data_free(self, w):
        o, bits = self.opts, self.spec.bits
        gs = self._gs(w.shape[1])
        a, _ = search_exponent(w, bits, self.spec.group_size, o.per_channel_exponent, o.a_min, o.a_max,
                               o.grid, o.golden_iters)
        return _quantize(w, a, bits, gs, default_g_idx(w.shape[1], gs)), a

    def _data_driven(self, w: torch.Tensor, H: torch.Tensor):
        """(QuantizedWeight, exponent, stats) of ``w [N, K]`` with input moment ``H [K, K]`` (module docstring)."""
        o, bits = self.opts, self.spec.bits
        gs = self._gs(w.shape[1])
        g_idx = default_g_idx(w.shape[1], gs)
        pc = o.per_channel_exponent
        a0, _ = search_exponent(w, bits, self.spec.group_size, pc, o.a_min, o.a_max, o.grid, o.golden_iters,
                                err_fn=lambda e: _rows_err(e, H))
        norm = float(_rows_err(w, H).sum()) + 1e-30
        err_rtn = float(_rows_err(fake_quantize_power(w, a0, bits, self.spec.group_size) - w, H).sum())
        U = inverse_factor(H, o.damp, o.act_order)
        n = w.shape[0]
        tried = {}

        def run(a):  # a: [N] tensor (per row) -> per-row errors [N], codes, s
            key = tuple(torch.round(a * 1e6).tolist()) if pc else round(float(a[0]), 6)
            if key not in tried:
                aa = a if pc else float(a[0])
                s = power_scale(w, aa, bits, gs)
                codes, deq = gptq_power(w, H, aa, s, bits, g_idx, o.block_size, o.damp, o.act_order, U=U)
                tried[key] = (_rows_err(deq - w, H), codes, s, a.clone())
            return tried[key]

        base = a0.float() if pc else torch.full((n,), float(a0))
        cands = [base]
        if o.delta > 0:
            cands += [(base - o.delta).clamp(o.a_min, o.a_max), (base + o.delta).clamp(o.a_min, o.a_max)]
        res = [run(a) for a in cands]
        if len(res) == 3:  # parabola through (a0 - d, a0, a0 + d), per row (or for the sum), vertex in the bracket
            e = torch.stack([r[0] for r in res]) if pc else torch.stack([r[0].sum().expand(n) for r in res])
            em, e0, ep = e[1], e[0], e[2]
            curv = em + ep - 2 * e0
            step = torch.where(curv > 0, 0.5 * (em - ep) / curv.clamp_min(1e-30), torch.zeros_like(e0))
            vertex = (base + step.clamp(-1, 1) * o.delta).clamp(o.a_min, o.a_max)
            res.append(run(vertex))
        if pc:  # GPTQ rows are independent: each row keeps its best candidate
            errs = torch.stack([r[0] for r in res])  # [C, N]
            pick = errs.argmin(0)
            rows = torch.arange(n)
            codes = torch.stack([r[1] for r in res])[pick, rows]
            s = torch.stack([r[2] for r in res])[pick, rows]
            a = torch.stack([r[3] for r in res])[pick, rows]
            err = float(errs[pick, rows].sum())
        else:
            best = min(res, key=lambda r: float(r[0].sum()))
            err, codes, s, a = float(best[0].sum()), best[1], best[2], float(best[3][0])
        qw = to_qweight(codes, s, a, bits, gs, g_idx)
        return qw, a, {"exponent_search": _mean(a0), "out_err_rtn": err_rtn / norm, "out_err": err / norm}


def _quantize(w, a, bits, gs, g_idx):
    s = power_scale(w, a, bits, gs)
    return to_qweight(power_quantize(w, s, a, bits, g_idx), s, a, bits, gs, g_idx)


def _mean(a) -> float:
    return float(a.float().mean()) if isinstance(a, torch.Tensor) else float(a)


class NUPESDataFreePass(NUPESPass):
    """PowerQuant (data-free NUPES): no calibration data is loaded or used."""

    name = "nupes-df"
    needs_calibration = False

    @dataclass
    class Options(NUPESPass.Options):
        mode: str = "data-free"

        def __post_init__(self):
            super().__post_init__()
            if self.mode != "data-free":
                raise ValueError("nupes-df is data-free; use the `nupes` pass for mode: data-driven")
