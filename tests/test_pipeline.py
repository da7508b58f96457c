"""The layer-streaming pipeline: no passes == full forward; eval streaming == in-memory eval; RTN end to end."""
import json

import pytest
import torch

from ptq.compress import CompressOptions, compress
from ptq.eval.metrics import eval_windows, model_metrics, stream_metrics
from ptq.model_io import StreamingModel, full_model
from ptq.passes.rtn import RTNPass
from ptq.pipeline import compress_loop
from ptq.quant.primitives import QuantSpec, fake_quantize


@pytest.mark.parametrize("kind", ["llama", "llama-gqa", "mistral", "qwen2", "opt"])
def test_streaming_without_passes_equals_full_forward(tiny_models, kind):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_models[kind]).eval()
    ids = torch.randint(2, 300, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    sm = StreamingModel.open(str(tiny_models[kind]))
    res = compress_loop(sm, [], ids, QuantSpec(), batch_size=2)
    norm, head = sm.head()
    with torch.no_grad():
        out = torch.cat([head(norm(b.hidden)) for b in res.final])
    assert ref.abs().max() > 0.5  # a model that does something
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_streamed_metrics_equal_in_memory_metrics(tiny_models):
    ids = torch.randint(2, 300, (400,), generator=torch.Generator().manual_seed(1))
    w = eval_windows(ids, 64, 5)
    a = stream_metrics(StreamingModel.open(str(tiny_models["llama"])), w,
                       ref=StreamingModel.open(str(tiny_models["llama-gqa"])))
    m1, _ = full_model(tiny_models["llama"])
    m2, _ = full_model(tiny_models["llama-gqa"])
    b = model_metrics(m1, w, ref_model=m2)
    assert a.tokens == b.tokens == 5 * 63
    assert a.ppl == pytest.approx(b.ppl, rel=1e-5)
    assert a.kl == pytest.approx(b.kl, rel=1e-4) and a.kl > 0.01
    assert a.top1 == pytest.approx(b.top1)
    same = stream_metrics(StreamingModel.open(str(tiny_models["llama"])), w,
                          ref=StreamingModel.open(str(tiny_models["llama"])))
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.top1 == 1.0


def test_rtn_pass_quantizes_every_linear(tiny_models):
    sm = StreamingModel.open(str(tiny_models["opt"]))
    spec = QuantSpec(4, 32, False)

    class Keep:
        def __init__(self):
            self.q = {}
            self.orig = {}

        def write_layer(self, ctx):
            self.q.update(ctx.qweights)

    k = Keep()
    w0 = StreamingModel.open(str(tiny_models["opt"])).source.get("model.decoder.layers.1.fc1.weight")
    compress_loop(sm, [RTNPass(spec=spec)], None, spec, writer=k)
    assert len(k.q) == 2 * 6
    qw = k.q["model.decoder.layers.1.fc1"]
    torch.testing.assert_close(qw.dequantize(), fake_quantize(w0, spec), atol=0, rtol=0)


def test_compress_rtn_fp_end_to_end(tiny_models, tmp_path):
    out = tmp_path / "out"
    rep = compress(CompressOptions(model=str(tiny_models["llama"]), out=str(out), recipe="rtn", bits=4,
                                   group_size=16, format="fp"))
    assert (out / "config.json").exists() and (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "report.json").read_text())["recipe"] == "rtn"
    assert rep["size_after_bytes"] > 0
    m, _ = full_model(out)
    src = StreamingModel.open(str(tiny_models["llama"])).source
    w = src.get("model.layers.0.mlp.down_proj.weight")
    torch.testing.assert_close(m.model.layers[0].mlp.down_proj.weight, fake_quantize(w, QuantSpec(4, 16, False)))
    assert not list(tmp_path.glob(".*ptq-tmp*"))  # temp folder renamed away


def test_report_breaks_time_down_by_stage(tiny_models, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    rep = compress(CompressOptions(model=str(tiny_models["llama"]), out=str(tmp_path / "out"), recipe="gptq",
                                   bits=4, group_size=16, format="fp", nsamples=2, seqlen=32,
                                   eval_text=str(text), eval_seqlen=64, eval_windows=2))
    stages = rep["stages"]
    for name in ("load", "calibration capture", "layer load", "pass gptq", "layer forward", "write", "eval"):
        assert set(stages[name]) == {"wall_s", "cpu_s"} and stages[name]["wall_s"] >= 0, name
    assert rep["cpu_seconds"] > 0 and rep["peak_rss_bytes"] > 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["stages"].keys() == stages.keys()
