"""Activation quantization in the ONNX graph, exactly as ptq.passes.act_quant calibrated it (per-token dynamic or
per-tensor static, asymmetric or symmetric, ``bits`` wide, optional OS+ input shift), in front of the weight
kernels of ptq.export.onnx_quant.

For a linear input ``x [..., K]`` (graph ops, fp32, the same operations in the same order as
``fake_quantize_activation``):

    x      <- x - shift                                        (OS+ on RMSNorm, ``shift [K]``)
    lo, hi  = min(ReduceMin(x, -1), 0), max(ReduceMax(x, -1), 0)   per token  | calibrated constants per tensor
    (sym:   hi = max(-lo, hi), lo = -hi);  lo = hi = 0 -> (-1, 1)
    s       = (hi - lo) / (2^b - 1);  z = Round(-lo / s)  (sym: 2^(b-1))
    q       = Clip(Round(x / s) + z, 0, 2^b - 1)

* **integer kernel** (8-bit activations and 8-bit per-channel weights ``q_w [K, N]``, ``z_w``, ``s_w [N]``):
  ``acc = MatMulInteger(uint8(q), q_w, b_zero_point=z_w)`` (int32, ``sum_k q_k (q_w - z_w)``), then
  ``y = s * s_w * (acc - z * colsum)`` with ``colsum[n] = sum_k (q_w[k, n] - z_w[n])``: the W8A8 matmul runs in
  integers with per-token (or static per-tensor) activation scales, which ``DynamicQuantizeMatMul`` (per-tensor
  dynamic only) cannot express.
* otherwise (other activation widths, 2-7 bit or grouped weights): ``x_hat = s * (q - z)`` feeds the weight
  kernel (MatMulNBits / QDQ). MatMulNBits at accuracy_level 4 re-quantizes ``x_hat`` to int8 per block inside the
  kernel (drift, see docs/onnx.md); accuracy_level 0 computes on ``x_hat`` exactly.

The quantized input is computed once per (input tensor, quantizer) and shared (q/k/v read one).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto, helper

from ptq.quant.primitives import minmax_qparams


@dataclass(frozen=True)
class ActQ:
    """One linear's input quantizer: ``bits`` None = no quantization (shift only)."""

    bits: int | None
    granularity: str = "token"
    sym: bool = False
    clip: tuple[float, float] | None = None
    shift: bytes | None = None  # fp32 [K] raw bytes (hashable); None = no shift

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1


def act_map(spec: dict, tensors) -> dict[str, ActQ]:
    """``config.json: ptq_act_quant`` -> ``{module path: ActQ}`` (``tensors[key]`` gives shift vectors)."""
    out = {}
    for name, ent in spec["linears"].items():
        quant = ent.get("quant", True) and spec.get("bits") is not None
        shift = None
        if ent.get("shift"):
            shift = np.ascontiguousarray(tensors[ent["shift"]].float().numpy().astype(np.float32)).tobytes()
        if spec["granularity"] == "tensor" and quant and ent.get("clip") is None:
            raise ValueError(f"{name}: static per-tensor activation quantization without a calibrated clip")
        out[name] = ActQ(spec["bits"] if quant else None, spec["granularity"], bool(spec["sym"]),
                         tuple(ent["clip"]) if quant and ent.get("clip") is not None else None, shift)
    return out


class ActBuilder:
    """Adds the activation-quant subgraph (module doc) to a `GraphEditor`, caching by (input, quantizer)."""

    def __init__(self, ed):
        self.ed = ed
        self.cache: dict[tuple, tuple] = {}
        self.consts: dict[tuple, str] = {}

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self.consts:
            self.consts[key] = self.ed.add_init("act_quant.const", arr)
        return self.consts[key]

    def quantize(self, x: str, aq: ActQ, tag: str) -> tuple[list, str, str | None, str | None, str | None]:
        """Nodes and ``(x_hat, q, s, z)`` names for input ``x``: ``x_hat`` fp32 fake-quant value, ``q`` fp32 codes,
        ``s`` / ``z`` scale and zero point (broadcastable ``[..., 1]`` or scalars). Without bits: x shifted."""
        key = (x, aq)
        if key in self.cache:
            return [], *self.cache[key]
        n: list = []
        p = f"{tag}/act"

        def node(op, ins, **kw):
            out = f"{p}_{len(n)}_{op}"
            n.append(helper.make_node(op, ins, [out], name=out, **kw))
            return out

        if aq.shift is not None:
            shift = np.frombuffer(aq.shift, dtype=np.float32)
            x = node("Sub", [x, self.ed.add_init(f"{tag}.input_shift", shift.copy())])
        if aq.bits is None:
            self.cache[key] = (x, None, None, None)
            return n, x, None, None, None
        zero_c = self.const(0.0)
        if aq.granularity == "token":
            axes = self.const([-1], np.int64)
            lo = node("Min", [node("ReduceMin", [x, axes], keepdims=1), zero_c])
            hi = node("Max", [node("ReduceMax", [x, axes], keepdims=1), zero_c])
            if aq.sym:
                hi = node("Max", [node("Neg", [lo]), hi])
                lo = node("Neg", [hi])
            dead = node("And", [node("Equal", [lo, zero_c]), node("Equal", [hi, zero_c])])
            lo = node("Where", [dead, self.const(-1.0), lo])
            hi = node("Where", [dead, self.const(1.0), hi])
            s = node("Div", [node("Sub", [hi, lo]), self.const(float(aq.maxq))])
            z = self.const(float((aq.maxq + 1) / 2)) if aq.sym else node("Round", [node("Div", [node("Neg", [lo]), s])])
        else:
            sc, zc = minmax_qparams(torch.tensor(float(aq.clip[0])), torch.tensor(float(aq.clip[1])), aq.bits, aq.sym)
            s, z = self.const(float(sc)), self.const(float(zc))
        q = node("Clip", [node("Add", [node("Round", [node("Div", [x, s])]), z]), zero_c, self.const(float(aq.maxq))])
        x_hat = node("Mul", [node("Sub", [q, z]), s])
        self.cache[key] = (x_hat, q, s, z)
        return n, x_hat, q, s, z


def int8_weight_ok(qw) -> bool:
    return qw.lut is None and qw.bits == 8 and qw.scale.shape[1] == 1 and not qw.act_order


def linear_int8(ed, ab: ActBuilder, site, qw, q: str, s: str, z: str, bias: str) -> list:
    """W8A8 integer matmul with the activation codes ``q`` (fp32 values in [0, 255]) — module doc."""
    tag = site.module
    zero = qw.zeros()[:, 0].round()
    b = qw.codes.t().numpy().astype(np.uint8)  # [K, N]
    colsum = (qw.codes.to(torch.int64) - zero.to(torch.int64)[:, None]).sum(1).numpy().astype(np.float32)
    y = site.node.output[0]
    p = f"{tag}/W8A8"
    nodes = [
        helper.make_node("Cast", [q], [f"{p}_q_u8"], to=TensorProto.UINT8, name=f"{p}_Cast_q"),
        helper.make_node("MatMulInteger", [f"{p}_q_u8", ed.add_init(f"{tag}.qweight", np.ascontiguousarray(b)), "",
                                           ed.add_init(f"{tag}.qzeros", zero.numpy().astype(np.uint8))],
                         [f"{p}_acc"], name=f"{p}_MatMulInteger"),
        helper.make_node("Cast", [f"{p}_acc"], [f"{p}_acc_f"], to=TensorProto.FLOAT, name=f"{p}_Cast_acc"),
        helper.make_node("Mul", [z, ed.add_init(f"{tag}.colsum", colsum)], [f"{p}_zc"], name=f"{p}_Mul_zc"),
        helper.make_node("Sub", [f"{p}_acc_f", f"{p}_zc"], [f"{p}_c"], name=f"{p}_Sub"),
        helper.make_node("Mul", [f"{p}_c", s], [f"{p}_cs"], name=f"{p}_Mul_sx"),
    ]
    w_scale = ed.add_init(f"{tag}.scales", qw.scale[:, 0].numpy().astype(np.float32))
    out = y if not bias else f"{p}_nobias"
    nodes.append(helper.make_node("Mul", [f"{p}_cs", w_scale], [out], name=f"{p}_Mul_sw"))
    if bias:
        nodes.append(helper.make_node("Add", [out, bias], [y], name=f"{p}_AddBias"))
    return nodes
