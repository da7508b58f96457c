"""Pure quantization primitives shared by every pass and exporter.

Conventions (GPTQ / MatMulNBits compatible):
  * weights are torch Linear layout ``W [N, K]`` (N = out features, K = in features);
  * groups run along K: group ``g`` covers columns ``[g*gs, (g+1)*gs)``; ``G = ceil(K / gs)``; a group size that
    does not divide K leaves a short last group (never a skipped layer); ``group_size=-1`` means per channel;
  * codes are **unsigned** integers ``q in [0, 2^b - 1]`` stored as uint8; dequantization is
    ``w_hat = scale * (q - zero)`` with ``scale, zero [N, G]``; symmetric quantization uses the implicit
    zero ``2^(b-1)`` (GPTQ: ``scale = 2*absmax / (2^b - 1)``);
  * asymmetric: ``xmin = min(min w, 0)``, ``xmax = max(max w, 0)``, ``scale = (xmax - xmin) / (2^b - 1)``,
    ``zero = round(-xmin / scale)``  (GPTQ quant.py, Frantar et al. 2023).

Packing is LSB-first along the last axis: element ``i`` of a word sits at bits ``[i*b, (i+1)*b)``; the
MatMulNBits ``B`` blob, the compressed-tensors ``weight_packed`` and the transpose of GPTQ ``qweight`` are
all this stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptq.quant.clipping import CLIP_MODES, clip_range
from ptq.quant.grid import minmax_qparams  # noqa: F401  (re-exported: part of the primitives' API)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one weight matrix."""

    bits: int = 4
    group_size: int = 128  # -1 = per output channel
    sym: bool = False
    mse: bool = False  # grid search of a clipping factor (GPTQ quant.py `mse=True`); same as clip="mse"
    clip: str = "none"  # clipping-range search: none | mse | octav (ptq.quant.clipping)

    def __post_init__(self):
        if self.clip not in CLIP_MODES:
            raise ValueError(f"clip must be one of {', '.join(CLIP_MODES)}, got {self.clip!r}")
        if self.mse and self.clip not in ("none", "mse"):
            raise ValueError(f"mse=True is clip='mse'; it cannot be combined with clip={self.clip!r}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be -1 (per channel) or >= 1, got {self.group_size}")

    @property
    def clip_mode(self) -> str:
        """The clipping search in effect (``mse=True`` is the legacy spelling of ``clip="mse"``)."""
        return "mse" if self.mse else self.clip

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, k: int) -> int:
        return 1 if self.group_size == -1 else -(-k // self.group_size)

    def gsize(self, k: int) -> int:
        """Effective group size for a width-k matrix."""
        return k if self.group_size == -1 else self.group_size


def default_g_idx(k: int, group_size: int) -> torch.Tensor:
    """Group index of each input column ``[K]`` for contiguous groups."""
    return torch.arange(k, dtype=torch.int32) // group_size


def _pad_groups(w: torch.Tensor, gs: int) -> torch.Tensor:
    """``[N, K] -> [N, G, gs]`` padding the last group with zeros (zeros never move min/max, which include 0)."""
    n, k = w.shape
    g = -(-k // gs)
    if g * gs != k:
        w = torch.nn.functional.pad(w, (0, g * gs - k))
    return w.reshape(n, g, gs)


def compute_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero for ``w [N, K]`` -> ``scale [N, G]`` fp32, ``zero [N, G]`` fp32 (integral values).

    The range of each group is min/max, or clipped by ``spec.clip_mode`` (ptq.quant.clipping): ``mse`` shrinks
    it by ``p in {1, 0.99, ..., 0.2}`` to minimize ``sum |w - Q(w)|^2.4`` (GPTQ's grid=100, maxshrink=0.8,
    norm=2.4); ``octav`` takes OCTAV's MSE-optimal fixed point.
    """
    w = w.float()
    gs = spec.gsize(w.shape[1])
    wg = _pad_groups(w, gs)
    if spec.clip_mode == "none":
        return minmax_qparams(wg.amin(-1), wg.amax(-1), spec.bits, spec.sym)
    k = w.shape[1]
    valid = None
    if wg.shape[1] * gs != k:
        valid = (torch.arange(wg.shape[1] * gs) < k).float().reshape(wg.shape[1], gs)
    lo, hi = clip_range(wg, spec.bits, spec.sym, spec.clip_mode, valid)
    return minmax_qparams(lo, hi, spec.bits, spec.sym)


def expand_groups(t: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """``t [N, G]`` -> ``[N, K]`` by the group index of each column."""
    return t[:, g_idx.long()]


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
             g_idx: torch.Tensor) -> torch.Tensor:
    """Unsigned codes ``q = clamp(round(w / s) + z, 0, 2^b - 1)`` as uint8 ``[N, K]``."""
    s = expand_groups(scale, g_idx)
    z = expand_groups(zero, g_idx)
    q = torch.clamp(torch.round(w.float() / s) + z, 0, 2**bits - 1)
    return q.to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               g_idx: torch.Tensor) -> torch.Tensor:
    """``w_hat [N, K] = scale[:, g_idx] * (q - zero[:, g_idx])`` in fp32."""
    return expand_groups(scale.float(), g_idx) * (codes.float() - expand_groups(zero.float(), g_idx))


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of ``w [N, K]`` (contiguous groups)."""
    scale, zero = compute_qparams(w, spec)
    g_idx = default_g_idx(w.shape[1], spec.gsize(w.shape[1]))
    return dequantize(quantize(w, scale, zero, spec.bits, g_idx), scale, zero, g_idx).to(w.dtype)


def fake_quantize_activation(x: torch.Tensor, bits: int, granularity: str = "token", sym: bool = False,
                             clip: tuple[float, float] | None = None) -> torch.Tensor:
    """Fake-quantize activations ``x [..., C]``.

    granularity ``"token"``: dynamic min/max per token (per row of the last axis); ``"tensor"``: one range
    for the whole tensor, static when ``clip=(lo, hi)`` is given (calibrated), dynamic otherwise.
    """
    if granularity == "token":
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    elif clip is not None:
        lo, hi = (torch.tensor(float(v), dtype=x.dtype) for v in clip)
    else:
        lo, hi = x.amin(), x.amax()
    scale, zero = minmax_qparams(lo.float(), hi.float(), bits, sym)
    q = torch.clamp(torch.round(x.float() / scale) + zero, 0, 2**bits - 1)
    return (scale * (q - zero)).to(x.dtype)


def pack(codes: torch.Tensor, bits: int, word_bits: int = 8, pad_value: int = 0) -> torch.Tensor:
    """Pack unsigned codes along the last axis, LSB first, dense (codes may straddle words for 3/5/6/7 bits).

    ``codes [..., K]`` -> uint8 ``[..., ceil(K*bits/8)]`` (word_bits 8) or int32 ``[..., ceil(K*bits/32)]``.
    """
    *lead, k = codes.shape
    nwords = -(-k * bits // word_bits)
    if word_bits % bits == 0:  # fast path: whole codes per word (2/4/8 bits)
        per = word_bits // bits
        c = torch.nn.functional.pad(codes.to(torch.int64), (0, nwords * per - k), value=pad_value)
        words = (c.reshape(*lead, nwords, per) << (torch.arange(per, dtype=torch.int64) * bits)).sum(-1)
        return _to_words(words, word_bits)
    c = codes.to(torch.int64)
    total = nwords * word_bits
    if k * bits < total:
        npad = -(-(total - k * bits) // bits)
        c = torch.nn.functional.pad(c, (0, npad), value=pad_value)
    kk = c.shape[-1]
    # bit matrix [..., kk*bits] LSB-first, then regroup into words
    shifts = torch.arange(bits, dtype=torch.int64)
    bitstream = ((c[..., None] >> shifts) & 1).reshape(*lead, kk * bits)[..., :total]
    wshift = torch.arange(word_bits, dtype=torch.int64)
    words = (bitstream.reshape(*lead, nwords, word_bits) << wshift).sum(-1)
    return _to_words(words, word_bits)


def _to_words(words: torch.Tensor, word_bits: int) -> torch.Tensor:
    if word_bits == 8:
        return words.to(torch.uint8)
    if word_bits == 32:
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    raise ValueError("word_bits must be 8 or 32")


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., W]`` uint8/int32 words -> uint8 codes ``[..., k]``."""
    word_bits = 8 if packed.dtype == torch.uint8 else 32
    w = packed.to(torch.int64) & (2**word_bits - 1)
    *lead, nwords = w.shape
    if word_bits % bits == 0:
        per = word_bits // bits
        codes = (w[..., None] >> (torch.arange(per, dtype=torch.int64) * bits)) & (2**bits - 1)
        return codes.reshape(*lead, nwords * per)[..., :k].to(torch.uint8)
    wshift = torch.arange(word_bits, dtype=torch.int64)
    bitstream = ((w[..., None] >> wshift) & 1).reshape(*lead, nwords * word_bits)[..., : k * bits]
    shifts = torch.arange(bits, dtype=torch.int64)
    return (bitstream.reshape(*lead, k, bits) << shifts).sum(-1).to(torch.uint8)
