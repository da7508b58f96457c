"""ONNX route for NUPES / PowerQuant LUT weights: each quantized Linear's fp32 weight initializer is replaced by a
dequantize-by-lookup subgraph over the stored codes (standard ONNX ops only, opset >= 13):

    codes uint8 [N, K] --Cast(int64)--> idx
    lut   fp32  [N, 2^b]                 (per-channel: levels sign(q)(|q| s)^(1/a) with the scale folded in)
    GatherElements(lut, idx, axis=1)  -> levels [N, K]          (= torch.gather(lut, 1, codes))
    grouped only: Gather(scales [N, G], g_idx int64 [K], axis=1) -> [N, K];  Mul(scales_k, levels)
    MatMul site: Transpose(perm=[1, 0]) -> W^T [K, N] -> MatMul(x, W^T)    (Gemm transB=1 site: W [N, K])

The values are bit-identical to ``QuantizedWeight.dequantize()`` (same fp32 gather and product), so the graph
matches the PyTorch fake-quant model to fp32 kernel rounding. The file stores 1 byte per weight (codes) plus the
LUT/scales. onnxruntime's constant folding turns the subgraph back into an fp32 initializer at session creation
(this is the "dequantize to fp, then MatMul" route: smaller file, fp32 memory and speed at run time; a real
LUT-GEMM kernel would need a custom op).

The fp graph and the module <-> initializer map come from ptq.export.onnx_graph (`export_graph`, `weight_sites`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ptq.quant.qweight import QuantizedWeight


def lut_tensors(qw: QuantizedWeight) -> dict[str, np.ndarray]:
    """``codes uint8 [N, K]``, ``lut fp32 [N, 2^b]`` (scale folded when per channel), optionally ``scales [N, G]``
    and ``g_idx int64 [K]``."""
    if qw.lut is None:
        raise ValueError("not a LUT weight")
    lut = qw.lut.float()
    out = {"codes": qw.codes.to(torch.uint8).numpy()}
    if qw.meta.get("lut_scaled"):
        if qw.scale.shape[1] == 1:
            out["lut"] = (qw.scale.float() * lut).numpy()
        else:
            out["lut"] = lut.numpy()
            out["scales"] = qw.scale.float().numpy()
            out["g_idx"] = qw.g_idx.to(torch.int64).numpy()
    else:
        out["lut"] = lut.numpy()
    return out


def lut_weight_subgraph(name: str, qw: QuantizedWeight, transpose: bool):
    """Nodes + initializers computing the dequantized weight; returns ``(nodes, inits, output_name)`` where the
    output is ``W^T [K, N]`` when ``transpose`` else ``W [N, K]``."""
    t = lut_tensors(qw)
    inits = [numpy_helper.from_array(np.ascontiguousarray(v), f"{name}.{k}") for k, v in t.items()]
    nodes = [helper.make_node("Cast", [f"{name}.codes"], [f"{name}.idx"], to=TensorProto.INT64, name=f"{name}/Cast"),
             helper.make_node("GatherElements", [f"{name}.lut", f"{name}.idx"], [f"{name}.levels"], axis=1,
                              name=f"{name}/GatherElements")]
    w = f"{name}.levels"
    if "scales" in t:
        nodes += [helper.make_node("Gather", [f"{name}.scales", f"{name}.g_idx"], [f"{name}.scale_k"], axis=1,
                                   name=f"{name}/GatherScale"),
                  helper.make_node("Mul", [f"{name}.scale_k", w], [f"{name}.w"], name=f"{name}/Mul")]
        w = f"{name}.w"
    if transpose:
        nodes.append(helper.make_node("Transpose", [w], [f"{name}.wT"], perm=[1, 0], name=f"{name}/Transpose"))
        w = f"{name}.wT"
    return nodes, inits, w


def rewrite_lut(proto: onnx.ModelProto, sites, qweights: dict[str, QuantizedWeight]) -> dict:
    """Replace every MatMul/Gemm weight whose module has a LUT `QuantizedWeight` (in place).

    ``sites``: `ptq.export.onnx_graph.weight_sites(proto, model)`. Returns ``{"replaced": {module: op}}``."""
    g = proto.graph
    replaced = {}
    drop = set()
    new_nodes: dict[str, list] = {}
    for i, s in enumerate(sites):
        if not s.node.name:
            s.node.name = f"lut_consumer_{i}"
        qw = qweights.get(s.module)
        if qw is None or qw.lut is None or s.kind == "gather":
            continue
        name = f"lut/{s.module}"
        nodes, inits, out = lut_weight_subgraph(name, qw, transpose=s.kind == "matmul")
        g.initializer.extend(inits)
        new_nodes[s.node.name] = nodes
        s.node.input[1] = out
        drop.add(s.init)
        replaced[s.module] = "GatherElements"
    still = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name not in drop or i.name in still]
    del g.initializer[:]
    g.initializer.extend(keep)
    ordered = []
    for n in g.node:  # the weight subgraph goes right before its consumer (topological order)
        ordered.extend(new_nodes.get(n.name, []))
        c = onnx.NodeProto()
        c.CopyFrom(n)
        ordered.append(c)
    del g.node[:]
    g.node.extend(ordered)
    return {"replaced": replaced}


@torch.no_grad()
def export_lut_onnx(model, qweights: dict[str, QuantizedWeight], path: str | Path, proto=None) -> dict:
    """Export the fake-quant ``model`` (its Linear weights = ``qweights[...].dequantize()``) to ``path`` with the
    LUT subgraphs. Returns ``{"replaced": ..., "size_bytes": ...}``."""
    from ptq.export.onnx_graph import export_graph, weight_sites

    proto = export_graph(model) if proto is None else proto
    sites = weight_sites(proto, model)
    missing = sorted(set(qweights) - {s.module for s in sites})
    if missing:
        raise ValueError(f"quantized modules not found in the ONNX graph: {missing[:5]}")
    rep = rewrite_lut(proto, sites, qweights)
    onnx.checker.check_model(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    rep["size_bytes"] = path.stat().st_size
    return rep


def ort_prefill_logits(path: str | Path, ids: np.ndarray, threads: int = 1) -> np.ndarray:
    """Logits ``[b, s, V]`` of an exported graph for ``ids [b, s]`` with empty KV caches."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, dtype=np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            _, kv, _, hd = i.shape
            feed[i.name] = np.zeros((ids.shape[0], int(kv), 0, int(hd)), np.float32)
    return sess.run(["logits"], feed)[0]
