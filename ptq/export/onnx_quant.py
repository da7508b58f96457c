"""Rewrite passes: put our `QuantizedWeight`s into an fp32 ONNX graph as integer kernels (pure re-packing, never a
re-quantization). Layouts: ../shared/docs/onnx_export.md §3 (MatMulNBits), §3.5 (GatherBlockQuantized),
§4 (QDQ), §6.1 (DynamicQuantizeMatMul).

* ``nbits`` (default): ``MatMul(x, W^T)`` -> ``com.microsoft.MatMulNBits(x, B, scales, zero_points?, bias?)``,
  ``Y = x · dequant(B)^T`` with ``dequant = (q - zp) · scale`` per block of ``block_size`` along K.
  ``B [N, k_blocks, block_size·bits/8]`` = codes packed LSB-first along K (K padded to k_blocks·block_size).
* ``qdq``: portable opset-21 ``DequantizeLinear(uint4|uint8 [K, N], scale [k_blocks, N], zp, axis=0, block_size)``
  + ``MatMul`` (ORT's CPU EP fuses it to MatMulNBits with ``session.qdq_matmulnbits_accuracy_level``, default 4).
* ``w8a8``: per-channel 8-bit weights -> ``com.microsoft.DynamicQuantizeMatMul(x, B uint8 [K, N], scale [N], zp [N])``:
  ``Y = s_x·(q_x - z_x) · s_w·(q_w - z_w)`` with per-tensor dynamic uint8 activations. Weights stay the unsigned
  codes with their zero points (u8u8 kernel): exact on every x86 CPU, whereas full-range int8 weights saturate in
  the u8s8 kernel on AVX2 without VNNI (doc §6.1); ``weight_type="int8"`` (faster on VNNI) requires 7-bit
  codes (``q - z`` in [-64, 63], ORT's reduce_range).
* Embeddings (a quantized ``embed_tokens``, or a tied embedding whose lm_head is quantized):
  ``Gather`` -> ``com.microsoft.GatherBlockQuantized(data uint8 [V, H·bits/8], idx, scales [V, H/bs], zp)``.

Group sizes: MatMulNBits needs a power-of-two block >= 16. A group of ``gs`` columns is written as ``gs/bs`` blocks
of the largest such ``bs <= 128`` dividing ``gs`` with the group's scale/zero repeated (exact). Bits 3 / 5-7 are
stored in the 4 / 8-bit container with explicit zero points (exact). Act-order ``g_idx``: the layer's input is
permuted by a ``Gather(x, perm, axis=-1)`` so each group's columns become contiguous (``y = x[..., p] · W[:, p]^T``,
exact). What cannot be expressed (LUT/non-uniform codes, ragged groups, no block size) stays an fp32 MatMul with
the dequantized weight and is listed in the returned report under ``fallback_fp``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ptq.export.onnx_graph import WeightSite, _attr
from ptq.quant.primitives import default_g_idx, pack
from ptq.quant.qweight import QuantizedWeight

MS = "com.microsoft"


_KERNELS = ("MatMulNBits", "DynamicQuantizeMatMul", "GatherBlockQuantized", "DequantizeLinear", "MatMulInteger")


class NotExpressible(ValueError):
    """This QuantizedWeight has no exact encoding in the requested ONNX form."""


def container_bits(bits: int) -> int:
    """Smallest width MatMulNBits / GatherBlockQuantized support that holds ``bits``-bit codes."""
    return 2 if bits == 2 else 4 if bits <= 4 else 8


def choose_block(gs: int, max_block: int = 128) -> int | None:
    """Largest power of two in [16, max_block] dividing the group size, or None."""
    bs = max_block
    while bs >= 16:
        if gs % bs == 0:
            return bs
        bs //= 2
    return None


@dataclass
class Blocked:
    """A QuantizedWeight in contiguous blocks along K: codes ``[N, K]`` (permuted if ``perm``), per-block
    ``scale``/``zero`` ``[N, nb]``, container ``bits``; ``zero_needed`` False means the implicit 2^(bits-1)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    block: int
    perm: torch.Tensor | None
    zero_needed: bool

    @property
    def nb(self) -> int:
        return self.scale.shape[1]


def to_blocks(qw: QuantizedWeight, max_block: int = 128) -> Blocked:
    """Re-express ``qw`` as power-of-two blocks (see module doc). Raises NotExpressible."""
    if qw.lut is not None:
        raise NotExpressible("non-uniform (LUT) codes")
    n, k = qw.shape
    gs = qw.group_size
    codes, g_idx, perm = qw.codes, qw.g_idx.long(), None
    if qw.act_order:
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], default_g_idx(k, gs).long()):
            raise NotExpressible("act-order groups of unequal size")
        codes = codes[:, perm]
    bs = choose_block(gs, max_block)
    if bs is None:
        raise NotExpressible(f"group size {gs} has no power-of-two block >= 16")
    nb = -(-k // bs)
    rep = gs // bs
    gcol = torch.arange(nb) // rep  # group of each block
    scale = qw.scale.float()[:, gcol]
    zero = qw.zeros().float()[:, gcol]
    if not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() > 2 ** qw.bits - 1:
        raise NotExpressible("zero points are not integral codes")
    cb = container_bits(qw.bits)
    return Blocked(codes, scale, zero.to(torch.uint8), cb, bs, perm,
                   zero_needed=not (qw.sym and cb == qw.bits))


def matmulnbits_arrays(bl: Blocked) -> dict[str, np.ndarray]:
    """``B uint8 [N, nb, bs·bits/8]``, ``scales fp32 [N, nb]``, ``zero_points uint8 [N, ceil(nb·bits/8)]``."""
    n, k = bl.codes.shape
    kp = bl.nb * bl.block
    c = torch.nn.functional.pad(bl.codes, (0, kp - k)).reshape(n, bl.nb, bl.block)
    out = {"B": pack(c, bl.bits).numpy(), "scales": bl.scale.numpy().astype(np.float32)}
    if bl.zero_needed:
        out["zero_points"] = pack(bl.zero, bl.bits, pad_value=2 ** (bl.bits - 1)).numpy()
    return out


class GraphEditor:
    """Replaces nodes in place (keeping topological order) and adds initializers with unique names."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto, self.g = proto, proto.graph
        self.names = {i.name for i in self.g.initializer}
        self._perm_cache: dict[tuple[str, bytes], str] = {}
        self._pending: dict[str, list] = {}
        self.shared: dict[int, tuple[str, str, str]] = {}  # id(QuantizedWeight) -> (data, scales, zp)

    def add_init(self, base: str, arr: np.ndarray | TensorProto) -> str:
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        t = arr if isinstance(arr, TensorProto) else numpy_helper.from_array(arr, name)
        t.name = name
        self.g.initializer.append(t)
        return name

    def replace(self, node: onnx.NodeProto, new_nodes: list[onnx.NodeProto]) -> None:
        """Queue ``node`` (by its unique name) to be replaced by ``new_nodes``; applied by `commit`."""
        self._pending[node.name] = new_nodes

    def commit(self) -> None:
        """Apply the queued replacements, then drop nodes whose outputs nobody reads (e.g. the Transpose that fed
        a tied lm_head's fp32 MatMul)."""
        nodes = []
        for n in self.g.node:
            nodes.extend(self._pending.get(n.name, [n]))
        self._pending = {}
        outputs = {o.name for o in self.g.output}
        while True:
            used = {i for n in nodes for i in n.input} | outputs
            keep = [n for n in nodes if any(o in used for o in n.output)]
            if len(keep) == len(nodes):
                break
            nodes = keep
        del self.g.node[:]
        self.g.node.extend(nodes)

    def permuted(self, x: str, perm: torch.Tensor | None, tag: str) -> tuple[str, list]:
        """``x[..., perm]`` via one Gather shared by all layers reading ``x`` with the same permutation."""
        if perm is None:
            return x, []
        arr = perm.numpy().astype(np.int64)
        key = (x, arr.tobytes())
        if key in self._perm_cache:
            return self._perm_cache[key], []
        idx = self.add_init(f"{tag}.act_order_perm", arr)
        out = f"{x}__perm_{len(self._perm_cache)}"
        self._perm_cache[key] = out
        return out, [helper.make_node("Gather", [x, idx], [out], axis=-1, name=f"{tag}/ActOrderGather")]

    def drop_unused_initializers(self) -> None:
        used = {i for n in self.g.node for i in n.input} | {o.name for o in self.g.output}
        keep = [t for t in self.g.initializer if t.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)
        self.names = {t.name for t in keep}

    def ensure_ms_opset(self) -> None:
        if not any(o.domain == MS for o in self.proto.opset_import):
            self.proto.opset_import.append(helper.make_opsetid(MS, 1))


def _shared_2d(ed: GraphEditor, tag: str, qw: QuantizedWeight, bl: Blocked) -> tuple[str, str, str]:
    """Tied embedding + lm_head: one ``data uint8 [V, H·bits/8]``, ``scales [V, nb]``, ``zp`` set read by both
    GatherBlockQuantized and (through a constant-folded Reshape to ``[V, nb, blob]``) MatMulNBits."""
    key = id(qw)
    if key not in ed.shared:
        data = pack(bl.codes, bl.bits).numpy()  # == B.reshape(V, -1) when H % block == 0 (no padding)
        zp = pack(bl.zero, bl.bits, pad_value=2 ** (bl.bits - 1)).numpy()  # explicit: GBQ's default zp is 0
        ed.shared[key] = (ed.add_init(f"{tag}.qweight", data), ed.add_init(f"{tag}.scales", bl.scale.numpy()),
                          ed.add_init(f"{tag}.qzeros", zp))
    return ed.shared[key]


def _bias_of(site: WeightSite) -> str:
    n = site.node
    if site.kind == "gemm" and len(n.input) > 2 and n.input[2]:
        if _attr(n, "beta", 1.0) != 1.0:
            raise NotExpressible("Gemm with beta != 1")
        return n.input[2]
    return ""


def _linear_nbits(ed: GraphEditor, site: WeightSite, qw: QuantizedWeight, acc: int, share: bool = False,
                  x_in: str | None = None) -> list:
    bl = to_blocks(qw)
    n, k = qw.shape
    tag = site.module
    x, pre = ed.permuted(x_in or site.node.input[0], bl.perm, tag)
    if share and bl.perm is None and k % bl.block == 0:
        data, sc, zp = _shared_2d(ed, tag, qw, bl)
        shape = ed.add_init(f"{tag}.qweight_shape", np.array([n, bl.nb, bl.block * bl.bits // 8], np.int64))
        pre = pre + [helper.make_node("Reshape", [data, shape], [f"{tag}.qweight_3d"], name=f"{tag}/Reshape")]
        ins = [x, f"{tag}.qweight_3d", sc, zp]
    else:
        arr = matmulnbits_arrays(bl)
        ins = [x, ed.add_init(f"{tag}.qweight", arr["B"]), ed.add_init(f"{tag}.scales", arr["scales"])]
        ins.append(ed.add_init(f"{tag}.qzeros", arr["zero_points"]) if "zero_points" in arr else "")
    bias = _bias_of(site)
    if bias:
        ins += ["", bias]
    while ins and ins[-1] == "":
        ins.pop()
    attrs = dict(K=k, N=n, bits=bl.bits, block_size=bl.block)
    if acc:
        attrs["accuracy_level"] = acc
    node = helper.make_node("MatMulNBits", ins, list(site.node.output), domain=MS, name=f"{tag}/MatMulNBits", **attrs)
    return pre + [node]


def _linear_qdq(ed: GraphEditor, site: WeightSite, qw: QuantizedWeight, x_in: str | None = None) -> list:
    bl = to_blocks(qw)
    n, k = qw.shape
    tag = site.module
    x, pre = ed.permuted(x_in or site.node.input[0], bl.perm, tag)
    q, s, z = _dq_tensors(ed, tag, bl.codes.t(), bl.scale.t(), bl.zero.t(), qw.bits)
    dq_out = f"{tag}.weight_dq"
    nodes = pre + [helper.make_node("DequantizeLinear", [q, s, z], [dq_out], axis=0, block_size=bl.block,
                                    name=f"{tag}/DequantizeLinear")]
    bias = _bias_of(site)
    y = site.node.output[0]
    mm_out = f"{y}__mm" if bias else y
    nodes.append(helper.make_node("MatMul", [x, dq_out], [mm_out], name=f"{tag}/MatMul"))
    if bias:
        nodes.append(helper.make_node("Add", [mm_out, bias], [y], name=f"{tag}/AddBias"))
    return nodes


def _dq_tensors(ed: GraphEditor, tag: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                bits: int) -> tuple[str, str, str]:
    """ONNX-21 blocked DQ inputs: uint4 (bits <= 4) or uint8 codes with explicit zero points of the same type."""
    def tensor(name, t):
        t = t.contiguous()
        if bits <= 4:  # ONNX int4 packing: two per byte, element 0 in the low nibble, row-major
            raw = pack(t.reshape(-1), 4).numpy().tobytes()
            return helper.make_tensor(name, TensorProto.UINT4, list(t.shape), raw, raw=True)
        return numpy_helper.from_array(t.numpy().astype(np.uint8), name)

    return (ed.add_init(f"{tag}.qweight", tensor(f"{tag}.qweight", codes)),
            ed.add_init(f"{tag}.scales", scale.contiguous().numpy().astype(np.float32)),
            ed.add_init(f"{tag}.qzeros", tensor(f"{tag}.qzeros", zero)))


def _linear_w8a8(ed: GraphEditor, site: WeightSite, qw: QuantizedWeight, weight_type: str) -> list:
    if qw.lut is not None or qw.scale.shape[1] != 1:
        raise NotExpressible("W8A8 needs per-channel uniform weights")
    if qw.bits > 8:
        raise NotExpressible("W8A8 needs <= 8-bit weights")
    tag = site.module
    zero = qw.zeros()[:, 0]
    if weight_type == "int8":
        centered = qw.codes.to(torch.int16) - zero.to(torch.int16)[:, None]
        if not qw.sym or centered.min() < -64 or centered.max() > 63:
            raise NotExpressible("int8 (u8s8) weights need symmetric 7-bit codes (q - z in [-64, 63]) to avoid "
                                 "saturation on CPUs without VNNI; use weight_type='uint8'")
        b, zp = centered.t().numpy().astype(np.int8), None
    else:
        b, zp = qw.codes.t().numpy().astype(np.uint8), zero.numpy().astype(np.uint8)
    ins = [site.node.input[0], ed.add_init(f"{tag}.qweight", np.ascontiguousarray(b)),
           ed.add_init(f"{tag}.scales", qw.scale[:, 0].numpy().astype(np.float32))]
    ins.append(ed.add_init(f"{tag}.qzeros", zp) if zp is not None else "")
    bias = _bias_of(site)
    if bias:
        ins.append(bias)
    while ins[-1] == "":
        ins.pop()
    return [helper.make_node("DynamicQuantizeMatMul", ins, list(site.node.output), domain=MS,
                             name=f"{tag}/DynamicQuantizeMatMul")]


def _embedding(ed: GraphEditor, site: WeightSite, qw: QuantizedWeight, mode: str, share: bool = False) -> list:
    bl = to_blocks(qw)
    v, h = qw.shape
    if bl.perm is not None or h % bl.block:
        raise NotExpressible("embedding needs contiguous groups dividing the hidden size")
    tag = site.module
    idx, out = site.node.input[1], site.node.output[0]
    if mode == "qdq":
        q, s, z = _dq_tensors(ed, tag, bl.codes, bl.scale, bl.zero, qw.bits)
        dq = f"{tag}.weight_dq"
        return [helper.make_node("DequantizeLinear", [q, s, z], [dq], axis=1, block_size=bl.block,
                                 name=f"{tag}/DequantizeLinear"),
                helper.make_node("Gather", [dq, idx], [out], axis=0, name=f"{tag}/Gather")]
    if share:
        data, sc, zp = _shared_2d(ed, tag, qw, bl)
    else:
        data = ed.add_init(f"{tag}.qweight", pack(bl.codes, bl.bits).numpy())  # [V, H*bits/8] LSB-first along H
        sc = ed.add_init(f"{tag}.scales", bl.scale.numpy())
        zp = ed.add_init(f"{tag}.qzeros", pack(bl.zero, bl.bits, pad_value=2 ** (bl.bits - 1)).numpy())
    ins = [data, idx, sc, zp]  # zero points always explicit: the op's default is 0
    return [helper.make_node("GatherBlockQuantized", ins, [out], domain=MS, name=f"{tag}/GatherBlockQuantized",
                             gather_axis=0, quantize_axis=1, block_size=bl.block, bits=bl.bits)]


def _linear_act(ed: GraphEditor, ab, site: WeightSite, qw: QuantizedWeight | None, aq, mode: str, acc: int) -> list:
    """A linear whose input is quantized as calibrated (ptq.export.onnx_act): W8A8 integer kernel when both sides
    are 8-bit (per-channel weights), else fake-quant input into the mode's weight kernel (or the fp MatMul)."""
    from ptq.export.onnx_act import int8_weight_ok, linear_int8

    int8 = qw is not None and aq.bits == 8 and int8_weight_ok(qw)
    if qw is not None and not int8:
        to_blocks(qw)  # NotExpressible before any node is built (the input subgraph is cached for reuse)
    pre, x_hat, q, s, z = ab.quantize(site.node.input[0], aq, site.module)
    if int8:
        return pre + linear_int8(ed, ab, site, qw, q, s, z, _bias_of(site))
    if qw is None:
        node = onnx.NodeProto()
        node.CopyFrom(site.node)
        node.input[0] = x_hat
        return pre + [node]
    return pre + (_linear_qdq(ed, site, qw, x_hat) if mode == "qdq" else _linear_nbits(ed, site, qw, acc, x_in=x_hat))


def quantize_graph(proto: onnx.ModelProto, sites: list[WeightSite], qweights: dict[str, QuantizedWeight],
                   mode: str = "nbits", accuracy_level: int = 4, tied: dict[str, str] | None = None,
                   w8a8_weight_type: str = "uint8", act: dict | None = None) -> dict:
    """Rewrite ``proto`` in place. ``qweights``: module path -> QuantizedWeight; ``tied``: embedding path ->
    lm_head path whose QuantizedWeight it shares. ``mode``: nbits | qdq | w8a8 (W8A8 linears with per-tensor
    dynamic activations; other quantized linears fall back to nbits). ``act``: module path -> `onnx_act.ActQ`,
    the calibrated input quantizers (these linears ignore ``mode == "w8a8"``). Returns ``{"replaced": {module:
    op}, "fallback_fp": {module: reason}}`` (+ ``act_quant: {module: kernel}``)."""
    if mode not in ("nbits", "qdq", "w8a8"):
        raise ValueError(f"unknown ONNX quantization mode {mode!r}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError("accuracy_level must be 0..4")
    tied = tied or {}
    act = act or {}
    ed = GraphEditor(proto)
    report: dict = {"replaced": {}, "fallback_fp": {}}
    if act:
        from ptq.export.onnx_act import ActBuilder

        ab = ActBuilder(ed)
        report["act_quant"] = {}
    shared = {tied[s.module] for s in sites if s.kind == "gather" and s.module in tied and s.module not in qweights
              and tied[s.module] in qweights} if mode != "qdq" else set()
    for site in sites:
        qw = qweights.get(site.module)
        if qw is None and site.kind == "gather" and site.module in tied:
            qw = qweights.get(tied[site.module])
        aq = act.get(site.module) if site.kind != "gather" else None
        if qw is None and aq is None:
            continue
        share = site.module in shared or tied.get(site.module) in shared
        try:
            if aq is not None:
                new = _linear_act(ed, ab, site, qw, aq, mode, accuracy_level)
                kern = [n.op_type for n in new if n.op_type in _KERNELS + ("MatMulInteger", "MatMul", "Gemm")]
                report["act_quant"][site.module] = kern[-1] if kern else "?"
                if qw is None:
                    ed.replace(site.node, new)
                    continue
            elif site.kind == "gather":
                new = _embedding(ed, site, qw, mode, share)
            elif mode == "qdq":
                new = _linear_qdq(ed, site, qw)
            elif mode == "w8a8":
                try:
                    new = _linear_w8a8(ed, site, qw, w8a8_weight_type)
                except NotExpressible as e:
                    report.setdefault("w8a8_skipped", {})[site.module] = str(e)
                    new = _linear_nbits(ed, site, qw, accuracy_level)
            else:
                new = _linear_nbits(ed, site, qw, accuracy_level, share)
        except NotExpressible as e:
            report["fallback_fp"][site.module] = str(e)
            if aq is not None:  # fp weight, but the input is still quantized as calibrated
                ed.replace(site.node, _linear_act(ed, ab, site, None, aq, mode, accuracy_level))
            continue
        ed.replace(site.node, new)
        ops = [n.op_type for n in new]
        report["replaced"][site.module] = next((o for o in ops if o in _KERNELS), ops[-1])
    ed.commit()
    ed.drop_unused_initializers()
    if any(n.domain == MS for n in proto.graph.node):
        ed.ensure_ms_opset()
    return report


def set_accuracy_level(proto: onnx.ModelProto, level: int) -> None:
    """Set ``accuracy_level`` on every MatMulNBits (0 removes the attribute = exact fp32 compute)."""
    for n in proto.graph.node:
        if n.op_type == "MatMulNBits":
            keep = [a for a in n.attribute if a.name != "accuracy_level"]
            del n.attribute[:]
            n.attribute.extend(keep)
            if level:
                n.attribute.append(helper.make_attribute("accuracy_level", level))
