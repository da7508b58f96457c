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
}


@pytest.mark.parametrize("case", list(CASES))
def test_ct_activation_quant_runs_in_transformers(tiny_models, tmp_path, ids, case):
    """The compressed-tensors export carries ``input_activations``; transformers + compressed-tensors executes
    them and its logits equal ptq's fake-quant model of the same artifact."""
    bits, sym, gs, gran, passes, skip, wfmt = CASES[case]
    out = tmp_path / "ct"
    compress(CompressOptions(model=str(tiny_models["llama"]), out=str(out),
                             recipe=_recipe(tmp_path, case, bits, sym, gs, 8, gran, passes, skip)))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    g0 = qc["config_groups"]["group_0"]
    assert qc["format"] == wfmt and g0["format"] == wfmt
    assert g0["input_activations"]["strategy"] == gran and g0["input_activations"]["symmetric"] == sym
    assert g0["input_activations"]["dynamic"] == (gran == "token")
    if skip:
        assert qc["config_groups"]["group_1"]["targets"] == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
        assert qc["config_groups"]["group_1"]["input_activations"] is None
    ours = _ptq_logits(out, ids)
    assert (ours - _ptq_logits(out, ids, act=False)).abs().max() > 1e-3  # activation quantization matters here
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    lin = m.model.layers[1].self_attn.q_proj
    assert lin.quantization_scheme.input_activations is not None
    with torch.no_grad():
        got = m(ids).logits
    err = (got - ours).abs().max().item()
    assert err < 1e-4 * max(1.0, ours.abs().max().item()), err


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
