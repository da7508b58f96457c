"""ONNX export with integer kernels, run in onnxruntime against the PyTorch fake-quant model.

Op-level tests build one-node graphs through the same rewrite code; model-level tests export each tiny model's
KV-cache graph once (module fixture, the slow part) and rewrite copies of it (MatMulNBits, QDQ, W8A8).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ptq.export.onnx_graph import WeightSite, export_graph, weight_sites
from ptq.export.onnx_quant import NotExpressible, choose_block, quantize_graph, to_blocks
from ptq.export.onnx_validate import sample_ids, session, validate
from ptq.model_io import full_model
from ptq.quant.primitives import QuantSpec, fake_quantize_activation
from ptq.quant.qweight import QuantizedWeight

torch.set_num_threads(1)


def act_order(qw: QuantizedWeight, seed: int = 0) -> QuantizedWeight:
    """Same codes, scrambled group membership (what GPTQ act-order produces: g_idx = rank // gs)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(qw.shape[1], generator=g)
    return QuantizedWeight(qw.codes, qw.scale, qw.zero, qw.bits, qw.group_size, qw.g_idx[perm].contiguous())


def one_linear(qw: QuantizedWeight, mode: str, acc: int = 0, bias: bool = False, **kw):
    """One-node graph ``y = x @ W^T (+ b)`` rewritten by `quantize_graph`; returns (session, report)."""
    n, k = qw.shape
    w = qw.dequantize()
    inits = [numpy_helper.from_array(w.t().contiguous().numpy(), "W")]
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    site_kind = "matmul"
    if bias:
        inits = [numpy_helper.from_array(w.numpy(), "W"), numpy_helper.from_array(np.full(n, 0.5, np.float32), "b")]
        node = helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="mm", transB=1)
        site_kind = "gemm"
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    rep = quantize_graph(m, [WeightSite(m.graph.node[0], "lin", "W", site_kind)], {"lin": qw}, mode=mode,
                         accuracy_level=acc, **kw)
    return session(m.SerializeToString(), qdq_accuracy_level=0 if mode == "qdq" else None), rep, m


def test_choose_block():
    assert [choose_block(g) for g in (32, 128, 256, 48, 688, 576, 8, 100)] == [32, 128, 128, 16, 16, 64, None, None]


@pytest.mark.parametrize("bits,gs,sym,perm", [(4, 32, False, False), (4, 32, True, False), (4, 16, False, True),
                                              (3, 32, False, False), (3, 32, True, False), (8, 64, True, False),
                                              (2, 16, False, False), (6, -1, False, False), (4, 48, False, False)])
def test_matmulnbits_matches_dequantized(bits, gs, sym, perm):
    torch.manual_seed(bits * 100 + max(gs, 0))
    w = torch.randn(24, 80)  # K = 80: not a multiple of 32/64 -> padded last block / short last group
    qw = QuantizedWeight.from_float(w, QuantSpec(bits=bits, group_size=gs, sym=sym))
    if perm:
        qw = act_order(qw)
        assert qw.act_order
    sess, rep, m = one_linear(qw, "nbits")
    assert rep["replaced"] == {"lin": "MatMulNBits"} and not rep["fallback_fp"]
    x = torch.randn(5, 80)
    y = sess.run(None, {"x": x.numpy()})[0]
    ref = (x.double() @ qw.dequantize().double().t()).numpy()
    assert np.abs(y - ref).max() < 2e-5 * np.abs(ref).max()
    ops = [n.op_type for n in m.graph.node]
    assert ops == (["Gather", "MatMulNBits"] if perm else ["MatMulNBits"])


def test_matmulnbits_bias_and_acc4_drift():
    torch.manual_seed(1)
    qw = QuantizedWeight.from_float(torch.randn(32, 64), QuantSpec(bits=4, group_size=32))
    x = torch.randn(3, 64)
    ref = (x @ qw.dequantize().t() + 0.5).numpy()
    y0 = one_linear(qw, "nbits", 0, bias=True)[0].run(None, {"x": x.numpy()})[0]
    y4 = one_linear(qw, "nbits", 4, bias=True)[0].run(None, {"x": x.numpy()})[0]
    assert np.abs(y0 - ref).max() < 1e-4
    d4 = np.abs(y4 - ref).max()  # int8 activations inside the kernel: small but non-zero drift
    assert 1e-5 < d4 < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("bits,perm", [(4, False), (4, True), (8, False)])
def test_qdq_matches_dequantized(bits, perm):
    torch.manual_seed(3)
    qw = QuantizedWeight.from_float(torch.randn(16, 96), QuantSpec(bits=bits, group_size=32))
    if perm:
        qw = act_order(qw, 1)
    sess, rep, m = one_linear(qw, "qdq")
    assert "DequantizeLinear" in [n.op_type for n in m.graph.node]
    x = torch.randn(4, 96)
    y = sess.run(None, {"x": x.numpy()})[0]
    assert np.abs(y - (x @ qw.dequantize().t()).numpy()).max() < 1e-4


def test_not_expressible_falls_back():
    qw = QuantizedWeight.from_float(torch.randn(8, 64), QuantSpec(bits=4, group_size=8))
    with pytest.raises(NotExpressible):
        to_blocks(qw)
    sess, rep, m = one_linear(qw, "nbits")
    assert rep["fallback_fp"] == {"lin": "group size 8 has no power-of-two block >= 16"} and not rep["replaced"]
    x = torch.randn(2, 64)
    assert np.abs(sess.run(None, {"x": x.numpy()})[0] - (x @ qw.dequantize().t()).numpy()).max() < 1e-5


def test_w8a8_dynamic_quantize_matmul():
    """Full-range int8 weights through the u8u8 kernel are exact vs per-tensor dynamic activation fake-quant."""
    torch.manual_seed(4)
    w = torch.randn(48, 128) * 0.05
    qw = QuantizedWeight.from_float(w, QuantSpec(bits=8, group_size=-1, sym=True))
    assert (qw.codes.int() - 128).abs().max() > 100  # full range: saturates a u8s8 kernel without VNNI
    sess, rep, _ = one_linear(qw, "w8a8", bias=True)
    assert rep["replaced"] == {"lin": "DynamicQuantizeMatMul"}
    x = torch.randn(6, 128) * 2
    x[0, 0] = 9.0
    ref = fake_quantize_activation(x, 8, "tensor").double() @ qw.dequantize().double().t() + 0.5
    y = sess.run(None, {"x": x.numpy()})[0]
    assert np.abs(y - ref.numpy()).max() < 1e-4
    # int8 (u8s8) weights must be 7-bit; full-range codes fall back to MatMulNBits, reported
    rep = one_linear(qw, "w8a8", w8a8_weight_type="int8", bias=True)[1]
    assert "lin" in rep["w8a8_skipped"] and rep["replaced"] == {"lin": "MatMulNBits"}
    qw7 = QuantizedWeight.from_float(w, QuantSpec(bits=7, group_size=-1, sym=True))
    sess, rep, _ = one_linear(qw7, "w8a8", w8a8_weight_type="int8", bias=True)
    assert rep["replaced"] == {"lin": "DynamicQuantizeMatMul"}
    ref7 = fake_quantize_activation(x, 8, "tensor").double() @ qw7.dequantize().double().t() + 0.5
    assert np.abs(sess.run(None, {"x": x.numpy()})[0] - ref7.numpy()).max() < 1e-4


def test_gather_block_quantized():
    torch.manual_seed(5)
    v, h = 40, 64
    qw = QuantizedWeight.from_float(torch.randn(v, h), QuantSpec(bits=4, group_size=32, sym=True))
    g = helper.make_graph([helper.make_node("Gather", ["E", "ids"], ["y"], name="g")], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, h])],
                          [numpy_helper.from_array(qw.dequantize().numpy(), "E")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    rep = quantize_graph(m, [WeightSite(m.graph.node[0], "emb", "E", "gather")], {"emb": qw})
    assert rep["replaced"] == {"emb": "GatherBlockQuantized"}
    ids = np.array([0, 7, 39, 7])
    y = session(m.SerializeToString()).run(None, {"ids": ids})[0]
    assert np.array_equal(y, qw.dequantize()[torch.from_numpy(ids)].numpy())


# ---------------------------------------------------------------------------------------------- model level


def quantized_model(folder, spec: QuantSpec, embed: bool = False, act_order_layers=("mlp.down_proj",),
                    tie: bool = False):
    """Tiny model with every Linear (incl. lm_head) RTN-quantized: (fake-quant model, qweights). ``tie``: the
    lm_head shares the embedding table (SmolLM2-style; the graph reads it through a Transpose)."""
    model, _ = full_model(folder)
    if tie:
        model.lm_head.weight = model.get_input_embeddings().weight
        model.config.tie_word_embeddings = True
    qws = {}
    for n, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            qw = QuantizedWeight.from_float(mod.weight.data, spec)
            if any(n.endswith(a) for a in act_order_layers) and spec.group_size != -1:
                qw = act_order(qw, len(qws))
            mod.weight.data = qw.dequantize()
            qws[n] = qw
        elif isinstance(mod, torch.nn.Embedding) and embed and not (tie and "embed_tokens" in n):
            qw = QuantizedWeight.from_float(mod.weight.data, spec)
            mod.weight.data = qw.dequantize()
            qws[n] = qw
    return model.eval(), qws


@pytest.fixture(scope="module")
def exported(tiny_models):
    """kind -> (fake-quant int4 model, qweights, fp graph of that model); one torch.onnx export per kind.
    The MHA llama is tied (its embedding is served by the lm_head's int4 codes)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            model, qws = quantized_model(tiny_models[kind], QuantSpec(bits=4, group_size=32), embed=True,
                                         tie=kind == "llama")
            cache[kind] = (model, qws, export_graph(model))
        return cache[kind]
    return get


@pytest.mark.parametrize("kind", ["llama", "llama-gqa", "opt"])
def test_int4_model_matches_pytorch(kind, exported, tmp_path):
    from cli.export_cmd import export_onnx

    model, qws, proto = exported(kind)
    n_lin = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    n_emb = sum(isinstance(m, torch.nn.Embedding) for m in model.modules())  # OPT: tokens + positions
    rep = export_onnx(model, qws, tmp_path, mode="nbits", accuracy_level=4, proto=copy.deepcopy(proto))
    m = onnx.load(str(tmp_path / "model.onnx"))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("MatMulNBits") == n_lin and ops.count("GatherBlockQuantized") == n_emb
    assert any("embed_tokens" in k for k in qws) == (kind != "llama")  # tied llama: served by the lm_head codes
    assert not rep["fallback_fp"] and not any(i.data_type == TensorProto.FLOAT and len(i.dims) == 2 and
                                              min(i.dims) >= 64 for i in m.graph.initializer)
    v = rep["validation"]
    assert v["max_abs_logit_diff_acc0"] < 1e-4 and v["max_abs_decode_logit_diff_acc0"] < 1e-4
    assert v["greedy_match_acc0"] and v["greedy_prefix_match_acc0"] == 20
    assert 1e-4 < v["max_abs_logit_diff_exported"] < 0.1 * v["logit_abs_max"]  # acc 4 drift, bounded
    assert v["top1_agreement_exported"] >= 0.85
    assert json.loads((tmp_path / "onnx_report.json").read_text())["validation"]["greedy_match_acc0"]
    fp_size = sum(numpy_helper.to_array(i).nbytes for i in proto.graph.initializer)
    q_size = sum(len(i.raw_data) for i in m.graph.initializer)
    assert q_size < 0.25 * fp_size and rep["size_bytes"] < 0.5 * fp_size


def test_qdq_and_w8a8_models(exported, tiny_models, tmp_path):
    from cli.export_cmd import export_onnx

    model, qws, proto = exported("llama-gqa")
    rep = export_onnx(model, qws, tmp_path / "qdq", mode="qdq", proto=copy.deepcopy(proto))
    assert set(rep["replaced"].values()) == {"DequantizeLinear"}
    v = rep["validation"]
    assert v["max_abs_logit_diff_acc0"] < 1e-4 and v["greedy_match_acc0"]
    assert v["max_abs_logit_diff_exported"] < 0.1 * v["logit_abs_max"]

    # W8A8: synthetic per-channel 8-bit weights put into the same graph (every Linear is replaced; the
    # embedding stays the int4-dequantized fp Gather, so the reference model gets the same embedding)
    m8, q8 = quantized_model(tiny_models["llama-gqa"], QuantSpec(bits=8, group_size=-1, sym=True))
    m8.get_input_embeddings().weight.data = model.get_input_embeddings().weight.data.clone()
    p8 = copy.deepcopy(proto)
    sites = weight_sites(p8, model)  # map on the model the graph came from, then rewrite with the W8 codes
    rw = quantize_graph(p8, sites, q8, mode="w8a8")
    assert set(rw["replaced"].values()) == {"DynamicQuantizeMatMul"} and len(rw["replaced"]) == len(q8)
    onnx.save_model(p8, str(tmp_path / "w8.onnx"))
    v = validate(tmp_path / "w8.onnx", m8, sample_ids(m8.config), w8a8_modules=sorted(q8))
    assert v["max_abs_logit_diff_exported"] < 1e-3 and v["greedy_match_exported"]
    assert v["max_abs_decode_logit_diff_exported"] < 1e-3


def test_cli_compress_format_onnx(tiny_models, tmp_path):
    """`ptq compress --format onnx`: gptq checkpoint -> exact QuantizedWeights via its reader -> ONNX + report."""
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "c"
    r = CliRunner().invoke(app, ["compress", str(tiny_models["llama-gqa"]), "--out", str(out), "--recipe", "rtn",
                                 "--bits", "4", "--group-size", "16", "--format", "onnx"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "onnx" / "onnx_report.json").read_text())
    assert set(rep["replaced"].values()) == {"MatMulNBits"} and len(rep["replaced"]) == 14  # 2 layers x 7
    v = rep["validation"]
    assert v["max_abs_logit_diff_acc0"] < 1e-4 and v["greedy_match_acc0"]
    assert (out / "onnx" / "tokenizer.json").exists() and rep["accuracy_level"] == 4
    bad = CliRunner().invoke(app, ["export", str(out), "--format", "tflite"])
    assert bad.exit_code == 2 and "not supported" in bad.output


def test_external_data_above_threshold(tmp_path, monkeypatch):
    """Above the threshold the initializers go to model.onnx.data and ORT still loads the model."""
    import ptq.export.onnx_graph as og

    qw = QuantizedWeight.from_float(torch.randn(64, 256), QuantSpec(bits=4, group_size=32))
    _, _, m = one_linear(qw, "nbits")
    monkeypatch.setattr(og, "EXTERNAL_DATA_THRESHOLD", 1000)
    files = og.save_model(m, tmp_path / "model.onnx")
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "model.onnx.data").stat().st_size > 64 * 256 // 2 > (tmp_path / "model.onnx").stat().st_size
    x = torch.randn(2, 256)
    y = session(tmp_path / "model.onnx").run(None, {"x": x.numpy()})[0]
    assert np.abs(y - (x @ qw.dequantize().t()).numpy()).max() < 1e-4


def test_tied_embedding_shares_lm_head_codes():
    """Tied embedding + quantized lm_head: GatherBlockQuantized and MatMulNBits read one packed tensor."""
    torch.manual_seed(6)
    v, h = 48, 64
    qw = QuantizedWeight.from_float(torch.randn(v, h), QuantSpec(bits=4, group_size=32, sym=True))
    w = qw.dequantize()
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="g"),
             helper.make_node("MatMul", ["e", "WT"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, v])],
                          [numpy_helper.from_array(w.numpy(), "E"), numpy_helper.from_array(w.t().contiguous().numpy(), "WT")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    sites = [WeightSite(m.graph.node[0], "emb", "E", "gather"), WeightSite(m.graph.node[1], "head", "WT", "matmul")]
    rep = quantize_graph(m, sites, {"head": qw}, accuracy_level=0, tied={"emb": "head"})
    assert rep["replaced"] == {"emb": "GatherBlockQuantized", "head": "MatMulNBits"}
    assert sum(i.data_type == TensorProto.UINT8 and list(i.dims) == [v, h // 2] for i in m.graph.initializer) == 1
    assert not any(i.data_type == TensorProto.FLOAT and len(i.dims) == 2 and i.dims[1] >= 32
                   for i in m.graph.initializer if i.name.endswith(("E", "WT")))
    ids = np.array([3, 0, 47])
    y = session(m.SerializeToString()).run(None, {"ids": ids})[0]
    ref = (w[torch.from_numpy(ids)].double() @ w.double().t()).numpy()
    assert np.abs(y - ref).max() < 1e-4
