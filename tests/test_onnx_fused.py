"""Fused ONNX decoder graph (GroupQueryAttention + SkipSimplifiedLayerNorm + packed MatMulNBits, ptq/export/
onnx_fused.py): logits vs the PyTorch fake-quant model at accuracy level 0 (prefill and KV-cache decode steps),
our codes carried unchanged, the plain-graph fallback, and the onnxruntime-genai layout (skipped without
onnxruntime-genai)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from ptq.export.onnx_fused import unsupported_reason
from ptq.model_io import full_model
from ptq.quant.primitives import QuantSpec
from ptq.quant.qweight import QuantizedWeight

torch.set_num_threads(1)


def quantized(folder, spec: QuantSpec, tie: bool = False, skip=("lm_head",)):
    """Tiny model with its Linears (but ``skip``) RTN-quantized -> (fake-quant model, qweights)."""
    model, _ = full_model(folder)
    if tie:
        model.lm_head.weight = model.get_input_embeddings().weight
        model.config.tie_word_embeddings = True
    qws = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n not in skip:
            qws[n] = QuantizedWeight.from_float(m.weight.data, spec)
            m.weight.data = qws[n].dequantize()
    return model.eval(), qws


def unpack4(b: np.ndarray, n: int, k: int) -> np.ndarray:
    """MatMulNBits ``B [N, nb, bs/2]`` (4-bit, LSB first along K) -> codes ``[N, K]``."""
    flat = b.reshape(b.shape[0], -1)
    return np.stack([flat & 15, flat >> 4], -1).reshape(b.shape[0], -1)[:n, :k]


@pytest.mark.parametrize("kind,sym", [("llama", False), ("llama-gqa", True), ("qwen2", False)])
def test_fused_matches_pytorch(kind, sym, tiny_models, tmp_path):
    from cli.export_cmd import export_onnx

    model, qws = quantized(tiny_models[kind], QuantSpec(bits=4, group_size=32, sym=sym))
    rep = export_onnx(model, qws, tmp_path, accuracy_level=4)
    assert rep["graph"] == "fused" and not rep["fallback_fp"] and set(rep["replaced"]) == set(qws)
    m = onnx.load(str(tmp_path / "model.onnx"))
    ops = [n.op_type for n in m.graph.node]
    layers = model.config.num_hidden_layers
    assert ops.count("GroupQueryAttention") == layers and ops.count("SkipSimplifiedLayerNormalization") == 2 * layers
    assert ops.count("SimplifiedLayerNormalization") == 1 and ops.count("MatMulNBits") == 5 * layers  # q/k/v packed
    assert "Softmax" not in ops and "MatMul" in ops  # lm_head left fp32 here
    # codes carried unchanged: the packed q/k/v blob of layer 0 unpacks to q_proj's, k_proj's, v_proj's codes
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    b = init["model.layers.0.self_attn.qkv_proj.qweight"]
    at = "model.layers.0.self_attn"
    ref = torch.cat([qws[f"{at}.{p}_proj"].codes for p in "qkv"]).numpy()
    assert np.array_equal(unpack4(b, *ref.shape), ref)
    assert np.array_equal(init[f"{at}.qkv_proj.scales"][:, 0],
                          torch.cat([qws[f"{at}.{p}_proj"].scale[:, 0] for p in "qkv"]).numpy())
    v = rep["validation"]
    assert v["max_abs_logit_diff_acc0"] < 1e-4 and v["max_abs_decode_logit_diff_acc0"] < 1e-4
    assert v["greedy_match_acc0"] and v["greedy_prefix_match_acc0"] == 20
    assert 1e-4 < v["max_abs_logit_diff_exported"] < 0.1 * v["logit_abs_max"]  # level-4 drift, bounded
    assert v["top1_agreement_exported"] >= 0.85


def test_fused_tied_quantized_embedding(tiny_models, tmp_path):
    """Tied embedding with a quantized lm_head: GatherBlockQuantized and the lm_head MatMulNBits read one table."""
    from cli.export_cmd import export_onnx

    model, qws = quantized(tiny_models["llama-gqa"], QuantSpec(bits=4, group_size=32), tie=True, skip=())
    rep = export_onnx(model, qws, tmp_path, accuracy_level=0)
    assert rep["replaced"]["model.embed_tokens"] == "GatherBlockQuantized"
    assert rep["replaced"]["lm_head"] == "MatMulNBits"
    m = onnx.load(str(tmp_path / "model.onnx"))
    v_, h = model.lm_head.weight.shape
    tables = [t for t in m.graph.initializer if list(t.dims) == [v_, h // 2]]
    assert len(tables) == 1 and not any(sorted(t.dims) == sorted([v_, h]) for t in m.graph.initializer)
    val = rep["validation"]
    assert val["max_abs_logit_diff_acc0"] < 1e-4 and val["greedy_match_acc0"]


def test_fused_act_order_qkv(tiny_models, tmp_path):
    """GPTQ act-order: q/k/v share one input permutation (one Gather) and stay packed; exact at level 0."""
    from cli.export_cmd import export_onnx

    model, qws = quantized(tiny_models["llama-gqa"], QuantSpec(bits=4, group_size=16))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    for name in list(qws):
        if name.endswith(("q_proj", "k_proj", "v_proj")):
            q = qws[name]
            qws[name] = QuantizedWeight(q.codes, q.scale, q.zero, q.bits, q.group_size, q.g_idx[perm].contiguous())
            model.get_submodule(name).weight.data = qws[name].dequantize()
    rep = export_onnx(model, qws, tmp_path, accuracy_level=0, n_new=8)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    assert ops.count("Gather") == 2 + 2 and ops.count("MatMulNBits") == 10  # embedding + mask shape + per layer
    v = rep["validation"]
    assert v["max_abs_logit_diff_acc0"] < 1e-4 and v["greedy_match_acc0"]


def test_fallback_reasons(tiny_models, family_models):
    opt, _ = full_model(tiny_models["opt"])
    assert "model_type 'opt'" in unsupported_reason(opt)
    sliding, _ = full_model(family_models["qwen2-sliding"])
    assert "sliding-window" in unsupported_reason(sliding)
    for kind in ("llama", "mistral", "qwen2"):
        assert unsupported_reason(full_model(tiny_models[kind])[0]) is None


def test_cli_export_fused_and_plain(tiny_models, tmp_path):
    """`ptq export` writes the fused graph + genai_config.json; `--graph plain` the torch.onnx graph; OPT falls back
    to plain with the reason in the report."""
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "c"
    r = CliRunner().invoke(app, ["compress", str(tiny_models["llama-gqa"]), "--out", str(out), "--recipe", "rtn",
                                 "--bits", "4", "--group-size", "32", "--format", "gptq"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp_path / "f"), "--accuracy-level", "0"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "f" / "onnx_report.json").read_text())
    assert rep["graph"] == "fused" and rep["validation"]["greedy_match_acc0"]
    cfg = json.loads((tmp_path / "f" / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert (dec["num_key_value_heads"], dec["head_size"], dec["num_hidden_layers"]) == (2, 16, 2)
    assert cfg["search"]["past_present_share_buffer"] and (tmp_path / "f" / "tokenizer.json").exists()
    r = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp_path / "p"), "--graph", "plain"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "p" / "onnx_report.json").read_text())
    assert rep["graph"] == "plain" and not (tmp_path / "p" / "genai_config.json").exists()
    bad = CliRunner().invoke(app, ["export", str(out), "--graph", "mha"])
    assert bad.exit_code == 2 and "fused or plain" in bad.output


def test_opt_falls_back_to_plain(tiny_models, tmp_path):
    from cli.export_cmd import export_onnx

    model, qws = quantized(tiny_models["opt"], QuantSpec(bits=4, group_size=32))
    rep = export_onnx(model, qws, tmp_path, accuracy_level=0, n_new=4)
    assert rep["graph"] == "plain" and "opt" in rep["graph_fallback"]
    assert rep["validation"]["max_abs_logit_diff_acc0"] < 1e-4


@pytest.mark.parametrize("sym", [False, True])
def test_genai_runs_fused_export(sym, tiny_models, tmp_path):
    """onnxruntime-genai loads the folder as written (model.onnx + model.onnx.data, no builder step) and its greedy
    output at accuracy level 0 is the PyTorch fake-quant model's (asymmetric, and symmetric without zero points)."""
    og = pytest.importorskip("onnxruntime_genai")
    from cli.export_cmd import export_onnx
    from ptq.export.onnx_genai import write_genai_config
    from ptq.export.onnx_validate import sample_ids

    model, qws = quantized(tiny_models["llama-gqa"], QuantSpec(bits=4, group_size=32, sym=sym), tie=True, skip=())
    ids = sample_ids(model.config)
    rep = export_onnx(model, qws, tmp_path, accuracy_level=0, ids=ids, n_new=12)
    write_genai_config(tmp_path, model.config)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((tiny_models["llama-gqa"] / f).read_bytes())
    prompt = ids[0, :8].tolist()
    gm = og.Model(str(tmp_path))
    params = og.GeneratorParams(gm)
    params.set_search_options(max_length=len(prompt) + 12, do_sample=False)
    gen = og.Generator(gm, params)
    gen.append_tokens(prompt)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    assert out == rep["validation"]["torch_greedy"] and len(out) == 12
    assert (tmp_path / "model.onnx.data").exists()


@pytest.mark.parametrize("kind", ["llama", "llama-gqa"])
def test_fused_symmetric_builder_form(kind, tiny_models, tmp_path):
    """Symmetric body + symmetric 4-bit tied embedding / lm_head (`--embed-sym`, the onnxruntime-genai builder's
    int4 form): no MatMulNBits has a zero-point input, GatherBlockQuantized and the lm_head read one 4-bit table,
    the lm_head writes ``logits`` itself (no Identity), the weights are in model.onnx.data, and the logits match
    PyTorch at accuracy level 0 (prefill and decode)."""
    from cli.export_cmd import export_onnx
    from ptq.head_quant import quantize_embeddings

    model, qws = quantized(tiny_models[kind], QuantSpec(bits=4, group_size=32, sym=True), tie=True)
    tied, done = quantize_embeddings(model, qws, 4, sym=True)
    assert done == ["lm_head"] and qws["lm_head"].sym
    rep = export_onnx(model, qws, tmp_path, accuracy_level=0, tied=tied)
    assert sorted(rep["files"]) == ["model.onnx", "model.onnx.data"]
    assert rep["files"]["model.onnx.data"] > 4 * rep["files"]["model.onnx"]  # small tensors (< 1 KiB) inline
    m = onnx.load(str(tmp_path / "model.onnx"))
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 5 * model.config.num_hidden_layers + 1 and all(len(n.input) == 3 for n in nbits)
    assert "Identity" not in [n.op_type for n in m.graph.node]
    head = next(n for n in m.graph.node if "logits" in n.output)
    assert head.op_type == "MatMulNBits" and head.name == "lm_head/MatMulNBits"
    gbq = next(n for n in m.graph.node if n.op_type == "GatherBlockQuantized")
    reshape = next(n for n in m.graph.node if n.output[0] == head.input[1])
    assert reshape.input[0] == gbq.input[0] and head.input[2] == gbq.input[2]  # one table, one set of scales
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    v_, h = model.lm_head.weight.shape
    assert np.array_equal(unpack4(init[gbq.input[0]], v_, h), qws["lm_head"].codes.numpy())  # codes unchanged
    assert np.all(init[gbq.input[3]] == 0x88)  # explicit zero point 8 = the symmetric grid
    v = rep["validation"]
    assert v["max_abs_logit_diff_acc0"] < 1e-4 and v["max_abs_decode_logit_diff_acc0"] < 1e-4
    assert v["greedy_match_acc0"] and v["top1_agreement_exported"] == 1.0
