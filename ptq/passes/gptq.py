"""GPTQ rounding (Frantar et al., ICLR 2023): quantize a weight column by column and push each column's
rounding error onto the not-yet-quantized columns through the inverse Hessian of the layer's input.

For ``W [N, K]`` and calibration inputs ``X [T, K]``:  ``H = 2/T * X^T X  [K, K]`` (fp32, running average),
dampened ``H += damp * mean(diag H) * I``, ``H^-1 = U^T U`` (U upper Cholesky factor of the inverse). Column i:
``q_i = Q(w_i)``, ``err_i = (w_i - q_i) / U_ii``, ``W[:, j>i] -= err_i * U[i, j>i]`` (lazily per 128-column block).
Options: act-order (columns by descending ``diag H``), static groups (qparams fixed on the unpermuted W), and
true-sequential (Hessians of a sub-block are collected after the previous sub-block was quantized). Linears
that share an input (q/k/v, gate/up) share one Hessian.

Mixture of experts (ptq.moe): each expert's linears get the Hessian of the tokens the router sends to that expert
(the forward hook on the expert's linear sees only those). All experts' gate/up are calibrated in one pass over the
data, then all downs. Fallback rule: a linear whose Hessian saw fewer than ``min_tokens`` tokens (default 16) is
quantized with RTN; the layer's report lists ``moe.routed_tokens`` per expert and ``moe.fallback_experts``.

Static groups are the default. Their qparams come from the original weights in contiguous groups (the RTN grid),
so error feedback can push an updated weight out of range only to be clipped, never widen a group's scale. On
SmolLM2-135M (massive activations; Austen calibration, W3 g64, 40 wikitext-2 windows) dynamic act-order groups
gave perplexity 104.1 (worse than RTN's 94.2), and static groups gave 80.3. Static groups also keep ``g_idx``
trivial, so every exporter and kernel takes the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ptq import moe
from ptq.pipeline import LayerContext, Pass
from ptq.quant.hessian import inverse_cholesky_factor
from ptq.quant.primitives import QuantSpec, compute_qparams
from ptq.quant.qweight import QuantizedWeight


class HessianAccumulator:
    """Running ``H = 2/n * sum x x^T`` over token rows ``x [t, K]`` (fp32)."""

    def __init__(self, k: int):
        self.H = torch.zeros(k, k, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        m = x.shape[0]
        if m == 0:
            return
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * math.sqrt(2 / self.n)
        self.H += x.T @ x


def _qparams_cols(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero ``[N]`` for a column block ``w [N, g]`` (one group)."""
    s, z = compute_qparams(w, QuantSpec(spec.bits, -1, spec.sym, spec.mse, spec.clip))
    return s[:, 0], z[:, 0]


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, block_size: int = 128, damp: float = 0.01,
                  act_order: bool = False, static_groups: bool = False,
                  return_updated: bool = False) -> tuple[QuantizedWeight, dict]:
    """GPTQ of ``W [N, K]`` with Hessian ``H [K, K]`` -> (QuantizedWeight, info {loss, damp}). With
    ``return_updated`` info["updated"] ``[N, K]`` holds each column as it was just before rounding (after the
    error feedback of the earlier columns): ``codes = clamp(round(updated / s) + z)``."""
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    N, K = W.shape
    gs = spec.gsize(K)
    G = spec.groups(K)
    maxq = spec.maxq
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scale = torch.zeros(N, G)
    zero = torch.zeros(N, G)
    if spec.group_size == -1 or static_groups:  # qparams fixed up front on the unpermuted W
        for g in range(G):
            scale[:, g], zero[:, g] = _qparams_cols(W[:, g * gs:(g + 1) * gs], spec)

    perm = torch.arange(K)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    U, used_damp = inverse_cholesky_factor(H, damp)

    codes = torch.zeros(N, K, dtype=torch.uint8)
    updated = torch.zeros(N, K) if return_updated else None
    g_idx = torch.zeros(K, dtype=torch.int32)
    losses = torch.zeros(N)
    dynamic_groups = spec.group_size != -1 and not static_groups
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if dynamic_groups:
                g = col // gs
                if col % gs == 0:  # refit on the current, error-updated columns of this group
                    cols = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :gs]
                    scale[:, g], zero[:, g] = _qparams_cols(cols, spec)
            else:
                g = int(perm[col]) // gs
            g_idx[perm[col]] = g
            w = W1[:, i]
            s, z = scale[:, g], zero[:, g]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            codes[:, col] = q.to(torch.uint8)
            if updated is not None:
                updated[:, col] = w
            wq = s * (q - z)
            d = U1[i, i]
            losses += (w - wq) ** 2 / d**2 / 2
            err = (w - wq) / d
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    inv = torch.argsort(perm)
    codes = codes[:, inv]
    qw = QuantizedWeight(codes, scale, None if spec.sym else zero, spec.bits, gs, g_idx)
    info = {"loss": float(losses.sum()), "damp": used_damp}
    if updated is not None:
        info["updated"] = updated[:, inv]
    return qw, info


class GPTQPass(Pass):
    name = "gptq"
    needs_calibration = True
    quantizes_weights = True
    mixed_bits = True  # reads per-linear widths (ctx.spec_for)

    @dataclass
    class Options:
        act_order: bool = True
        true_sequential: bool = True
        damp: float = 0.01
        block_size: int = 128
        static_groups: bool = True  # see the module docstring
        min_tokens: int = 16  # a linear whose Hessian saw fewer tokens (a starved MoE expert) gets RTN instead

    @staticmethod
    def _stages(ctx: LayerContext, present: set[str], true_sequential: bool) -> list[list[str]]:
        """Linears calibrated together: one stage per group (true-sequential), except that groups sharing a
        ``LinearGroup.stage`` (MoE experts, ptq.moe) form one stage; their Hessians (one per group) are then
        split into chunks of at most the layer's own weight bytes, so peak memory stays about one layer."""
        if not true_sequential:
            return [[n for n in ctx.lmap.linears() if n in present]]
        stages: dict[str, list] = {}
        for g in ctx.lmap.groups:
            names = [n for n in g.linears if n in present]
            if names:
                stages.setdefault(getattr(g, "stage", "") or g.name, []).append(names)
        budget = sum(p.numel() * p.element_size() for p in ctx.layer.parameters())
        out = []
        for groups in stages.values():
            chunk, used = [], 0
            for names in groups:
                k = ctx.module(names[0]).in_features
                if chunk and used + 4 * k * k > budget:
                    out.append(chunk)
                    chunk, used = [], 0
                chunk += names
                used += 4 * k * k
            out.append(chunk)
        return out

    keep_updated = False  # learned rounding sets this to read GPTQ's pre-rounding weights from self.updated

    def _hessians(self, ctx: LayerContext, names: list[str]) -> dict[str, HessianAccumulator]:
        """One accumulator per distinct input (linears of a group share it)."""
        owner = {}
        for n in names:
            g = ctx.lmap.group_of(n)
            owner[n] = next(m for m in g.linears if m in names)
        accs = {o: HessianAccumulator(ctx.module(o).in_features) for o in set(owner.values())}

        def fn(name, x):
            if name in accs:
                accs[name].add(x)

        ctx.collect_inputs(sorted(accs), fn)
        return {n: accs[owner[n]] for n in names}

    @torch.no_grad()
    def apply(self, ctx: LayerContext) -> None:
        if not ctx.batches:
            raise ValueError("GPTQ needs calibration data")
        present = set(ctx.linears())
        o = self.opts
        for names in filter(None, self._stages(ctx, present, o.true_sequential)):
            hs = self._hessians(ctx, names)
            for n in names:
                lin = ctx.module(n)
                fallback = hs[n].n < o.min_tokens
                moe.note_expert(ctx, n, hs[n].n, fallback)
                if fallback:  # too few tokens for a meaningful Hessian (e.g. an MoE expert the router starves)
                    qw = QuantizedWeight.from_float(lin.weight.data, ctx.spec_for(n, self.spec))
                    deq = qw.dequantize()
                    ctx.stats[f"{n}.wmse"] = float((deq - lin.weight.data.float()).pow(2).mean())
                    lin.weight.data = deq.to(lin.weight.dtype)
                    ctx.qweights[ctx.prefix + n] = qw
                    del hs[n]
                    continue
                qw, info = gptq_quantize(lin.weight.data, hs[n].H, ctx.spec_for(n, self.spec), o.block_size,
                                         o.damp, o.act_order, o.static_groups, return_updated=self.keep_updated)
                if self.keep_updated:
                    self.updated = getattr(self, "updated", {})
                    self.updated[n] = info["updated"]
                del hs[n]  # the last reference frees the Hessian
                deq = qw.dequantize()
                ctx.stats[f"{n}.gptq_loss"] = info["loss"]
                ctx.stats[f"{n}.wmse"] = float((deq - lin.weight.data.float()).pow(2).mean())
                if info["damp"] != o.damp:
                    ctx.stats[f"{n}.damp"] = info["damp"]
                lin.weight.data = deq.to(lin.weight.dtype)
                ctx.qweights[ctx.prefix + n] = qw
