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
"""
from __future__ import annotations

import torch

from ptq.export.base import CheckpointWriter, QuantizedSource
from ptq.export.gptq_format import QuantConfigMixin, check_uniform
from ptq.model_io import WeightSource
from ptq.quant.primitives import default_g_idx, pack, unpack
from ptq.quant.qweight import QuantizedWeight

CT_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


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


class CTWriter(QuantConfigMixin, CheckpointWriter):
    """Streaming compressed-tensors ``pack-quantized`` writer (int weights, 2..8 bits, sym or asym)."""

    format_name = "compressed-tensors"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.ignore: list[str] = []

    def linear_tensors(self, path, qw, bias):
        self._note(qw)
        out = {f"{path}.{k}": v for k, v in pack_ct(qw, self.dtype).items()}
        if bias is not None:
            out[f"{path}.bias"] = self.cast(f"{path}.bias", bias)
        return out

    def layer_tensors(self, ctx):
        """Also record this layer's Linear modules that stay dense (they go to ``ignore``)."""
        qpaths = {p for p in ctx.qweights if p.startswith(ctx.prefix)}
        for name, m in ctx.layer.named_modules():
            if isinstance(m, torch.nn.Linear) and ctx.prefix + name not in qpaths:
                self.ignore.append(ctx.prefix + name)
        return super().layer_tensors(ctx)

    def quantization_config(self) -> dict:
        s = self._summary()
        gs = s["gs"]
        weights = {"num_bits": s["bits"], "type": "int", "symmetric": s["sym"],
                   "strategy": "channel" if gs == -1 else "group", "group_size": None if gs == -1 else gs,
                   "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None}
        return {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": weights,
                                          "input_activations": None, "output_activations": None}},
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
        if fmt != "pack-quantized":
            raise ValueError(f"only compressed-tensors format 'pack-quantized' is readable, got {fmt!r}")
        groups = list(qc.get("config_groups", {}).values())
        if len(groups) != 1 or not groups[0].get("weights"):
            raise ValueError("expected exactly one config group with weight quantization")
        w = groups[0]["weights"]
        if w.get("type", "int") != "int" or w.get("actorder") not in (None, "weight"):
            raise ValueError(f"unsupported compressed-tensors weight scheme {w}")
        self.bits = int(w["num_bits"])
        self.group_size = w.get("group_size") if w.get("strategy") == "group" else None
        self._index(source)

    def _unpack(self, t: dict) -> QuantizedWeight:
        return unpack_ct(t, self.bits, self.group_size)
