"""Activation-quantized exports that real runtimes execute: compressed-tensors ``input_activations`` loaded by
transformers (skips without compressed-tensors) and ONNX activation quantization in onnxruntime, each compared
with ptq's own fake-quant model of the same artifact (ptq.passes.act_quant hooks)."""
from __future__ import annotations

import json

import pytest
import torch

from ptq.compress import CompressOptions, UsageError, compress
from ptq.model_io import full_model
from ptq.passes.act_quant import load_act_quant


def _recipe(tmp_path, name, bits, sym, gs, act_bits, gran, passes, skip=()):
    y = tmp_path / f"{name}.yaml"
    y.write_text(f"name: {name}\ndefaults: {{bits: {bits}, group_size: {gs}, sym: {str(sym).lower()}, "
                 f"act_bits: {act_bits}, act_granularity: {gran}, format: compressed-tensors}}\n"
                 f"calibration: {{nsamples: 4, seqlen: 64}}\npasses:\n" + "".join(f"  - {p}\n" for p in passes) +
                 f"  - act-quant: {{sym: {str(sym).lower()}, skip: {list(skip)}}}\n")
    return str(y)


def _ptq_logits(folder, ids, act=True):
    model, _ = full_model(folder)
    if act:
        assert load_act_quant(model, folder) is not None
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def ids():
    return torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(0))


CASES = {  # name: (weight bits, sym, group size, act granularity, passes, skipped linears, CT weight format)
    "w8a8-token-sym": (8, True, -1, "token", ["smoothquant: {alpha: 0.5}", "rtn: {}"], (), "int-quantized"),
    "w8a8-token-asym": (8, False, -1, "token", ["rtn: {}"], (), "int-quantized"),
    "w8a8-tensor-asym": (8, False, -1, "tensor", ["rtn: {}"], (), "int-quantized"),
    "w4a8-token-sym": (4, True, 32, "token", ["os+: {grid: 8, max_steps: 8}", "rtn: {}"], (), "pack-quantized"),
    "w4a8-tensor-sym-dpfp": (4, True, 32, "tensor", ["os+: {grid: 8, max_steps: 8, down_proj: false}", "rtn: {}"],
                             ("mlp.down_proj",), "pack-quantized"),
    "w4a8-token-asym": (4, False, 32, "token", ["os+: {grid: 8, max_steps: 8}", "gptq: {}"], (), "int-quantized"),
    # the built-in W6A6 recipe as typed (passes None): asymmetric W6 -> int-quantized, down_proj weight-only
    "w6a6-os+-down-fp": (6, False, -1, "token", None, ("mlp.down_proj",), "int-quantized"),
}


@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory):
    """case -> compressed-tensors folder, compressed once per module."""
    root = tmp_path_factory.mktemp("act")
    cache = {}

    def get(case):
        if case not in cache:
            bits, sym, gs, gran, passes, skip, _ = CASES[case]
            out = root / case
            if passes is None:  # a built-in recipe with its own defaults (case name after the W/A bits)
                compress(CompressOptions(model=str(tiny_models["llama"]), out=str(out), recipe=case.split("-", 1)[1],
                                         bits=bits, act_bits=bits, nsamples=4, seqlen=64))
            else:
                compress(CompressOptions(model=str(tiny_models["llama"]), out=str(out),
                                         recipe=_recipe(root, case, bits, sym, gs, 8, gran, passes, skip)))
            cache[case] = out
        return cache[case]
    return get


@pytest.mark.parametrize("case", list(CASES))
def test_ct_activation_quant_runs_in_transformers(exports, ids, case):
    """The compressed-tensors export carries ``input_activations``; transformers + compressed-tensors executes
    them and its logits equal ptq's fake-quant model of the same artifact."""
    bits, sym, gs, gran, passes, skip, wfmt = CASES[case]
    out = exports(case)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    g0 = qc["config_groups"]["group_0"]
    assert qc["format"] == wfmt and g0["format"] == wfmt
    assert g0["input_activations"]["strategy"] == gran and g0["input_activations"]["symmetric"] == sym
    assert g0["weights"]["num_bits"] == bits and g0["weights"]["symmetric"] == sym
    assert g0["input_activations"]["dynamic"] == (gran == "token")
    if skip:
        assert qc["config_groups"]["group_1"]["targets"] == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
        assert qc["config_groups"]["group_1"]["input_activations"] is None
    ours = _ptq_logits(out, ids)
    assert (ours - _ptq_logits(out, ids, act=False)).abs().max() > 1e-3  # activation quantization matters here
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert m.model.layers[1].self_attn.q_proj.quantization_scheme.input_activations is not None
    down = m.model.layers[1].mlp.down_proj.quantization_scheme
    assert (down.input_activations is None) == bool(skip)
    with torch.no_grad():
        got = m(ids).logits
    err = (got - ours).abs().max().item()
    assert err < 1e-4 * max(1.0, ours.abs().max().item()), err


@pytest.mark.parametrize("case,tol", [("w8a8-token-asym", 1e-5), ("w8a8-tensor-asym", 1e-5),
                                      ("w4a8-tensor-sym-dpfp", 2e-2)])
def test_onnx_activation_quant_matches(exports, tmp_path, case, tol):
    """ONNX: the calibrated activation quantizers are in the graph (W8A8: MatMulInteger with per-token /
    static scales; W4A8: quantized input into MatMulNBits) and onnxruntime matches ptq's fake-quant model.
    W4A8 tolerance: fp32 summation order in MatMulNBits can flip a rounding of a later activation quantizer
    (one activation step); W8A8 is exact to fp32 rounding."""
    from cli.export_cmd import export_onnx_dir

    out = exports(case)
    rep = export_onnx_dir(out, tmp_path / "onnx", accuracy_level=4)
    kern = "MatMulInteger" if case.startswith("w8a8") else "MatMulNBits"
    n_quant = 14 - (2 if "dpfp" in case else 0)
    assert sum(1 for v in rep["act_quant"].values() if v == kern) == n_quant == len(rep["act_quant"])
    import onnx

    proto = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False)
    assert sum(1 for n in proto.graph.node if n.op_type == "Round" and "/act_" in n.name) >= n_quant // 7
    v = rep["validation"]
    assert v["max_abs_logit_diff_acc0"] < tol * v["logit_abs_max"], v
    assert v["top1_agreement_acc0"] == 1.0
    if case.startswith("w8a8"):  # integer kernel: no accuracy-level drift
        assert v["max_abs_logit_diff_exported"] < tol * v["logit_abs_max"] and v["greedy_match_exported"]


def test_ct_refuses_what_it_cannot_run(tiny_models, tmp_path):
    """OS+ explicit RMSNorm shifts have no compressed-tensors field: refused before anything is written."""
    rec = _recipe(tmp_path, "shift", 8, True, -1, 8, "token", ["os+: {grid: 4, max_steps: 4, shift: 'on'}",
                                                                 "rtn: {}"])
    with pytest.raises(ValueError, match="input shift"):
        compress(CompressOptions(model=str(tiny_models["llama"]), out=str(tmp_path / "o"), recipe=rec))
    assert not (tmp_path / "o").exists()
    with pytest.raises((ValueError, UsageError), match="at most 8"):
        compress(CompressOptions(model=str(tiny_models["llama"]), out=str(tmp_path / "o2"),
                                 recipe=_recipe(tmp_path, "a10", 8, True, -1, 10, "token", ["rtn: {}"])))
