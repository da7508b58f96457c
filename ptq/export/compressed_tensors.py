"""compressed-tensors ``pack-quantized`` checkpoints (llm-compressor / vLLM / transformers) and their reader.

Per quantized Linear ``path`` with ``W [N, K]``, ``b`` bits, ``G`` groups (compressed-tensors 0.20
``PackedQuantizationCompressor``; shared onnx_export.md §7.2):

  ``path.weight_packed``      int32 ``[N, ceil(K*b/32)]``  codes packed along K, dense LSB first (3/5/6/7-bit codes
                              straddle words, as ``pack_to_int32``); stored value = signed code + 2^(b-1) = our code
  ``path.weight_scale``       model dtype ``[N, G]`` (``[N, 1]`` per channel)
  ``path.weight_zero_point``  int32 ``[ceil(N*b/32), G]``  asymmetric only: zero points packed along N (dim 0)
  ``path.weight_shape``       int64 ``[2]`` = ``(N, K)``

Dequantization: ``W = (q_s - zp_s) * scale`` with signed ``q_s = q - 2^(b-1)``, ``zp_s = zero - 2^(b-1)``, i.e.
exactly ours, ``scale * (q - zero)`` (symmetric: implicit zero ``2^(b-1)``).

Act-order (non-trivial ``g_idx``) is refused: compressed-tensors 0.20 removed ``actorder="group"``
(``weight_g_idx``), so no current loader would apply the permutation. Use ``--format gptq`` for act-order
weights, or GPTQ with ``static_groups``. Scales keep the checkpoint dtype, so an fp32 checkpoint is bit-exact.

**Activation quantization** (recipes with ``act_bits``: os+, smoothquant, w8a8). The quantizers the passes
installed (ptq.passes.act_quant) become the group's ``input_activations``, which compressed-tensors executes in
every forward (transformers: ``quantized_forward`` fake-quantizes the Linear input; vLLM: int8 kernels):

* per token, dynamic: ``{"strategy": "token", "dynamic": true, "symmetric": sym, "num_bits": b}``;
* per tensor, static: ``{"strategy": "tensor", "dynamic": false}`` plus per Linear ``input_scale`` fp ``[1]``
  and (asymmetric) ``input_zero_point`` int8 ``[1]`` = our unsigned zero - 2^(b-1), from the calibrated clip.

Both conventions equal ours exactly (``calculate_qparams``): asymmetric ``scale = (max(x,0) - min(x,0)) /
(2^b - 1)``, integral zero point; symmetric ``scale = 2 absmax / (2^b - 1)``, signed range
``[-2^(b-1), 2^(b-1) - 1]``.
Weights: symmetric with < 8 bits stay ``pack-quantized`` (the W4A8 layout); 8-bit or asymmetric weights are
written ``int-quantized`` (``weight`` int8 ``[N, K]`` = signed code, ``weight_scale [N, G]``,
``weight_zero_point`` int8 ``[N, G]``), the W8A8 layout, because transformers' compressed path cannot load a
packed asymmetric zero point and its ``dequantize=True`` workaround drops the activation quantizers.
Linears whose input stays unquantized (``act-quant: {skip: [...]}``) get a weight-only second group naming them.
Refused with a clear error: OS+ explicit input shifts (``shift: on``; no such field) and activations wider than
8 bits.
"""
from __future__ import annotations

import re

import torch

from ptq.export.base import CheckpointWriter, QuantizedSource
from ptq.export.gptq_format import QuantConfigMixin, check_uniform
from ptq.model_io import WeightSource
from ptq.quant.primitives import default_g_idx, pack, unpack
from ptq.quant.qweight import QuantizedWeight

CT_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
CT_INT_PARTS = ("weight_scale", "weight", "weight_zero_point")
FORMATS = ("pack-quantized", "int-quantized")


class ActOrderUnsupported(ValueError):
    pass


def pack_ct(qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``QuantizedWeight`` -> ``{weight_packed, weight_scale, [weight_zero_point], weight_shape}``."""
    check_uniform(qw, "compressed-tensors")
    if qw.act_order:
        raise ActOrderUnsupported(
            "compressed-tensors pack-quantized cannot store act-order groups (actorder='group' / weight_g_idx "
            "was removed in compressed-tensors 0.20); use --format gptq, or --set gptq.static_groups=true "
            "or --set gptq.act_order=false")
    n, k = qw.shape
    out = {
        "weight_packed": pack(qw.codes, qw.bits, word_bits=32).contiguous(),
        "weight_scale": qw.scale.to(dtype).contiguous(),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if qw.zero is not None:
        out["weight_zero_point"] = pack(qw.zero.round().to(torch.int64).t(), qw.bits, word_bits=32).t().contiguous()
    return out


def unpack_ct(t: dict[str, torch.Tensor], bits: int, group_size: int | None) -> QuantizedWeight:
    """Inverse of :func:`pack_ct` (``group_size`` None / -1 = per channel)."""
    n, k = (int(v) for v in t["weight_shape"].tolist())
    codes = unpack(t["weight_packed"].contiguous(), bits, k)
    scale = t["weight_scale"].float().contiguous()  # [N, G]
    zero = None
    if t.get("weight_zero_point") is not None:
        zero = unpack(t["weight_zero_point"].t().contiguous(), bits, n).t().float().contiguous()
    gs = k if group_size in (None, -1) else group_size
    return QuantizedWeight(codes, scale, zero, bits, gs, default_g_idx(k, gs))


def int_ct(qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``QuantizedWeight`` -> ``int-quantized`` ``{weight int8 [N, K], weight_scale [N, G], [weight_zero_point]}``
    (signed codes / zero points: ours minus ``2^(b-1)``)."""
    check_uniform(qw, "compressed-tensors")
    if qw.act_order:
        raise ActOrderUnsupported("compressed-tensors cannot store act-order groups; use static groups")
    half = 2 ** (qw.bits - 1)
    out = {"weight": (qw.codes.to(torch.int16) - half).to(torch.int8).contiguous(),
           "weight_scale": qw.scale.to(dtype).contiguous()}
    if qw.zero is not None:
        out["weight_zero_point"] = (qw.zero.round().to(torch.int16) - half).to(torch.int8).contiguous()
    return out


def act_args(bits: int, granularity: str, sym: bool) -> dict:
    """compressed-tensors ``input_activations`` for our activation quantizer (module doc)."""
    if bits > 8:
        raise ValueError(f"compressed-tensors: {bits}-bit activations have no int kernel or fake-quant path "
                         "there (at most 8); use --act-bits 8 or --format onnx")
    if granularity not in ("token", "tensor"):
        raise ValueError(f"compressed-tensors: activation granularity {granularity!r} is not expressible")
    return {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": granularity,
            "dynamic": granularity == "token", "group_size": None, "actorder": None, "observer": None,
            "block_structure": None}


class CTWriter(QuantConfigMixin, CheckpointWriter):
    """Streaming compressed-tensors writer: ``pack-quantized`` int weights (2..8 bits, sym or asym), plus the
    activation quantizers as ``input_activations`` when the recipe installed them (module doc)."""

    format_name = "compressed-tensors"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.ignore: list[str] = []
        self.act: dict | None = None  # {"bits", "granularity", "sym"} of the installed activation quantizers
        self.act_fp: list[str] = []  # quantized-weight linears whose input stays in full precision
        self.weight_format = "pack-quantized"

    def linear_tensors(self, path, qw, bias):
        self._note(qw, path)
        enc = int_ct if self.weight_format == "int-quantized" else pack_ct
        out = {f"{path}.{k}": v for k, v in enc(qw, self.dtype).items()}
        if bias is not None:
            out[f"{path}.bias"] = self.cast(f"{path}.bias", bias)
        return out

    def _act_tensors(self, ctx, qpaths: set[str]) -> dict[str, torch.Tensor]:
        """Record the layer's activation quantizers; static per-tensor ranges -> ``input_scale`` / zero point."""
        from ptq.passes.act_quant import quantizer_of
        from ptq.quant.primitives import minmax_qparams

        out: dict[str, torch.Tensor] = {}
        for path in sorted(qpaths):
            q = quantizer_of(ctx.module(path[len(ctx.prefix):]), create=False)
            if q is not None and q.shift is not None:
                raise ValueError("compressed-tensors has no input shift: OS+ with `shift: on` (explicit RMSNorm "
                                 "shift) can only be exported with --format onnx; use os+ shift: auto")
            if q is None or q.bits is None:
                self.act_fp.append(path)
                continue
            cur = {"bits": q.bits, "granularity": q.granularity, "sym": q.sym}
            if self.act is None:
                act_args(q.bits, q.granularity, q.sym)  # refuses what CT cannot express, before any write
                self.act = cur
            elif cur != self.act:
                raise ValueError(f"compressed-tensors: mixed activation schemes ({self.act} vs {cur}) in one model")
            if q.granularity == "tensor":
                if q.clip is None:
                    raise ValueError(f"{path}: static per-tensor activation quantization without a calibrated clip")
                lo, hi = (torch.tensor([float(v)], dtype=torch.float32) for v in q.clip)
                scale, zero = minmax_qparams(lo, hi, q.bits, q.sym)
                out[f"{path}.input_scale"] = scale.to(self.dtype)
                if not q.sym:
                    out[f"{path}.input_zero_point"] = (zero - 2 ** (q.bits - 1)).to(torch.int8)
        return out

    def layer_tensors(self, ctx):
        """Also record this layer's Linear modules that stay dense (they go to ``ignore``) and its activation
        quantizers (``input_activations``)."""
        qpaths = {p for p in ctx.qweights if p.startswith(ctx.prefix)}
        for name, m in ctx.layer.named_modules():
            if isinstance(m, torch.nn.Linear) and ctx.prefix + name not in qpaths:
                self.ignore.append(ctx.prefix + name)
        act = self._act_tensors(ctx, qpaths)
        if self.act is not None and self.spec is not None and (self.spec.bits == 8 or not self.spec.sym):
            if self.qweights_written and self.weight_format != "int-quantized":
                raise ValueError("compressed-tensors: activation quantization appeared after layer 0")
            self.weight_format = "int-quantized"
        out = super().layer_tensors(ctx)
        out.update(act)
        return out

    def quantization_config(self) -> dict:
        s = self._summary()
        gs = s["gs"]
        fmt = self.weight_format

        def weights(bits):
            return {"num_bits": bits, "type": "int", "symmetric": s["sym"],
                    "strategy": "channel" if gs == -1 else "group", "group_size": None if gs == -1 else gs,
                    "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None}

        acts = None if self.act is None else act_args(**self.act)
        groups = {"group_0": {"targets": ["Linear"], "format": fmt, "weights": weights(s["bits"]),
                              "input_activations": acts, "output_activations": None}}
        fp_inputs = sorted(self.act_fp) if acts is not None else []
        if fp_inputs and s["module_bits"]:
            raise ValueError("compressed-tensors: mixed weight widths with activation quantization are not supported")
        if fp_inputs:  # exact names outrank the class target: weight-only scheme for these
            groups["group_1"] = {"targets": fp_inputs, "format": fmt, "weights": weights(s["bits"]),
                                 "input_activations": None, "output_activations": None}
        by_bits: dict[int, list[str]] = {}
        for path, b in s["module_bits"].items():  # mixed precision: one group per other width, exact names
            by_bits.setdefault(b, []).append(path)
        for b in sorted(by_bits):
            groups[f"group_{len(groups)}"] = {"targets": sorted(by_bits[b]), "format": fmt, "weights": weights(b),
                                              "input_activations": acts, "output_activations": None}
        return {
            "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": [self.sm.lmap.lm_head] + sorted(self.ignore),
            "kv_cache_scheme": None, "global_compression_ratio": None,
        }


class CTSource(QuantizedSource, WeightSource):
    """Dense view of a pack-quantized checkpoint: ``<path>.weight`` dequantized on demand (fp32);
    `qweight(path)` gives the exact stored `QuantizedWeight`."""

    PARTS = CT_PARTS

    def __init__(self, source: WeightSource, quantization_config: dict):
        qc = quantization_config
        self.src, self.qc = source, qc
        fmt = qc.get("format")
        if fmt not in FORMATS:
            raise ValueError(f"readable compressed-tensors formats: {', '.join(FORMATS)}; got {fmt!r}")
        groups = list(qc.get("config_groups", {}).values())
        if not groups or any(not g.get("weights") for g in groups):
            raise ValueError("expected config groups that all quantize weights")
        self.schemes: list[tuple[list[str], int, int | None]] = []  # (targets, bits, group size) per group
        for g in groups:
            w = g["weights"]
            if w.get("type", "int") != "int" or w.get("actorder") not in (None, "weight"):
                raise ValueError(f"unsupported compressed-tensors weight scheme {w}")
            self.schemes.append((list(g.get("targets") or []), int(w["num_bits"]),
                                 w.get("group_size") if w.get("strategy") == "group" else None))
        self.bits, self.group_size = self.schemes[0][1], self.schemes[0][2]
        self.int_format = fmt == "int-quantized"
        if self.int_format:
            self.PARTS = CT_INT_PARTS
        self._index(source)

    def module_scheme(self, path: str) -> tuple[int, int | None]:
        """``(bits, group_size)`` of module ``path``, matched as compressed-tensors does: an exact-name target
        first, then a ``re:`` target, then a class target (every quantized module here is a Linear)."""
        for kind in ("exact", "re", "class"):
            for targets, bits, gs in self.schemes:
                for t in targets:
                    hit = (t == path if kind == "exact" else
                           t.startswith("re:") and re.match(t[3:], path) is not None if kind == "re" else
                           not t.startswith("re:") and "." not in t)
                    if hit:
                        return bits, gs
        return self.bits, self.group_size

    def _unpack(self, t: dict) -> QuantizedWeight:
        return self._unpack_module("", t)

    def _unpack_module(self, module_path: str, t: dict) -> QuantizedWeight:
        bits, group_size = self.module_scheme(module_path) if module_path else (self.bits, self.group_size)
        if not self.int_format:
            return unpack_ct(t, bits, group_size)
        half = 2 ** (bits - 1)
        codes = (t["weight"].to(torch.int16) + half).to(torch.uint8)
        n, k = codes.shape
        zero = None if t.get("weight_zero_point") is None else (t["weight_zero_point"].float() + half)
        gs = k if group_size in (None, -1) else group_size
        return QuantizedWeight(codes, t["weight_scale"].float().contiguous(), zero, bits, gs,
                               default_g_idx(k, gs))
