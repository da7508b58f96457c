"""Outlier Suppression+ (Wei et al., EMNLP 2023, arXiv 2304.09145): channel-wise shift and scale of the
activations feeding each norm-fed group of linears (q/k/v, gate/up or fc1; optionally up_proj -> down_proj),
folded exactly into the producer and the linears (ptq.passes.migration).

For the group input ``X [T, C]`` (``search_samples`` calibration samples, the official code uses one batch):

* shift  ``z_j = (max_t X_tj + min_t X_tj) / 2``;  ``X' = X - z``,  ``b_k <- b_k + W_k z``
* scale  ``s_j = max(1, max_t |X'_tj| / t)``;  ``X'' = X' / s``,  ``W_k <- W_k diag(s)``
* ``t`` is found by a grid from ``T = max_j max_t |X'_tj|`` down to ``lower_bound`` (1.0 with LayerNorm,
  0.1 with RMSNorm, as the official OPT / LLaMA code) in ``num = min(max(grid, T / 0.5), max_steps)`` steps,
  minimizing ``L(t) = mean_tokens sum_features (f(Q_a(X''); Q_w(W diag s)) - f(X; W))^2`` where f is the
  sub-module function (attention output before o_proj for q/k/v; ``act(gate) * up`` for gated MLPs; the linear
  output for OPT fc1 and down_proj), ``Q_w`` RTN at the recipe's weight spec and ``Q_a`` the recipe's
  activation quantizer (per-token dynamic, or per-tensor static with clip ``(-t, t)``).

Shift on RMSNorm (no bias, option ``shift: on``, Llama only): the linears get explicit biases ``W z``
(``config.attention_bias = mlp_bias = True``, zero biases for o_proj / down_proj) and their inputs an explicit
``input_shift = z / s`` (exported with the activation quantizers, see ptq.passes.act_quant). ``shift: auto``
shifts only where the norm has a bias (OPT), like the reference code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptq.passes.act_quant import ActStateMixin, export_spec, quantizer_of
from ptq.passes.migration import (SubModule, add_bias, fold_scale, fold_shift, make_act_quant,
                                  quantized_loss)
from ptq.pipeline import LayerContext, Pass


def search_scale(sub: SubModule, ref: list[torch.Tensor], xs: list[torch.Tensor], wspec, act_q,
                 lower_bound: float, grid: int, max_steps: int) -> tuple[torch.Tensor, float, dict]:
    """Grid search of the outlier threshold ``t`` on (already shifted) inputs ``xs [b, L, C]``.
    Returns ``(s [C], t, info)``."""
    amax = torch.cat([x.reshape(-1, x.shape[-1]).abs().float() for x in xs]).amax(0)
    T = float(amax.max())
    ones = torch.ones_like(amax)
    base = quantized_loss(sub, ref, xs, ones, wspec, act_q, (-T, T))
    best, best_t, best_s = base, T, ones
    if T > lower_bound:
        num = min(max(grid, int(T / 0.5)), max_steps)
        step = (T - lower_bound) / num
        for i in range(1, num + 1):
            t = T - i * step
            s = torch.clamp(amax / t, min=1.0)
            loss = quantized_loss(sub, ref, xs, s, wspec, act_q, (-t, t))
            if loss < best:
                best, best_t, best_s = loss, t, s
    return best_s, best_t, {"loss_noscale": base, "loss": best, "T": T}


class OSPlusPass(ActStateMixin, Pass):
    name = "os+"
    needs_calibration = True

    @dataclass
    class Options:
        shift: str = "auto"  # auto: where the norm has a bias | on: also RMSNorm (explicit biases) | off
        lower_bound: float | None = None  # None: 1.0 with LayerNorm, 0.1 with RMSNorm
        grid: int = 100
        max_steps: int = 400
        search_samples: int = 4  # calibration samples used for the statistics and the search
        down_proj: bool = False  # also migrate up_proj -> down_proj (scale only; gated MLPs)
        act_sym: bool = False
        weight_quant: bool = True  # RTN fake-quant of the weights inside the search

    def setup(self, sm) -> None:
        super().setup(sm)
        o = self.opts
        if o.shift not in ("auto", "on", "off"):
            raise ValueError(f"os+: shift must be auto, on or off, got {o.shift!r}")
        self.rms_shift = o.shift == "on" and not sm.lmap.norm_has_bias
        if self.rms_shift:
            if sm.lmap.arch != "llama":
                raise ValueError("os+: shift on RMSNorm needs explicit linear biases; supported for llama "
                                 "(config.attention_bias / mlp_bias) only")
            sm.config.attention_bias = True
            sm.config.mlp_bias = True

    def _groups(self, ctx: LayerContext):
        gs = [g for g in ctx.lmap.groups if g.prev_is_norm]
        if self.opts.down_proj and ctx.lmap.mlp_kind == "gated":
            gs += [g for g in ctx.lmap.groups if g.name == "mlp_out"]
        present = set(ctx.linears())
        return [g for g in gs if all(n in present for n in g.linears)]

    @torch.no_grad()
    def apply(self, ctx: LayerContext) -> None:
        if not ctx.batches:
            raise ValueError("os+ needs calibration data")
        o = self.opts
        d = getattr(self, "defaults", None)
        act_q = make_act_quant(getattr(d, "act_bits", None), getattr(d, "act_granularity", "token"), o.act_sym)
        wspec = self.spec if o.weight_quant else None
        lb = o.lower_bound if o.lower_bound is not None else (1.0 if ctx.lmap.norm_has_bias else 0.1)
        batches = ctx.batches[:max(1, o.search_samples)]
        for g in self._groups(ctx):
            sub = SubModule(ctx, g, batches)
            prev = ctx.module(g.prev)
            ref = sub.reference()
            xs = [x.float() for x in sub.xs]
            z = None
            if g.prev_is_norm and o.shift != "off" and (ctx.lmap.norm_has_bias or self.rms_shift):
                X = sub.tokens()
                z = (X.amax(0) + X.amin(0)) / 2
                absorbed = fold_shift(prev, sub.lins, z)
                assert absorbed or self.rms_shift
                if absorbed:
                    z = None  # nothing left to apply on the inputs
                xs = [x - (X.amax(0) + X.amin(0)) / 2 for x in xs]
            s, t, info = search_scale(sub, ref, xs, wspec, act_q, lb, o.grid, o.max_steps)
            fold_scale(prev, sub.lins, s, ctx.lmap.norm_offset if g.prev_is_norm else 0.0)
            if z is not None:  # RMSNorm: the linears' inputs are (X - z) / s = X / s - z / s
                shift = (z / s).float()
                for n, lin in zip(g.linears, sub.lins):
                    quantizer_of(lin).shift = shift
                    ctx.extra[f"{ctx.prefix}{n}.input_shift"] = shift.clone()
            ctx.stats[f"{g.name}.os_t"] = t
            ctx.stats[f"{g.name}.os_smax"] = float(s.max())
            ctx.stats[f"{g.name}.os_loss"] = info["loss"]
            ctx.stats[f"{g.name}.os_loss_noscale"] = info["loss_noscale"]
        if self.rms_shift:  # config says every attention / MLP linear has a bias
            for n in ctx.linears():
                if ctx.module(n).bias is None:
                    add_bias(ctx.module(n))

    def finalize(self, sm) -> dict:
        return export_spec(sm)
