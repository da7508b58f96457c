"""GPTQ safetensors checkpoints (AutoGPTQ / GPTQModel / optimum + transformers / vLLM) and their reader.

Per quantized Linear ``path`` with ``W [N=out, K=in]``, ``b`` bits, ``G = ceil(K / g)`` groups
(layouts: docs/formats.md and shared onnx_export.md §7.1):

  ``path.qweight``  int32 ``[ceil(K*b/32), N]``  codes packed along K (dim 0), LSB first, dense (3-bit codes
                   straddle words exactly as AutoGPTQ's 3-bit packer): ``qweight = pack(codes [N, K]).T``
  ``path.qzeros``   int32 ``[G, ceil(N*b/32)]``  zero points packed along N (dim 1); v1 stores ``zero - 1``
  ``path.scales``   fp16  ``[G, N]``
  ``path.g_idx``    int32 ``[K]``                group of each input column (``k // g`` or GPTQ act-order)
  ``path.bias``     model dtype ``[N]``          optional

Dequantization (GPTQ, Frantar et al. 2023): ``W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])``.

Symmetric weights are written as ``checkpoint_format "gptq"`` (v1, AutoGPTQ: zeros stored minus 1, every
loader adds 1 back); asymmetric as ``"gptq_v2"`` (zeros as-is) so that a zero point of 0 stays representable.
Scales are stored in fp16 (what every GPTQ kernel expects): the exported model equals the in-memory one up to
the fp16 rounding of the scales; codes, zero points and g_idx are exact.
"""
from __future__ import annotations

import re

import torch

from ptq.export.base import CheckpointWriter, QuantizedSource
from ptq.model_io import WeightSource
from ptq.quant.primitives import default_g_idx, pack, unpack
from ptq.quant.qweight import QuantizedWeight

GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def check_uniform(qw: QuantizedWeight, fmt: str) -> None:
    if qw.lut is not None:
        raise ValueError(f"{fmt} stores uniform integer grids only; this weight has a non-uniform LUT "
                         "(NUPES): export it with --format fp or onnx")


def pack_gptq(qw: QuantizedWeight, v1: bool) -> dict[str, torch.Tensor]:
    """``QuantizedWeight`` -> ``{qweight, qzeros, scales, g_idx}`` (see module docstring for shapes)."""
    check_uniform(qw, "GPTQ")
    zeros = qw.zeros().round().to(torch.int64)  # [N, G]
    if v1:
        zeros = zeros - 1  # AutoGPTQ QuantLinear.pack: `zeros -= 1`
        if (zeros < 0).any():
            raise ValueError("GPTQ v1 cannot store a zero point of 0; write checkpoint_format gptq_v2")
    return {
        "qweight": pack(qw.codes, qw.bits, word_bits=32).t().contiguous(),
        "qzeros": pack(zeros.t(), qw.bits, word_bits=32).contiguous(),
        "scales": qw.scale.t().to(torch.float16).contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(t: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool, v1: bool) -> QuantizedWeight:
    """Inverse of :func:`pack_gptq`; ``t`` holds qweight/qzeros/scales/g_idx. ``group_size`` -1 = per channel."""
    g_idx = t["g_idx"].to(torch.int32)
    k = g_idx.numel()
    scales = t["scales"]  # [G, N]
    n = scales.shape[1]
    codes = unpack(t["qweight"].t().contiguous(), bits, k)  # [N, K]
    zeros = unpack(t["qzeros"].contiguous(), bits, n).to(torch.float32)  # [G, N]
    if v1:
        zeros = zeros + 1  # AutoGPTQ / vLLM / ORT-GenAI: `zeros + 1`
    zeros = zeros.t().contiguous()
    implicit = 2 ** (bits - 1)
    zero = None if sym and bool((zeros == implicit).all()) else zeros
    gs = k if group_size == -1 else group_size
    return QuantizedWeight(codes, scales.t().float().contiguous(), zero, bits, gs, g_idx)


class QuantConfigMixin:
    """Collects bits / group size / sym / act-order / pass metadata over every written QuantizedWeight. Group
    size and symmetry must be uniform; bits may differ per linear (mixed precision, ptq.mixed_precision): the
    most common width is the config's base ``bits`` and `_summary` lists the others per module path."""

    def _note(self, qw: QuantizedWeight, path: str | None = None) -> None:
        seen = getattr(self, "_seen", None)
        if seen is None:
            seen = self._seen = {"bits": {}, "sym": set(), "gs": set(), "act_order": False, "meta": {}}
        n, k = qw.shape
        spec = self.spec
        if spec is not None and qw.group_size != spec.gsize(k):
            raise ValueError(f"{self.format_name}: weight has group size {qw.group_size}, the recipe says "
                             f"{spec.group_size}")
        seen["bits"][path if path is not None else len(seen["bits"])] = qw.bits
        seen["sym"].add(qw.sym)
        seen["gs"].add(spec.group_size if spec is not None else qw.group_size)
        seen["act_order"] |= qw.act_order
        for key, v in qw.meta.items():
            if isinstance(v, (int, float, bool, str)):
                seen["meta"].setdefault(key, v)
        if len(seen["sym"]) > 1 or len(seen["gs"]) > 1:
            raise ValueError(f"{self.format_name}: mixed group size/symmetry across layers "
                             f"({seen['gs']}, sym {seen['sym']}) cannot be described by one "
                             "quantization_config; use --format fp or onnx")

    def _summary(self) -> dict:
        """``bits`` (base: the most common width, ties to the smaller), ``module_bits`` {path: bits} for the
        linears at another width, ``sym``, ``gs``, ``act_order``, ``meta``."""
        seen = getattr(self, "_seen", None)
        if seen is None:  # nothing quantized: describe the spec
            s = self.spec
            return {"bits": s.bits, "module_bits": {}, "sym": s.sym, "gs": s.group_size, "act_order": False,
                    "meta": {}}
        counts: dict[int, int] = {}
        for b in seen["bits"].values():
            counts[b] = counts.get(b, 0) + 1
        base = min(counts, key=lambda b: (-counts[b], b))
        others = {p: b for p, b in seen["bits"].items() if b != base}
        return {"bits": base, "module_bits": dict(sorted(others.items())), "sym": next(iter(seen["sym"])),
                "gs": next(iter(seen["gs"])), "act_order": seen["act_order"], "meta": seen["meta"]}


def dynamic_key(path: str) -> str:
    """GPTQModel ``dynamic`` key for exactly module ``path``: ``+:`` (override) and the escaped name (a regex
    matched from the start, as GPTQModel / vLLM do), anchored at the end."""
    return "+:" + re.escape(path) + "$"


def dynamic_override(dynamic: dict | None, path: str) -> dict | bool | None:
    """What a ``dynamic`` mapping says for module ``path``, as GPTQModel resolves it: the first key (in order)
    whose pattern matches the name from its start; ``-:`` keys mean "not quantized" (False); None = no key."""
    for key, over in (dynamic or {}).items():
        neg = key.startswith("-:")
        pat = key[2:] if key.startswith(("+:", "-:")) else key
        if re.match(pat, path):
            return False if neg else dict(over)
    return None


class GPTQWriter(QuantConfigMixin, CheckpointWriter):
    """Streaming GPTQ checkpoint writer (v1 ``gptq`` for symmetric, ``gptq_v2`` for asymmetric weights)."""

    format_name = "gptq"

    def _v1(self, qw: QuantizedWeight) -> bool:
        return qw.sym

    def linear_tensors(self, path, qw, bias):
        self._note(qw, path)
        out = {f"{path}.{k}": v for k, v in pack_gptq(qw, self._v1(qw)).items()}
        if bias is not None:
            out[f"{path}.bias"] = self.cast(f"{path}.bias", bias)
        return out

    def quantization_config(self) -> dict:
        s = self._summary()
        fmt = "gptq" if s["sym"] else "gptq_v2"
        m = s["meta"]
        qc = {
            "quant_method": "gptq", "bits": s["bits"], "group_size": s["gs"], "desc_act": s["act_order"],
            "sym": s["sym"], "checkpoint_format": fmt, "format": fmt, "lm_head": False,
            "meta": {"quantizer": ["ptq:0.1.0"], "recipe": self.meta.get("recipe")},
        }
        if s["module_bits"]:  # mixed precision: GPTQModel's per-module overrides (first matching key wins)
            qc["dynamic"] = {dynamic_key(p): {"bits": b, "group_size": s["gs"]} for p, b in s["module_bits"].items()}
        # GPTQ-algorithm keys only when the GPTQ pass ran, with the recipe's values (RTN / NUPES weights have
        # no damping or group mode to describe). desc_act describes the stored g_idx (non-trivial = act-order
        # groups); with static groups GPTQ runs in act-order but g_idx stays k // g, so desc_act is false.
        g = (self.meta.get("passes") or {}).get("gptq")
        if g is not None:
            qc.update(damp_percent=g.get("damp"), true_sequential=g.get("true_sequential"),
                      static_groups=g.get("static_groups"))
            qc["meta"]["act_order"] = g.get("act_order")
        return qc


class GPTQSource(QuantizedSource, WeightSource):
    """Dense view of a GPTQ checkpoint: ``<path>.weight`` is dequantized on demand (fp32); `qweight(path)`
    gives the exact stored `QuantizedWeight` (scales as stored in fp16, widened to fp32)."""

    PARTS = GPTQ_PARTS

    def __init__(self, source: WeightSource, quantization_config: dict):
        qc = quantization_config
        self.src, self.qc = source, qc
        self.bits = int(qc["bits"])
        self.group_size = int(qc.get("group_size", -1))
        self.sym = bool(qc.get("sym", True))
        fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"unsupported GPTQ checkpoint_format {fmt!r} (expected gptq or gptq_v2)")
        self.v1 = fmt == "gptq"
        self.dynamic = qc.get("dynamic") or {}
        self._index(source)

    def module_scheme(self, path: str) -> tuple[int, int]:
        """``(bits, group_size)`` of module ``path``: the base config, or its ``dynamic`` override."""
        over = dynamic_override(self.dynamic, path) or {}
        return int(over.get("bits", self.bits)), int(over.get("group_size", self.group_size))

    def _unpack(self, t: dict) -> QuantizedWeight:
        return self._unpack_module("", t)

    def _unpack_module(self, module_path: str, t: dict) -> QuantizedWeight:
        bits, gs = self.module_scheme(module_path) if module_path else (self.bits, self.group_size)
        if "g_idx" not in t:  # old AutoGPTQ checkpoints without desc_act omit it: contiguous groups
            k = t["qweight"].shape[0] * 32 // bits
            t["g_idx"] = default_g_idx(k, k if gs == -1 else gs)
        return unpack_gptq(t, bits, gs, self.sym, self.v1)
