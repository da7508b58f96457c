"""Embedding / lm_head quantizers of ``ptq export --embed-bits`` (ptq/head_quant.py): clipped RTN lowers the weight
error, GPTQ on the lm_head lowers the logit error ``tr(dW H dW^T)``, a tied embedding shares the lm_head's codes,
and the CLI option reaches the ONNX export."""
from __future__ import annotations

import json

import pytest
import torch

from ptq.head_quant import head_hessian, quantize_embeddings, quantize_head
from ptq.model_io import full_model

torch.set_num_threads(1)


def logit_err(w, wq, H):
    """``tr((W - W_hat) H (W - W_hat)^T)``: the summed squared logit error over the Hessian's inputs (up to 2/T)."""
    d = (w - wq).double()
    return float(torch.einsum("vi,ij,vj->", d, H.double(), d))


def test_clipped_rtn_lowers_weight_error():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((256, 64)) * 0.02  # heavy tails: min/max wastes the grid
    err = {m: float(((quantize_head(w, 4, 32, m).dequantize() - w) ** 2).sum()) for m in ("rtn", "mse", "octav")}
    assert err["mse"] < 0.96 * err["rtn"] and err["octav"] < 0.99 * err["rtn"]  # 0.945x, 0.984x
    q = quantize_head(w, 4, 32, "mse")
    assert q.zero is not None and q.group_size == 32 and q.codes.max() <= 15 and not q.act_order


def test_gptq_head_lowers_logit_error():
    g = torch.Generator().manual_seed(1)
    d, v, t = 64, 320, 2048
    x = torch.randn(t, d, generator=g) @ (torch.randn(d, d, generator=g) * 0.3 + torch.eye(d))  # correlated inputs
    w = torch.randn(v, d, generator=g) * 0.05
    H = 2 / t * x.T @ x
    rtn = quantize_head(w, 4, 32, "rtn")
    gq = quantize_head(w, 4, 32, "gptq", H)
    assert not gq.act_order and gq.zero is not None and torch.equal(gq.scale, rtn.scale)  # static groups: RTN grid
    e_rtn, e_gptq = logit_err(w, rtn.dequantize(), H), logit_err(w, gq.dequantize(), H)
    assert e_gptq < 0.7 * e_rtn
    rtn_s, gq_s = quantize_head(w, 4, 32, "rtn", sym=True), quantize_head(w, 4, 32, "gptq", H, sym=True)
    assert rtn_s.sym and gq_s.sym and gq_s.zero is None and torch.equal(gq_s.scale, rtn_s.scale)  # no zero points
    assert logit_err(w, gq_s.dequantize(), H) < 0.7 * logit_err(w, rtn_s.dequantize(), H)
    with pytest.raises(ValueError, match="Hessian"):
        quantize_head(w, 4, 32, "gptq")
    with pytest.raises(ValueError, match="one of"):
        quantize_head(w, 4, 32, "lloyd")


def test_tied_gptq_shares_codes(tiny_models):
    model, _ = full_model(tiny_models["llama-gqa"])
    model.lm_head.weight = model.get_input_embeddings().weight
    model.eval()
    ids = torch.randint(2, 320, (3, 24), generator=torch.Generator().manual_seed(2))
    H = head_hessian(model, ids)
    with torch.no_grad():
        h = torch.cat([model.model(input_ids=r[None]).last_hidden_state[0] for r in ids])
    torch.testing.assert_close(H, 2 / h.shape[0] * h.T @ h, rtol=1e-5, atol=1e-6)  # final-norm outputs
    w = model.lm_head.weight.data.clone()
    e_rtn = logit_err(w, quantize_head(w, 4, 32, "rtn").dequantize(), H)
    qws = {}
    tied, done = quantize_embeddings(model, qws, 4, method="gptq", calib_ids=ids)
    assert tied == {"model.embed_tokens": "lm_head"} and done == ["lm_head"] and list(qws) == ["lm_head"]
    assert torch.equal(model.get_input_embeddings().weight, qws["lm_head"].dequantize())  # one table, both uses
    assert logit_err(w, qws["lm_head"].dequantize(), H) < e_rtn
    with pytest.raises(ValueError, match="calibration"):
        quantize_embeddings(full_model(tiny_models["llama"])[0], {}, 4, method="gptq")


def test_cli_export_embed_method(tiny_models, tmp_path):
    """`ptq export --embed-bits 4 --embed-method gptq`: untied lm_head by GPTQ, embedding by RTN, exact at level 0."""
    pytest.importorskip("onnxruntime")
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "c"
    r = CliRunner().invoke(app, ["compress", str(tiny_models["llama"]), "--out", str(out), "--recipe", "rtn",
                                 "--bits", "4", "--group-size", "32", "--format", "gptq"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp_path / "o"), "--accuracy-level", "0",
                                 "--embed-bits", "4", "--embed-method", "gptq"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "o" / "onnx_report.json").read_text())
    assert rep["embed_quant"] == {"bits": 4, "group_size": 32, "sym": False, "method": "gptq"}
    assert sorted(rep["quantized_at_export"]) == ["lm_head", "model.embed_tokens"]
    assert rep["replaced"]["lm_head"] == "MatMulNBits" and rep["replaced"]["model.embed_tokens"] == "GatherBlockQuantized"
    assert rep["validation"]["max_abs_logit_diff_acc0"] < 1e-4 and rep["validation"]["greedy_match_acc0"]
    r = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp_path / "s"), "--accuracy-level", "0",
                                 "--embed-bits", "4", "--embed-method", "gptq", "--embed-sym"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "s" / "onnx_report.json").read_text())
    assert rep["embed_quant"] == {"bits": 4, "group_size": 32, "sym": True, "method": "gptq"}
    assert rep["validation"]["max_abs_logit_diff_acc0"] < 1e-4 and rep["validation"]["greedy_match_acc0"]
    import onnx

    head = next(n for n in onnx.load(str(tmp_path / "s" / "model.onnx")).graph.node if "logits" in n.output)
    assert head.op_type == "MatMulNBits" and len(head.input) == 3  # symmetric: no zero-point input
    bad = CliRunner().invoke(app, ["export", str(out), "--embed-method", "gptq"])
    assert bad.exit_code == 2 and "needs --embed-bits" in bad.output
    bad = CliRunner().invoke(app, ["export", str(out), "--embed-sym"])
    assert bad.exit_code == 2 and "--embed-sym needs --embed-bits" in bad.output
    bad = CliRunner().invoke(app, ["export", str(out), "--embed-bits", "4", "--embed-method", "kmeans"])
    assert bad.exit_code == 2 and "--embed-method must be one of" in bad.output


def test_compress_onnx_embed_method(tiny_models, tmp_path):
    """`ptq compress --format onnx --embed-bits 4 --embed-method gptq` reaches the ONNX step (lm_head by GPTQ on the
    calibration text); a stray --embed-method is refused before any work."""
    pytest.importorskip("onnxruntime")
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "c"
    r = CliRunner().invoke(app, ["compress", str(tiny_models["llama"]), "--out", str(out), "--recipe", "rtn",
                                 "--bits", "4", "--group-size", "32", "--format", "onnx", "--accuracy-level", "0",
                                 "--embed-bits", "4", "--embed-method", "gptq"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "onnx" / "onnx_report.json").read_text())
    assert rep["embed_quant"]["method"] == "gptq" and rep["replaced"]["lm_head"] == "MatMulNBits"
    assert rep["validation"]["max_abs_logit_diff_acc0"] < 1e-4
    bad = CliRunner().invoke(app, ["compress", str(tiny_models["llama"]), "--out", str(tmp_path / "b"),
                                   "--recipe", "rtn", "--embed-method", "gptq"])
    assert bad.exit_code == 2 and "needs --format onnx and --embed-bits" in bad.output
    assert not (tmp_path / "b").exists()
