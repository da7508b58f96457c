"""NUPES / PowerQuant LUT checkpoints (safetensors) and their reader.

Per quantized Linear ``path`` with ``W [N, K]``, ``b`` bits, ``G = ceil(K / gs)`` groups:

  ``path.codes``     uint8 ``[N, ceil(K*b/8)]``  unsigned codes ``c = q + L`` packed LSB-first along K
                     (``ptq.quant.primitives.pack``; dense, 3-bit codes straddle bytes)
  ``path.lut``       fp32  ``[N, 2^b]``          lookup table, one row per output channel (2^b levels)
  ``path.scales``    fp32  ``[N, G]``            only for grouped weights (``G > 1``)
  ``path.exponent``  fp32  ``[1]`` or ``[N]``    the power exponent(s) ``a`` (metadata; LUT = levels)
  ``path.shape``     int32 ``[2]``               ``[N, K]`` (K cannot be read from 3-bit packed codes)
  ``path.bias``      model dtype ``[N]``         optional

Dequantization (``L = 2^(b-1) - 1/2``, half-integer ``q = c - L``, ``s`` the power-domain scale):
  per channel (``G = 1``): ``lut[n, c] = sign(q)(|q| s_n)^(1/a)`` folded: ``W[n, k] = lut[n, codes[n, k]]``
  grouped:                 ``lut[n, c] = sign(q)|q|^(1/a)`` and ``scales = s^(1/a)``:
                           ``W[n, k] = scales[n, k // gs] * lut[n, codes[n, k]]``
(``quantization_config.lut_layout`` = ``"folded"`` / ``"scaled"``). LUT and scales are stored in fp32, so the
reader reproduces the in-memory ``QuantizedWeight.dequantize()`` bit for bit.
"""
from __future__ import annotations

import torch

from ptq.export.base import CheckpointWriter, QuantizedSource
from ptq.model_io import WeightSource
from ptq.quant.primitives import default_g_idx, pack, unpack
from ptq.quant.qweight import QuantizedWeight

PARTS = ("codes", "lut", "scales", "exponent", "shape")


def pack_nupes(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """`QuantizedWeight` (NUPES layout, see ptq.quant.power) -> tensors of one linear (module docstring)."""
    if qw.lut is None:
        raise ValueError("the nupes format stores LUT (non-uniform) weights; this weight is uniform: use gptq")
    if qw.act_order:
        raise ValueError("the nupes format stores contiguous groups only")
    n, k = qw.shape
    lut = qw.lut.float()
    out = {"codes": pack(qw.codes, qw.bits, 8), "shape": torch.tensor([n, k], dtype=torch.int32)}
    scaled = bool(qw.meta.get("lut_scaled"))
    if scaled and qw.scale.shape[1] == 1:
        out["lut"] = qw.scale.float() * lut  # fold the per-channel scale: 2^b real levels per channel
    else:
        out["lut"] = lut
        if scaled:
            out["scales"] = qw.scale.float()
    e = qw.meta.get("exponent")
    if e is not None:
        out["exponent"] = (e.float().reshape(-1) if isinstance(e, torch.Tensor)
                           else torch.tensor([float(e)], dtype=torch.float32))
    return {key: v.contiguous() for key, v in out.items()}


def unpack_nupes(t: dict[str, torch.Tensor], bits: int, group_size: int) -> QuantizedWeight:
    """Inverse of :func:`pack_nupes` (``group_size`` -1 = per channel)."""
    n, k = (int(x) for x in t["shape"])
    codes = unpack(t["codes"], bits, k)
    gs = k if group_size == -1 else group_size
    g_idx = default_g_idx(k, gs)
    lut = t["lut"].float()
    meta = {"method": "nupes"}
    if t.get("exponent") is not None:
        e = t["exponent"].float()
        meta["exponent"] = float(e) if e.numel() == 1 else e
    if t.get("scales") is not None:
        meta["lut_scaled"] = True
        scale = t["scales"].float()
    else:
        scale = torch.ones(n, 1)
    return QuantizedWeight(codes, scale, None, bits, gs, g_idx, lut=lut, meta=meta)


class NUPESWriter(CheckpointWriter):
    """Streaming writer of LUT checkpoints (``--format nupes``)."""

    format_name = "nupes"

    def linear_tensors(self, path, qw, bias):
        if qw.lut is None:
            raise ValueError(f"{path}: --format nupes needs NUPES (LUT) weights; use the nupes recipes")
        seen = self.__dict__.setdefault("_seen", {"bits": set(), "gs": set(), "layout": set(), "agran": set()})
        seen["bits"].add(qw.bits)
        seen["gs"].add(-1 if qw.scale.shape[1] == 1 else qw.group_size)
        seen["layout"].add("scaled" if qw.meta.get("lut_scaled") and qw.scale.shape[1] > 1 else "folded")
        e = qw.meta.get("exponent")
        seen["agran"].add("channel" if isinstance(e, torch.Tensor) and e.numel() > 1 else "layer")
        out = {f"{path}.{key}": v for key, v in pack_nupes(qw).items()}
        if bias is not None:
            out[f"{path}.bias"] = self.cast(f"{path}.bias", bias)
        return out

    def quantization_config(self) -> dict:
        seen = getattr(self, "_seen", None)
        if seen is None:
            return {"quant_method": "nupes", "bits": self.spec.bits, "group_size": self.spec.group_size,
                    "lut_layout": "folded", "exponent_granularity": "layer"}
        for key in ("bits", "gs", "layout"):
            if len(seen[key]) > 1:
                raise ValueError(f"nupes format: mixed {key} across layers: {sorted(seen[key])}")
        return {"quant_method": "nupes", "bits": next(iter(seen["bits"])), "group_size": next(iter(seen["gs"])),
                "lut_layout": next(iter(seen["layout"])),
                "exponent_granularity": "channel" if "channel" in seen["agran"] else "layer",
                "lut_dtype": "float32", "meta": {"quantizer": ["ptq:0.1.0"], "recipe": self.meta.get("recipe")}}


class NUPESSource(QuantizedSource, WeightSource):
    """Dense view of a LUT checkpoint: ``<path>.weight`` is dequantized on demand; `qweight(path)` gives the
    stored `QuantizedWeight`."""

    PARTS = PARTS

    def __init__(self, source: WeightSource, quantization_config: dict):
        self.src, self.qc = source, quantization_config
        self.bits = int(self.qc["bits"])
        self.group_size = int(self.qc.get("group_size", -1))
        self._index(source)

    def _unpack(self, t: dict) -> QuantizedWeight:
        return unpack_nupes(t, self.bits, self.group_size)
