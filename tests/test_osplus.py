"""OS+ / SmoothQuant / activation fake-quant: exact folding on tiny Llama and OPT, error ordering on planted
outlier channels, act-quant export round trip."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ptq.export.base import DenseWriter
from ptq.model_io import StreamingModel, full_model
from ptq.passes.act_quant import ActQuantPass, install_streaming, load_act_quant
from ptq.passes.migration import fold_scale, fold_shift, make_act_quant
from ptq.passes.osplus import LossProbe, OSPlusPass, search_scale
from ptq.passes.rtn import RTNPass
from ptq.passes.smoothquant import SmoothQuantPass, smooth_scales
from ptq.pipeline import compress_loop
from ptq.quant.primitives import QuantSpec, fake_quantize, fake_quantize_activation
from ptq.recipes import Defaults
from conftest import make_tiny

NORMS = {"llama": ("input_layernorm", "post_attention_layernorm"),
         "opt": ("self_attn_layer_norm", "final_layer_norm")}


def outlier_model(kind: str, folder: Path) -> Path:
    """Tiny model whose norms produce a few large, offset channels (the OS+ outlier pattern)."""
    make_tiny(kind, folder)
    f = folder / "model.safetensors"
    sd = load_file(str(f))
    g = torch.Generator().manual_seed(1)
    for k in list(sd):
        if any(f".{n}.weight" in k for n in NORMS[kind]):
            idx = torch.randperm(sd[k].numel(), generator=g)[:4]
            sd[k][idx] *= 25.0 if kind == "llama" else 10.0
            if kind == "opt":
                sd[k.replace(".weight", ".bias")][idx] += 4.0
    save_file(sd, str(f), metadata={"format": "pt"})
    return folder


def run(folder, passes, out, defaults, nsamples=2, seqlen=32):
    sm = StreamingModel.open(str(folder))
    spec = QuantSpec(bits=4, group_size=-1)
    for p in passes:
        p.spec, p.defaults = spec, defaults
    ids = torch.randint(2, 300, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    w = DenseWriter(out, sm, spec)
    loop = compress_loop(sm, passes, ids, spec, w)
    w.write_nonlayer()
    w.finalize(loop.artifacts)
    return loop


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("kind,shift", [("llama", "auto"), ("llama", "on"), ("opt", "auto")])
def test_osplus_transform_is_exact(tmp_path, kind, shift):
    src = outlier_model(kind, tmp_path / "src")
    p = OSPlusPass(OSPlusPass.Options(shift=shift, grid=8, max_steps=8, search_samples=1))
    loop = run(src, [p], tmp_path / "out", Defaults(act_bits=4))
    st = loop.layer_stats
    assert max(s["attn_in.os_smax"] for s in st) > 1.5  # the migration really rescaled channels
    assert all(s["mlp_in.os_loss"] <= s["mlp_in.os_loss_noscale"] for s in st)
    ref, _ = full_model(src)
    new, cfg = full_model(tmp_path / "out")
    spec = load_act_quant(new, tmp_path / "out")
    if shift == "on":
        assert cfg.attention_bias and cfg.mlp_bias
        shifted = [k for k, v in spec["linears"].items() if v["shift"]]
        assert len(shifted) == 10 and all(k.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
                                          for k in shifted)
        assert float(new.model.layers[0].self_attn.q_proj.bias.detach().abs().max()) > 0
    else:
        assert spec is None
    if kind == "opt":  # LayerNorm shift folded into the norm bias
        assert not torch.allclose(ref.model.decoder.layers[0].self_attn_layer_norm.bias,
                                  new.model.decoder.layers[0].self_attn_layer_norm.bias)
    ids = torch.randint(2, 300, (2, 48), generator=torch.Generator().manual_seed(5))
    a, b = logits(ref, ids), logits(new, ids)
    assert a.abs().max() > 1
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


class _Fc:
    """Duck-typed sub-module for `search_scale`: one linear, f(x) = x W^T + b."""

    kind = "linear"

    def __init__(self, lin):
        self.lins = [lin]

    def run(self, x, i):
        return self.lins[0](x)


def planted(T=512, C=64, O=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, C, generator=g)
    x[:, :3] = x[:, :3] * 15 + torch.tensor([40.0, -30.0, 25.0])  # offset, wide outlier channels
    lin = torch.nn.Linear(C, O)
    with torch.no_grad():
        lin.weight.normal_(0, 0.1, generator=g)
        lin.bias.normal_(0, 0.1, generator=g)
    return x, lin


@pytest.mark.parametrize("gran", ["tensor", "token"])
def test_outlier_error_ordering_w8a8(gran):
    x, lin = planted()
    wspec = QuantSpec(bits=8, group_size=-1)
    y = lin(x).detach()

    def err(xq, w, b):
        return float(((xq @ w.T + b) - y).pow(2).sum(-1).mean())

    def aq(v):
        return fake_quantize_activation(v, 8, gran)

    W, b = lin.weight.detach(), lin.bias.detach()
    naive = err(aq(x), fake_quantize(W, wspec), b)
    s = smooth_scales(x.abs().amax(0), [W], 0.5)
    sq = err(aq(x / s), fake_quantize(W * s, wspec), b)
    # OS+: shift, then the scale search on the shifted activation (sub-module = the linear itself)
    z = (x.amax(0) + x.amin(0)) / 2
    shifted = torch.nn.Linear(64, 48)
    with torch.no_grad():
        shifted.weight.copy_(W)
        shifted.bias.copy_(b + W @ z)
    xs = [(x - z)[None]]
    act_q = make_act_quant(8, gran, False)
    act_q.granularity = gran
    probe = LossProbe(_Fc(shifted), xs, wspec, act_q, loss_tokens=0, loss_rows=0)
    amax = (x - z).abs().amax(0)
    s_os, t, info = search_scale(probe, amax, 1.0, 60, 60, coarse=0)
    osp = err(aq((x - z) / s_os), fake_quantize(W * s_os, wspec), b + W @ z)
    assert osp == pytest.approx(info["loss"], rel=1e-3)
    assert osp < sq < naive, (osp, sq, naive)
    assert osp < 0.5 * naive
    # coarse-to-fine with early stopping lands on the dense grid's choice (or one as good) with fewer evaluations
    _, t_fast, fast = search_scale(probe, amax, 1.0, 60, 60, coarse=8, patience=2)
    assert fast["evals"] < info["evals"] == 61
    assert fast["loss"] <= info["loss"] * 1.02, (t_fast, t)
    # the loss on a token / output-row subsample (outlier tokens kept) picks a scale as good on all the data
    sub_probe = LossProbe(_Fc(shifted), xs, wspec, act_q, loss_tokens=128, loss_rows=16)
    assert sub_probe.X.shape == (128, 64) and sub_probe.W[0].shape == (16, 64)
    s_sub, t_sub, _ = search_scale(sub_probe, amax, 1.0, 60, 60)
    full = probe.losses(torch.stack([s_sub]), [(-t_sub, t_sub)] if gran == "tensor" else [None])[0]
    assert full <= info["loss"] * 1.1, (full, info["loss"])


def test_subsampled_loss_is_unbiased():
    """The token subsample keeps the outlier tokens and reweights the random rest to the population it stands
    for: its loss estimates the full-data loss, where the unweighted mean over-counts the outliers."""
    x, lin = planted(T=2048, seed=3)
    x[:40] *= 6.0  # a few outlier tokens (the top-k of the subsample)
    wspec = QuantSpec(bits=4, group_size=-1)
    act_q = make_act_quant(4, "token", False)
    xs = [x[None]]
    s = torch.ones(1, 64)
    full = LossProbe(_Fc(lin), xs, wspec, act_q, 0, 0).losses(s, [None])[0]
    est = []
    for unbiased in (True, False):
        LossProbe.unbiased = unbiased
        try:
            est.append(sum(LossProbe(_Fc(lin), xs, wspec, act_q, 256, 0, seed=k).losses(s, [None])[0]
                           for k in range(4)) / 4)
        finally:
            LossProbe.unbiased = True
    assert abs(est[0] / full - 1) < 0.1, (est[0], full)
    assert est[1] > 1.5 * full, (est[1], full)


def test_normed_down_loss_and_shared_mlp_capture(tmp_path):
    """down_loss normed: down_proj's token errors are divided by the residual's mean square; the gate/up and
    down_proj inputs are captured in one partial forward. The folded model stays exact."""
    src = outlier_model("llama", tmp_path / "src")
    with pytest.raises(ValueError, match="down_loss"):
        run(src, [OSPlusPass(OSPlusPass.Options(down_loss="l1"))], tmp_path / "bad", Defaults(act_bits=4))
    p = OSPlusPass(OSPlusPass.Options(grid=8, max_steps=8, search_samples=2, down_loss="normed"))
    loop = run(src, [p], tmp_path / "out", Defaults(act_bits=4))
    assert all(s["mlp_out.os_loss"] <= s["mlp_out.os_loss_noscale"] for s in loop.layer_stats)
    ref, _ = full_model(src)
    new, _ = full_model(tmp_path / "out")
    ids = torch.randint(2, 300, (2, 48), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(logits(new, ids), logits(ref, ids), atol=1e-4, rtol=1e-4)
    # residual weighting: a token whose residual is 100x larger counts far less
    x, lin = planted(T=64, C=64, O=64)
    resid = torch.ones(1, 64, 64)
    resid[0, 0] = 100.0
    pr = LossProbe(_Fc(lin), [x[None]], None, make_act_quant(None, "token", False), 0, 0, residual=[resid])
    assert pr.wt[0] < 1e-2 * pr.wt[1:].mean()


def test_fold_helpers_exact():
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(16)
    with torch.no_grad():
        ln.weight.normal_(1, 0.5)
        ln.bias.normal_(0, 1)
    lins = [torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 4)]
    x = torch.randn(10, 16)
    ys = [lin(ln(x)).detach() for lin in lins]
    z, s = torch.randn(16), torch.rand(16) * 3 + 0.5
    assert fold_shift(ln, lins, z)
    fold_scale(ln, lins, s)
    for lin, y in zip(lins, ys):
        torch.testing.assert_close(lin(ln(x)), y, atol=1e-5, rtol=1e-5)


def test_act_quant_export_round_trip_and_smoothquant(tmp_path):
    """SmoothQuant + RTN + static per-tensor A4: the exported spec re-installs the same quantizers (in-memory
    and layer-streamed evaluation agree), and the activation quantizers change the outputs."""
    from ptq.eval.metrics import model_metrics, stream_metrics

    src = outlier_model("llama", tmp_path / "src")
    passes = [SmoothQuantPass(SmoothQuantPass.Options(alpha=0.5)), RTNPass(), ActQuantPass()]
    loop = run(src, passes, tmp_path / "out", Defaults(act_bits=4, act_granularity="tensor"))
    assert all(len(s["attn_in.act_clip"]) == 2 for s in loop.layer_stats)
    model, _ = full_model(tmp_path / "out")
    ids = torch.randint(2, 300, (2, 48), generator=torch.Generator().manual_seed(3))
    plain = model_metrics(model, ids).ppl
    spec = load_act_quant(model, tmp_path / "out")
    assert spec["bits"] == 4 and spec["granularity"] == "tensor" and len(spec["linears"]) == 14
    assert (tmp_path / "out" / "act_quant.json").exists()
    quant = model_metrics(model, ids).ppl
    assert abs(quant - plain) > 1e-3 * plain
    sm = StreamingModel.open(str(tmp_path / "out"))
    install_streaming(sm)
    streamed = stream_metrics(sm, ids, batch_size=1).ppl
    assert streamed == pytest.approx(quant, rel=1e-4)
