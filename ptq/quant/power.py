"""Power-exponent (PowerQuant / NUPES) weight quantization primitives.

PowerQuant (Yvinec et al., ICLR 2023) and NUPES (Yvinec et al., TPAMI 2025) quantize in the power domain of the
automorphism ``P_a(x) = sign(x)|x|^a`` of (R*, x). For ``W [N, K]`` with groups along K (``G = ceil(K/gs)``,
``gs = K`` per channel) and ``L = 2^(b-1) - 1/2``:

    s[n, g]  = max_{k in g} |W[n, k]|^a / L                        (power-domain scale, eq. PowerQuant-3)
    q[n, k]  = clamp(floor(sign(W)|W|^a / s[n, g(k)]) + 1/2, -L, L) (half-integer, symmetric "mid-rise" grid)
    W^[n, k] = sign(q) (|q| s)^(1/a)                                 (dequantization)

The grid has ``2^b`` levels ``q in {-L, ..., -1/2, 1/2, ..., L}``: as many as the asymmetric uniform grid it is
compared with (a symmetric grid with an exact zero has only ``2^b - 1``). Zero is not a level, but for ``a < 1``
the innermost level ``(s/2)^(1/a)`` is tiny. ``a = 1`` is the uniform grid over ``[-absmax, absmax]`` with
``2^b`` levels, spacing ``s = absmax / L``.

Storage / LUT layout (what `to_qweight` builds; see docs/nupes.md). The dequantization is separable:
``(|q| s)^(1/a) = s^(1/a) * |q|^(1/a)``, so with unsigned codes ``c = q + L`` in ``[0, 2^b - 1]``:

    lut[n, c]   = sign(c - L) |c - L|^(1/a[n])                    ``[N, 2^b]`` unit levels (every code used)
    scale[n, g] = s[n, g]^(1/a[n])                                 ``[N, G]`` linear-domain scale
    W^[n, k]    = scale[n, g_idx[k]] * lut[n, codes[n, k]]         (``QuantizedWeight.dequantize``, meta lut_scaled)

Rows of ``lut`` are identical for a per-layer exponent; per-channel exponents give one row per output channel.
The exporter folds ``scale`` into the LUT for per-channel scales (2^b real levels per channel).

Exponents ``a`` are a python float (per layer) or a tensor ``[N]`` (per output channel).
"""
from __future__ import annotations

import math

import torch

from ptq.quant.primitives import default_g_idx, expand_groups
from ptq.quant.qweight import QuantizedWeight


def qmax(bits: int) -> float:
    """Largest level ``L = 2^(b-1) - 1/2`` of the half-integer grid (codes ``c = q + L``)."""
    return 2 ** (bits - 1) - 0.5


def round_half(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest grid level ``clamp(floor(u) + 1/2, -L, L)`` of the power-domain value ``u``."""
    L = qmax(bits)
    return torch.clamp(torch.floor(u) + 0.5, -L, L)


def _col(a, n: int | None = None) -> torch.Tensor | float:
    """Exponent as a float or an ``[N, 1]`` column for broadcasting against ``[N, *]``."""
    if isinstance(a, torch.Tensor):
        if a.numel() == 1:
            return float(a.reshape(()))
        return a.reshape(-1, 1).float()
    return float(a)


def group_absmax(w: torch.Tensor, gs: int) -> torch.Tensor:
    """``max |W|`` per row and group: ``w [N, K] -> [N, G]`` (short last group allowed)."""
    n, k = w.shape
    g = -(-k // gs)
    wa = torch.nn.functional.pad(w.float().abs(), (0, g * gs - k))
    return wa.reshape(n, g, gs).amax(-1)


def power_scale(w: torch.Tensor, a, bits: int, gs: int, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """Power-domain scale ``s = absmax^a / L`` ``[N, G]``; all-zero groups get ``s = 1e-30`` (they dequantize to
    ``(s/2)^(1/a)``, zero in fp32 for ``a <= 1``).

    ``absmax [N, G]`` overrides the range (clipping / learned ranges)."""
    m = group_absmax(w, gs) if absmax is None else absmax.float()
    s = torch.pow(m, _col(a)) / qmax(bits)
    return torch.where(m > 0, s, torch.full_like(s, 1e-30))


def power_quantize(w: torch.Tensor, s: torch.Tensor, a, bits: int, g_idx: torch.Tensor) -> torch.Tensor:
    """Unsigned codes ``c = round_half(sign(w)|w|^a / s) + L`` uint8 ``[N, K]``."""
    w = w.float()
    u = torch.sign(w) * torch.pow(w.abs(), _col(a)) / expand_groups(s, g_idx)
    return (round_half(u, bits) + qmax(bits)).to(torch.uint8)


def power_dequantize(codes: torch.Tensor, s: torch.Tensor, a, bits: int, g_idx: torch.Tensor) -> torch.Tensor:
    """Reference ``W^ = sign(q) (|q| s)^(1/a)`` fp32 ``[N, K]`` with ``q = codes - L``."""
    q = codes.float() - qmax(bits)
    a = _col(a)
    inv = 1.0 / a
    return torch.sign(q) * torch.pow(q.abs() * expand_groups(s.float(), g_idx), inv)


def unit_levels(a, bits: int, n: int) -> torch.Tensor:
    """``lut [N, 2^b]``: ``sign(c - L)|c - L|^(1/a)`` for codes ``c`` (half-integer levels, no zero)."""
    q = torch.arange(2**bits, dtype=torch.float32) - qmax(bits)
    a = _col(a)
    inv = 1.0 / a
    lv = torch.sign(q) * torch.pow(q.abs(), inv)  # [2^b] or [N, 2^b]
    return lv.expand(n, -1).contiguous() if lv.dim() == 1 else lv


def linear_scale(s: torch.Tensor, a) -> torch.Tensor:
    """``s^(1/a)`` ``[N, G]``: the linear-domain multiplier of the unit LUT."""
    return torch.pow(s.float(), 1.0 / _col(a))


def to_qweight(codes: torch.Tensor, s: torch.Tensor, a, bits: int, gs: int, g_idx: torch.Tensor,
               meta: dict | None = None) -> QuantizedWeight:
    """`QuantizedWeight` in the separable LUT layout (module docstring); ``meta['power_scale']`` keeps ``s``."""
    n = codes.shape[0]
    exponent = float(a) if not isinstance(a, torch.Tensor) or a.numel() == 1 else a.reshape(-1).float().clone()
    m = {"method": "nupes", "lut_scaled": True, "exponent": exponent, "power_scale": s.float().clone()}
    m.update(meta or {})
    return QuantizedWeight(codes, linear_scale(s, a), None, bits, gs, g_idx, lut=unit_levels(a, bits, n), meta=m)


def quantize_power(w: torch.Tensor, a, bits: int, group_size: int = -1,
                   absmax: torch.Tensor | None = None) -> QuantizedWeight:
    """PowerQuant of ``w [N, K]`` with exponent ``a`` (float or ``[N]``) -> `QuantizedWeight`."""
    k = w.shape[1]
    gs = k if group_size == -1 else group_size
    g_idx = default_g_idx(k, gs)
    s = power_scale(w, a, bits, gs, absmax)
    return to_qweight(power_quantize(w, s, a, bits, g_idx), s, a, bits, gs, g_idx)


def fake_quantize_power(w: torch.Tensor, a, bits: int, group_size: int = -1,
                        absmax: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize with the reference formula (search objective) ``[N, K]`` fp32."""
    k = w.shape[1]
    gs = k if group_size == -1 else group_size
    g_idx = default_g_idx(k, gs)
    s = power_scale(w, a, bits, gs, absmax)
    return power_dequantize(power_quantize(w, s, a, bits, g_idx), s, a, bits, g_idx)


def _row_error(w: torch.Tensor, a, bits: int, group_size: int, col_weight: torch.Tensor | None,
               absmax: torch.Tensor | None, err_fn=None) -> torch.Tensor:
    """``sum_k d_k (W - W^(a))^2`` per row ``[N]`` (``d = 1`` or diag of the input second moment), or
    ``err_fn(W^ - W)`` (e.g. the output error ``diag(E H E^T)``)."""
    e = fake_quantize_power(w, a, bits, group_size, absmax) - w.float()
    if err_fn is not None:
        return err_fn(e)
    e = e.pow(2)
    if col_weight is not None:
        e = e * col_weight.float()[None, :]
    return e.sum(1)


@torch.no_grad()
def search_exponent(w: torch.Tensor, bits: int, group_size: int = -1, per_channel: bool = False,
                    lo: float = 0.2, hi: float = 1.0, grid: int = 17, iters: int = 12,
                    col_weight: torch.Tensor | None = None, absmax: torch.Tensor | None = None, err_fn=None):
    """PowerQuant exponent search: ``argmin_a ||W - W^(a)||^2`` (optionally ``d``-weighted per column, or any
    per-row error ``err_fn(E [N, K]) -> [N]``).

    A coarse grid on ``[lo, hi]`` (always containing ``hi``) brackets the minimum, golden-section refines it
    inside ``[a_{i-1}, a_{i+1}]`` (the paper reports a locally convex problem; rounding makes it piecewise, so
    the grid guards against a bad bracket). The result is never worse than any grid point, hence never worse
    than ``a = hi = 1`` (uniform). Returns ``(a, err)``: float per layer, or ``[N]`` tensors per channel.
    """
    n = w.shape[0]
    grid_a = torch.linspace(lo, hi, grid)

    def f(a):  # a: float (per layer) or [N] tensor -> [N] or scalar error
        e = _row_error(w, a, bits, group_size, col_weight, absmax, err_fn)
        return e if per_channel else e.sum()

    errs = torch.stack([f(float(x)) * (torch.ones(n) if per_channel else 1.0) for x in grid_a])  # [grid(, N)]
    if not per_channel:
        i = int(torch.argmin(errs))
        best_a, best_e = float(grid_a[i]), float(errs[i])
        left, right = float(grid_a[max(i - 1, 0)]), float(grid_a[min(i + 1, grid - 1)])
        gr = (math.sqrt(5) - 1) / 2
        c, d = right - gr * (right - left), left + gr * (right - left)
        fc, fd = float(f(c)), float(f(d))
        for _ in range(iters):
            if fc < fd:
                right, d, fd = d, c, fc
                c = right - gr * (right - left)
                fc = float(f(c))
            else:
                left, c, fc = c, d, fd
                d = left + gr * (right - left)
                fd = float(f(d))
        for a_, e_ in ((c, fc), (d, fd)):
            if e_ < best_e:
                best_a, best_e = a_, e_
        return best_a, best_e
    i = torch.argmin(errs, 0)  # [N]
    best_a, best_e = grid_a[i].clone(), errs.gather(0, i[None]).squeeze(0)
    left, right = grid_a[(i - 1).clamp(min=0)], grid_a[(i + 1).clamp(max=grid - 1)]
    gr = (math.sqrt(5) - 1) / 2
    c, d = right - gr * (right - left), left + gr * (right - left)
    fc, fd = f(c), f(d)
    for _ in range(iters):  # one evaluation per iteration, each row follows its own bracket
        m = fc < fd
        right, left = torch.where(m, d, right), torch.where(m, left, c)
        p = torch.where(m, right - gr * (right - left), left + gr * (right - left))
        fp = f(p)
        c, fc, d, fd = (torch.where(m, p, d), torch.where(m, fp, fd),
                        torch.where(m, c, p), torch.where(m, fc, fp))
    for a_, e_ in ((c, fc), (d, fd)):
        better = e_ < best_e
        best_a, best_e = torch.where(better, a_, best_a), torch.where(better, e_, best_e)
    return best_a, best_e
