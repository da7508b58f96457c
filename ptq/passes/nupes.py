"""NUPES / PowerQuant: non-uniform power-exponent weight quantization (Yvinec et al., arXiv 2308.05600).

Operator (see ptq.quant.power): ``q = round(sign(W)|W|^a / s)``, ``W^ = sign(q)(|q| s)^(1/a)``, ``s = r^a / L``
with ``r [N, G]`` the per-(row, group) range (``max |W|`` initially) and ``L = 2^(b-1) - 1``.

* ``mode: data-free`` (PowerQuant): per linear (``per_channel_exponent``: per output row) golden-section search
  of ``a in [a_min, a_max]`` minimizing ``||W - W^(a)||_F^2``.
* ``mode: data-driven`` (NUPES): start from the searched ``a`` (column-weighted by ``diag(H)``), then learn,
  jointly with Adam on the linear's output error over calibration inputs ``X [T, K]``

      loss = tr((W^ - W) H (W^ - W)^T) / tr(W H W^T),   H = X^T X / T   ``[K, K]``

  (i) a latent ``W~`` over the whole quantized space (codes may move by many levels, not only up/down),
  hard-quantized in the forward with an identity straight-through estimator ``dW^/dW~ = 1``;
  (ii) the exponent ``a`` and (iii) the ranges ``r`` by their exact gradients with the codes held fixed, in the
  normalized form ``W^ = sign(q) r (|q|/L)^(1/a)`` (identical to ``(|q| s)^(1/a)`` for ``s = r^a / L``):
  ``dW^/da = -W^ ln(|q|/L) / a^2`` is bounded (``|q| >= 1``, zero codes are masked), so the ``ln|w| -> -inf``
  instability of ``d|w|^a/da = |w|^a ln|w|`` never appears; ``|W~|`` is clamped to ``>= eps`` in the power map.
  ``a`` has its own small learning rate, its gradient norm is clipped, and it is projected on ``[a_min, a_max]``
  after every step. The best iterate (lowest loss of the *hard* quantized weights) is kept, and the result
  falls back to the data-free solution if training did not beat it.

Chosen exponents are reported in ``ctx.stats["<linear>.exponent"]`` (mean for per-channel exponents).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptq.pipeline import LayerContext, Pass
from ptq.quant.power import group_absmax, power_quantize, qmax, search_exponent, to_qweight
from ptq.quant.primitives import default_g_idx, expand_groups


def output_error(w_hat: torch.Tensor, w: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``tr((W^ - W) H (W^ - W)^T)`` for ``W [N, K]``, ``H [K, K]``."""
    e = w_hat - w
    return ((e @ H) * e).sum()


class HFactor:
    """``H ~= F F^T + diag(d)``: top-``rank`` eigenpairs ``F = U sqrt(Lambda)`` ``[K, r]`` plus the exact remaining
    diagonal ``d = diag(H - F F^T) >= 0`` ``[K]`` (``rank <= 0`` or ``>= K``: exact, ``d = 0``). The output error of
    ``E [N, K]`` per row is ``||E F||^2 + E^2 d``: cost ``N K r`` instead of ``N K^2``."""

    def __init__(self, H: torch.Tensor, rank: int = 128):
        H = H.double()
        lam, U = torch.linalg.eigh(H)
        lam = lam.clamp(min=0)
        k = H.shape[0]
        r = k if rank <= 0 or rank >= k else rank
        F = U[:, -r:] * lam[-r:].sqrt()
        self.F = F.float()
        self.d = (H.diagonal() - (F * F).sum(1)).clamp(min=0).float() if r < k else torch.zeros(k)

    def rows(self, e: torch.Tensor) -> torch.Tensor:
        """Per-row output error ``[N]``."""
        return (e @ self.F).pow(2).sum(1) + e.pow(2) @ self.d

    def total(self, e: torch.Tensor) -> torch.Tensor:
        return (e @ self.F).pow(2).sum() + (e.pow(2) @ self.d).sum()


def train_nupes(w: torch.Tensor, hf: HFactor, bits: int, gs: int, a0, steps: int = 60, lr: float = 5e-3,
                lr_exponent: float = 2e-3, lr_range: float = 1e-3, clip_exponent: float = 1.0,
                a_min: float = 0.2, a_max: float = 1.0, eps: float = 1e-8, learn_range: bool = True):
    """Data-driven NUPES for one linear ``w [N, K]`` with the input-moment factor ``hf`` (cosine lr decay).

    Returns ``(a, r, w_latent, history)``; ``a`` float or ``[N]``, ``r [N, G]``: quantize the result with
    ``power_quantize(w_latent, r^a / L, a, ...)``. ``history`` is the normalized loss of the hard weights per step.
    """
    w = w.float()
    n, k = w.shape
    L = qmax(bits)
    g_idx = default_g_idx(k, gs)
    per_channel = isinstance(a0, torch.Tensor) and a0.numel() > 1
    r0 = group_absmax(w, gs).clamp(min=eps)
    scale_n = expand_groups(r0, g_idx)  # latent is stored normalized by the initial range (Adam lr ~ 1/range)
    v = (w / scale_n).clone().requires_grad_(True)
    log_r = torch.zeros_like(r0, requires_grad=True)
    a_t = (a0.reshape(-1, 1).float().clone() if per_channel else torch.tensor(float(a0))).requires_grad_(True)
    groups = [{"params": [v], "lr": lr}, {"params": [a_t], "lr": lr_exponent}]
    if learn_range:
        groups.append({"params": [log_r], "lr": lr_range})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    norm = float(hf.total(w)) + 1e-30
    best = (float("inf"), None)
    hist = []
    for step in range(steps + 1):
        a = a_t.clamp(a_min, a_max)
        r = r0 * torch.exp(log_r)
        wl = v * scale_n  # latent weights [N, K]
        with torch.no_grad():  # codes: power map of the latent with |w~| >= eps, hard rounding
            s = torch.pow(r, a.detach()) / L
            u = torch.sign(wl) * torch.pow(wl.abs().clamp(min=eps), a.detach()) / expand_groups(s, g_idx)
            q = torch.clamp(torch.round(u), -L, L)
            nz = q != 0
            qn = q.abs().clamp(min=1) / L  # |q|/L in [1/L, 1]; zero codes masked below
        lvl = torch.sign(q) * torch.pow(qn, 1.0 / a) * nz  # grad to a: -lvl ln(|q|/L)/a^2, bounded
        w_hard = expand_groups(r, g_idx) * lvl
        w_q = w_hard + (wl - wl.detach())  # identity STE to the latent
        loss = hf.total(w_q - w) / norm
        lv = float(loss.detach())
        if not torch.isfinite(loss):
            break
        hist.append(lv)
        if lv < best[0]:
            best = (lv, (a.detach().clone(), r.detach().clone(), wl.detach().clone()))
        if step == steps:
            break
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([a_t], clip_exponent)
        opt.step()
        sched.step()
        with torch.no_grad():
            a_t.clamp_(a_min, a_max)
    a, r, wl = best[1]
    a = a.reshape(-1) if per_channel else float(a)
    return a, r, wl, hist


class NUPESPass(Pass):
    name = "nupes"
    needs_calibration = True
    quantizes_weights = True

    @dataclass
    class Options:
        mode: str = "data-driven"  # data-driven | data-free
        per_channel_exponent: bool = False
        a_min: float = 0.2
        a_max: float = 1.0
        grid: int = 17
        golden_iters: int = 12
        steps: int = 60
        rank: int = 128  # H ~= top-rank eigenpairs + exact diagonal remainder (<= 0: exact H)
        lr: float = 5e-3  # latent weights, in units of the per-group range
        lr_exponent: float = 2e-3
        lr_range: float = 1e-3
        clip_exponent: float = 1.0
        learn_range: bool = True
        max_tokens: int = 4096  # calibration tokens per linear used for H (random subsample)
        damp: float = 0.0  # H += damp * mean(diag H) * I
        seed: int = 0

        def __post_init__(self):
            if self.mode not in ("data-driven", "data-free"):
                raise ValueError(f"mode must be data-driven or data-free, got {self.mode!r}")
            if not 0 < self.a_min < self.a_max <= 1.0:
                raise ValueError("need 0 < a_min < a_max <= 1")

    def _gs(self, k: int) -> int:
        return k if self.spec.group_size == -1 else self.spec.group_size

    def _hessians(self, ctx: LayerContext, names: list[str]) -> dict[str, torch.Tensor]:
        """``H = X^T X / T`` ``[K, K]`` per linear; linears sharing an input share one H."""
        firsts = {}
        for n in names:
            g = ctx.lmap.group_of(n)
            firsts.setdefault(g.name, n)
        want = set(firsts.values())
        total = sum(b.hidden.shape[0] * b.hidden.shape[1] for b in ctx.batches)
        keep = min(1.0, self.opts.max_tokens / max(total, 1))
        gen = torch.Generator().manual_seed(self.opts.seed + ctx.index)
        acc: dict[str, list] = {}

        def fn(name, x):
            if name not in want:
                return
            if keep < 1.0:
                x = x[torch.rand(x.shape[0], generator=gen) < keep]
            h, t = acc.get(name, (0.0, 0))
            acc[name] = (h + x.T @ x, t + x.shape[0])

        ctx.collect_inputs(sorted(want), fn)
        out = {}
        for n in names:
            h, t = acc[firsts[ctx.lmap.group_of(n).name]]
            H = h / max(t, 1)
            if self.opts.damp > 0:
                H = H + self.opts.damp * H.diagonal().mean() * torch.eye(H.shape[0])
            out[n] = H
        return out

    def apply(self, ctx: LayerContext) -> None:
        o = self.opts
        names = ctx.linears()
        data = o.mode == "data-driven" and bool(ctx.batches)
        Hs = self._hessians(ctx, names) if data else {}
        factors: dict[int, HFactor] = {}
        bits = self.spec.bits
        for name in names:
            lin = ctx.module(name)
            w = lin.weight.data.float()
            gs = self._gs(w.shape[1])
            g_idx = default_g_idx(w.shape[1], gs)
            H = Hs.get(name)
            hf = None
            if H is not None:
                hf = factors.get(id(H)) or factors.setdefault(id(H), HFactor(H, o.rank))
            a0, _ = search_exponent(w, bits, self.spec.group_size, o.per_channel_exponent, o.a_min, o.a_max,
                                    o.grid, o.golden_iters, err_fn=hf.rows if hf is not None else None)
            qw = _quantize(w, a0, bits, gs, g_idx)
            a = a0
            if hf is not None and o.steps > 0:
                err0 = float(hf.total(qw.dequantize() - w))
                with torch.enable_grad():
                    a1, r1, wl, _ = train_nupes(w, hf, bits, gs, a0, o.steps, o.lr, o.lr_exponent, o.lr_range,
                                                o.clip_exponent, o.a_min, o.a_max, learn_range=o.learn_range)
                s1 = torch.pow(r1, a1 if isinstance(a1, float) else a1.reshape(-1, 1)) / qmax(bits)
                qw1 = to_qweight(power_quantize(wl, s1, a1, bits, g_idx), s1, a1, bits, gs, g_idx)
                err1 = float(hf.total(qw1.dequantize() - w))
                norm = float(hf.total(w)) + 1e-30
                ctx.stats[f"{name}.out_err_search"] = err0 / norm
                ctx.stats[f"{name}.out_err"] = min(err0, err1) / norm
                ctx.stats[f"{name}.exponent_search"] = _mean(a0)
                if err1 < err0:
                    qw, a = qw1, a1
            deq = qw.dequantize()
            ctx.stats[f"{name}.exponent"] = _mean(a)
            ctx.stats[f"{name}.wmse"] = float((deq - w).pow(2).mean())
            lin.weight.data = deq.to(lin.weight.dtype)
            ctx.qweights[ctx.prefix + name] = qw


def _quantize(w, a, bits, gs, g_idx):
    from ptq.quant.power import power_scale

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
