"""SmoothQuant (Xiao et al., ICML 2023) baseline on the OS+ folding machinery: per-channel migration of the
activation range into the weights, no shift, no search.

For the group input ``X [T, C]`` and its linears ``W_k [O_k, C]``:

    s_j = max_t |X_tj|^alpha / max_{k,o} |W_k[o, j]|^(1 - alpha)        (Eq. 4 of the paper)

then ``X <- X / s`` (folded into the producing norm, or up_proj's output rows for down_proj) and
``W_k <- W_k diag(s)``. ``max_t |X_tj|`` runs over every calibration token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptq.passes.migration import fold_scale
from ptq.pipeline import LayerContext, Pass


def smooth_scales(xmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s [C]`` from the activation absmax ``xmax [C]`` and the linears ``W_k [O_k, C]`` sharing the input."""
    wmax = torch.stack([w.abs().float().amax(0) for w in weights]).amax(0)
    s = xmax.float().clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


class SmoothQuantPass(Pass):
    name = "smoothquant"
    needs_calibration = True

    @dataclass
    class Options:
        alpha: float = 0.5
        down_proj: bool = False  # also migrate up_proj -> down_proj (gated MLPs)

    @torch.no_grad()
    def apply(self, ctx: LayerContext) -> None:
        if not ctx.batches:
            raise ValueError("smoothquant needs calibration data")
        if not 0 <= self.opts.alpha <= 1:
            raise ValueError(f"smoothquant: alpha must be in [0, 1], got {self.opts.alpha}")
        present = set(ctx.linears())
        groups = [g for g in ctx.lmap.groups if g.prev_is_norm or
                  (self.opts.down_proj and ctx.lmap.mlp_kind == "gated" and g.name == "mlp_out")]
        for g in groups:
            if not all(n in present for n in g.linears):
                continue
            xmax = torch.zeros(ctx.module(g.linears[0]).in_features)

            def fn(_n, x):
                torch.maximum(xmax, x.abs().amax(0), out=xmax)

            ctx.collect_inputs(g.linears[:1], fn)
            lins = [ctx.module(n) for n in g.linears]
            s = smooth_scales(xmax, [lin.weight.data for lin in lins], self.opts.alpha)
            fold_scale(ctx.module(g.prev), lins, s, ctx.lmap.norm_offset if g.prev_is_norm else 0.0)
            ctx.stats[f"{g.name}.sq_smax"] = float(s.max())
            ctx.stats[f"{g.name}.sq_smin"] = float(s.min())
