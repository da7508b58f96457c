"""Clipping-range searches for weight quantization (pure functions, shared by RTN, GPTQ and learned rounding).

Every function takes weights grouped as ``wg [N, G, gs]`` (rows x groups x group width; ``valid [G, gs]``
marks real columns when the last group is padded) and returns the clipped range ``(lo, hi)`` of each group,
``[N, G]`` each, which `minmax_qparams` turns into a scale and zero exactly as for plain min/max.

OCTAV (Sakr et al., ICML 2022, Eq. 6): for a symmetric B-bit grid clipped at ``s`` the quantization MSE is

    J(s) = (Delta(s)^2 / 12) * P(|x| <= s) + E[(|x| - s)^2 1{|x| > s}]

and ``dJ/ds = 0`` gives the Newton-Raphson fixed point

    s_{n+1} = E[|x| 1{|x| > s_n}] / ( c * E[1{|x| <= s_n}] + E[1{|x| > s_n}] ),   c = Delta(s)^2 / (12 s^2).

The paper's grid has step ``Delta = s * 2^(1-B)``, so ``c = 4^-B / 3``. This toolkit's grid (GPTQ's) has
``2^B - 1`` steps across ``[-s, s]``: ``Delta = 2 s / (2^B - 1)`` and ``c = 1 / (3 (2^B - 1)^2)``; we use the
coefficient of the grid that is actually applied (`octav_coefficient`).

Asymmetric variant (derived here the same way, documented in docs/learned_rounding.md): for a grid over
``[lo, hi]`` with ``Delta = (hi - lo) / (2^B - 1)``, setting ``dJ/dhi = dJ/dlo = 0`` with ``k = c' P(lo<=x<=hi)``,
``c' = 1 / (12 (2^B - 1)^2)``, gives the coupled fixed point

    hi = (E[x 1{x > hi}] + k lo) / (k + P(x > hi)),     lo = (E[x 1{x < lo}] + k hi) / (k + P(x < lo))

which reduces to the symmetric OCTAV iteration when the distribution is symmetric.

Both OCTAV variants are *guarded*: a group keeps its min/max range when the clipped range quantizes that group
with a larger squared error (small groups can make the fixed point land on a worse stationary point).
"""
from __future__ import annotations

import torch

from ptq.quant.grid import minmax_qparams

CLIP_MODES = ("none", "mse", "octav")


def octav_coefficient(bits: int) -> float:
    """``c = Delta^2 / (12 s^2)`` for this toolkit's grid (``2^B - 1`` steps across ``[-s, s]``)."""
    return 1.0 / (3.0 * (2**bits - 1) ** 2)


def octav_scalar_objective(x: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """OCTAV's analytical MSE ``J(s)`` of 1-D data ``x [n]`` at clip values ``s [m]`` -> ``[m]``."""
    a = x.abs()[None, :]
    s = s[:, None]
    inside = (a <= s).float()
    return (octav_coefficient(bits) * s[:, 0] ** 2 * inside.mean(1)
            + ((a - s).clamp(min=0) ** 2).mean(1))


def octav_symmetric(a: torch.Tensor, bits: int, valid: torch.Tensor | None = None, iters: int = 30,
                    ) -> torch.Tensor:
    """OCTAV fixed point on magnitudes ``a [..., n]`` (``|x|``) reducing the last axis -> ``s [...]``.

    Starts at ``mean|x| * 3`` clipped to ``max|x|`` (never at ``max|x|``: there the clipped set is empty and the
    next iterate is 0), stops when no value changes.
    """
    a = a.float()
    m = torch.ones_like(a) if valid is None else valid.expand_as(a).float()
    n = m.sum(-1).clamp(min=1)
    amax = (a * m).amax(-1)
    s = torch.minimum(3 * (a * m).sum(-1) / n, amax)
    c = octav_coefficient(bits)
    for _ in range(iters):
        out = (a > s[..., None]).float() * m
        inside = m.sum(-1) - out.sum(-1)
        num = (a * out).sum(-1)
        den = c * inside + out.sum(-1)
        s_new = torch.where(den > 0, num / den.clamp(min=1e-30), amax)
        s_new = torch.where(num > 0, s_new, amax)  # nothing clipped: the full range
        s_new = torch.minimum(s_new, amax)
        if torch.equal(s_new, s):
            break
        s = s_new
    return torch.where(amax > 0, s, torch.ones_like(s))


def octav_asymmetric(x: torch.Tensor, bits: int, valid: torch.Tensor | None = None, iters: int = 30,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric OCTAV fixed point (module docstring) on ``x [..., n]`` -> ``(lo, hi)`` each ``[...]``."""
    x = x.float()
    m = torch.ones_like(x) if valid is None else valid.expand_as(x).float()
    big = torch.finfo(x.dtype).max
    xmax = torch.where(m > 0, x, torch.full_like(x, -big)).amax(-1).clamp(min=0)
    xmin = torch.where(m > 0, x, torch.full_like(x, big)).amin(-1).clamp(max=0)
    n = m.sum(-1).clamp(min=1)
    mu = (x * m).sum(-1) / n
    sd = (((x - mu[..., None]) ** 2) * m).sum(-1).div(n).sqrt()
    hi = torch.minimum(mu + 3 * sd, xmax).clamp(min=0)
    lo = torch.maximum(mu - 3 * sd, xmin).clamp(max=0)
    c = 1.0 / (12.0 * (2**bits - 1) ** 2)
    for _ in range(iters):
        above = (x > hi[..., None]).float() * m
        below = (x < lo[..., None]).float() * m
        k = c * (m.sum(-1) - above.sum(-1) - below.sum(-1))
        hi_new = ((x * above).sum(-1) + k * lo) / (k + above.sum(-1)).clamp(min=1e-30)
        lo_new = ((x * below).sum(-1) + k * hi) / (k + below.sum(-1)).clamp(min=1e-30)
        hi_new = torch.where(above.sum(-1) > 0, hi_new, xmax).clamp(0)
        lo_new = torch.where(below.sum(-1) > 0, lo_new, xmin).clamp(max=0)
        hi_new, lo_new = torch.minimum(hi_new, xmax), torch.maximum(lo_new, xmin)
        if torch.equal(hi_new, hi) and torch.equal(lo_new, lo):
            break
        hi, lo = hi_new, lo_new
    return lo, hi


def _group_error(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, sym: bool, norm: float,
                 valid: torch.Tensor | None) -> torch.Tensor:
    """``sum |w - Q(w)|^norm`` per group for the grid of range ``(lo, hi)``; ``wg [N, G, gs]`` -> ``[N, G]``."""
    s, z = minmax_qparams(lo, hi, bits, sym)
    q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, 2**bits - 1)
    e = (s[..., None] * (q - z[..., None]) - wg).abs() ** norm
    if valid is not None:
        e = e * valid
    return e.sum(-1)


def grid_clip(wg: torch.Tensor, bits: int, sym: bool, valid: torch.Tensor | None = None, grid: int = 100,
              maxshrink: float = 0.8, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ quant.py ``mse=True``: shrink the min/max range by ``p in {1, 1-1/grid, ..., 1-maxshrink}`` per
    group, keep the ``p`` minimising ``sum |w - Q(w)|^norm``. ``wg [N, G, gs]`` -> ``(lo, hi) [N, G]``."""
    lo0, hi0 = _minmax(wg, valid)
    best = torch.full_like(lo0, float("inf"))
    lo, hi = lo0.clone(), hi0.clone()
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        err = _group_error(wg, p * lo0, p * hi0, bits, sym, norm, valid)
        better = err < best
        best = torch.where(better, err, best)
        lo = torch.where(better, p * lo0, lo)
        hi = torch.where(better, p * hi0, hi)
    return lo, hi


def octav_clip(wg: torch.Tensor, bits: int, sym: bool, valid: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """OCTAV range per group (symmetric or the asymmetric variant), guarded against min/max (module docstring).
    ``wg [N, G, gs]`` -> ``(lo, hi) [N, G]``."""
    lo0, hi0 = _minmax(wg, valid)
    if sym:
        s = octav_symmetric(wg.abs(), bits, valid)
        lo, hi = -s, s
    else:
        lo, hi = octav_asymmetric(wg, bits, valid)
    worse = _group_error(wg, lo, hi, bits, sym, 2.0, valid) > _group_error(wg, lo0, hi0, bits, sym, 2.0, valid)
    return torch.where(worse, lo0, lo), torch.where(worse, hi0, hi)


def _minmax(wg: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if valid is None:
        return wg.amin(-1), wg.amax(-1)
    zero = torch.zeros_like(wg)  # padded columns are 0, which min/max include anyway (ranges contain 0)
    return torch.where(valid > 0, wg, zero).amin(-1), torch.where(valid > 0, wg, zero).amax(-1)


def clip_range(wg: torch.Tensor, bits: int, sym: bool, mode: str, valid: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Range ``(lo, hi) [N, G]`` of each group of ``wg [N, G, gs]`` under clip ``mode`` (none | mse | octav)."""
    if mode == "none":
        return _minmax(wg, valid)
    if mode == "mse":
        return grid_clip(wg, bits, sym, valid)
    if mode == "octav":
        return octav_clip(wg, bits, sym, valid)
    raise ValueError(f"clip must be one of {', '.join(CLIP_MODES)}, got {mode!r}")
