"""Clipping searches: OCTAV's fixed point against brute force on Gaussian / Laplace data, the asymmetric variant,
and `clip` as an option of RTN (QuantSpec) and GPTQ."""
import pytest
import torch

from ptq.passes.gptq import gptq_quantize
from ptq.quant.clipping import _group_error, clip_range, octav_asymmetric, octav_symmetric
from ptq.quant.primitives import QuantSpec, fake_quantize


def sample(kind: str, n: int = 20000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "gauss":
        return torch.randn(n, generator=g)
    u = torch.rand(n, generator=g) - 0.5  # Laplace(0, 1) by the inverse CDF
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


def real_mse(x: torch.Tensor, lo: float, hi: float, bits: int, sym: bool) -> float:
    wg = x.reshape(1, 1, -1)
    return float(_group_error(wg, torch.tensor([[lo]]), torch.tensor([[hi]]), bits, sym, 2.0, None)[0, 0]) / x.numel()


@pytest.mark.parametrize("kind", ["gauss", "laplace"])
@pytest.mark.parametrize("bits", [3, 4, 6])
def test_octav_matches_brute_force_mse_optimal_clip(kind, bits):
    x = sample(kind)
    s = float(octav_symmetric(x.abs(), bits))
    grid = torch.linspace(0.05, float(x.abs().max()), 400)
    wg = x.reshape(1, 1, -1).expand(1, grid.numel(), -1)
    errs = _group_error(wg, -grid[None], grid[None], bits, True, 2.0, None)[0] / x.numel()
    best = float(errs.min())
    s_best = float(grid[errs.argmin()])
    assert real_mse(x, -s, s, bits, True) <= 1.01 * best  # within 1 % of the brute-force minimum MSE
    assert abs(s - s_best) / s_best < 0.03  # and at the same clip (the MSE is flat near the optimum)
    minmax = real_mse(x, -float(x.abs().max()), float(x.abs().max()), bits, True)
    assert best < 0.8 * minmax  # clipping matters on these tails, so the check is not vacuous


def test_octav_fixed_point_is_stationary_for_its_formula():
    x = sample("laplace")
    bits = 4
    s = octav_symmetric(x.abs(), bits)
    a = x.abs()
    c = 1 / (3 * (2**bits - 1) ** 2)
    rhs = (a * (a > s)).sum() / (c * (a <= s).sum() + (a > s).sum())
    assert abs(float(rhs) - float(s)) / float(s) < 1e-3


@pytest.mark.parametrize("kind", ["gauss", "laplace"])
def test_asymmetric_octav_close_to_symmetric_on_symmetric_data_and_wins_on_skewed(kind):
    x = sample(kind)
    lo, hi = octav_asymmetric(x, 3)
    s = float(octav_symmetric(x.abs(), 3))
    assert abs(float(hi) - s) / s < 0.03 and abs(-float(lo) - s) / s < 0.03
    skew = x.abs() + 0.05 * x  # one-sided data: an asymmetric grid clipped asymmetrically
    lo, hi = octav_asymmetric(skew, 3)
    e_oct = real_mse(skew, float(lo), float(hi), 3, False)
    e_mm = real_mse(skew, float(skew.min()), float(skew.max()), 3, False)
    assert e_oct < 0.8 * e_mm


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs", [64, 48, -1])
def test_rtn_octav_and_mse_never_worse_than_minmax(sym, gs):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 160, generator=g) * torch.rand(32, 1, generator=g)
    w[3, 7] = 9.0  # an outlier
    errs = {c: float((fake_quantize(w, QuantSpec(3, gs, sym, clip=c)) - w).pow(2).sum())
            for c in ("none", "mse", "octav")}
    assert errs["octav"] < errs["none"] and errs["mse"] < errs["none"], errs


def test_clip_range_guard_keeps_minmax_when_clipping_hurts():
    wg = torch.tensor([[[-1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 1.0, -1.0]]])  # exactly on a 2-bit-ish grid
    lo, hi = clip_range(wg, 3, True, "octav")
    assert float(hi) == 1.0 and float(lo) == -1.0


def test_quantspec_clip_validation():
    with pytest.raises(ValueError, match="clip must be one of"):
        QuantSpec(4, 64, clip="percentile")
    with pytest.raises(ValueError, match="mse=True"):
        QuantSpec(4, 64, mse=True, clip="octav")
    assert QuantSpec(4, 64, mse=True).clip_mode == "mse"


def test_gptq_takes_the_clip_option():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1024, 8, generator=g) @ torch.randn(8, 128, generator=g) + 0.1 * torch.randn(1024, 128, generator=g)
    H = 2 / x.shape[0] * x.T @ x
    w = sample("laplace", 48 * 128).reshape(48, 128)
    y = x @ w.T
    out = {}
    for c in ("none", "octav"):
        qw, _ = gptq_quantize(w, H, QuantSpec(3, 64, True, clip=c), act_order=True, static_groups=True)
        out[c] = float((x @ qw.dequantize().T - y).pow(2).mean())
    assert out["octav"] < out["none"], out


def test_cli_clip_flag_reaches_the_spec_and_bad_values_are_usage_errors():
    from ptq.compress import CompressOptions, UsageError, resolve_settings

    _, spec = resolve_settings(CompressOptions(model="m", out="o", recipe="rtn", bits=3, clip="octav"))
    assert spec.clip_mode == "octav" and spec.bits == 3
    with pytest.raises(UsageError, match="clip must be one of"):
        resolve_settings(CompressOptions(model="m", out="o", recipe="gptq", clip="bogus"))
