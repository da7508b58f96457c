"""UDFC: closed-form data-free pruning + quantization (ptq.passes.udfc_math, ptq.passes.udfc)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ptq.passes.udfc import n_keep_for, udfc_full_model
from ptq.quant.primitives import QuantSpec
from ptq.recipes import RecipeError, load_recipe, parse_recipe
from ptq.passes.udfc_math import (Channels, channels_from_mlp, cross_cov, gauss_act_moments, merge_by_cosine,
                                  reconstruct)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- pure math
def test_gauss_moments_match_known_values():
    # ReLU of N(0, v): E = sqrt(v / 2 pi), E[relu'] = 1/2 ; GELU: E[z Phi(z)] = v / sqrt(2 pi (1 + v))
    v = torch.tensor([0.25, 1.0, 4.0])
    c, b, e2 = gauss_act_moments(torch.zeros(3), v, "relu")
    assert torch.allclose(c, (v / (2 * torch.pi)).sqrt().double(), atol=1e-9)
    assert torch.allclose(e2, v.double() / 2, atol=1e-9)
    assert torch.allclose(b, torch.full((3,), 0.5, dtype=torch.float64), atol=2e-3)
    c, b, _ = gauss_act_moments(torch.zeros(3), v, "gelu")
    assert torch.allclose(c, (v / (2 * torch.pi * (1 + v)).sqrt()).double(), atol=1e-6)
    assert torch.allclose(b, torch.full((3,), 0.5, dtype=torch.float64), atol=1e-9)  # act(z) - z/2 is even


def test_linear_channels_moments_are_exact():
    """With an identity activation the Gaussian model is exact: predicted Cov equals the empirical one."""
    torch.manual_seed(0)
    G, m = torch.randn(6, 5), torch.randn(6)
    ch = Channels(G, None, m, "linear")
    x = torch.randn(400_000, 5, dtype=torch.float64)
    h = x @ G.double().T + m.double()
    assert torch.allclose(torch.cov(h.T), cross_cov(ch, ch), rtol=0.02, atol=0.02)
    assert torch.allclose(h.mean(0), ch.mean(), atol=0.02)


def _gated(H=32, I=64, redundant=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    Wg, Wu = torch.randn(I, H, generator=g) * 0.2, torch.randn(I, H, generator=g) * 0.2
    if redundant:  # half of the channels are noisy rescaled copies of the other half
        k = I // 2
        Wg[k:] = Wg[:k] + 0.05 * torch.randn(k, H, generator=g)
        Wu[k:] = 0.6 * Wu[:k] + 0.05 * torch.randn(k, H, generator=g)
    D = torch.randn(16, I, generator=g)
    x = torch.randn(100_000, H, generator=g, dtype=torch.float64)
    h = F.silu(x @ Wg.double().T) * (x @ Wu.double().T)
    return Wg, Wu, D, h


def _err(D, h, keep, newD, bias=None):
    y = h @ D.double().T
    yhat = h[:, keep] @ newD.double().T + (0 if bias is None else bias.double())
    return float((y - yhat).pow(2).mean())


@pytest.mark.parametrize("mode", ["pair", "lstsq"])
@pytest.mark.parametrize("redundant", [False, True])
def test_reconstruction_reduces_next_layer_error(mode, redundant):
    Wg, Wu, D, h = _gated(redundant=redundant)
    ch = channels_from_mlp(Wg, Wu, None, None, None, "silu")
    keep = torch.sort(torch.randperm(64, generator=torch.Generator().manual_seed(1))[:44]).values
    plain = _err(D, h, keep, D[:, keep])
    rec = reconstruct(D, ch, keep, None, 1.0, 1.0, mode)
    with_rec = _err(D, h, keep, rec.D)
    assert with_rec < plain  # strictly better on random weights
    if redundant:
        assert with_rec < 0.5 * plain  # and much better when the channels are redundant


def test_fc_bias_absorbs_mean():
    """fc (BERT/OPT) MLP with a bias on the next layer: the mean shift goes into the bias."""
    torch.manual_seed(0)
    H, I = 24, 48
    W, b, D = torch.randn(I, H) * 0.3, torch.randn(I) * 0.5, torch.randn(8, I)
    ch = channels_from_mlp(W, None, None, None, b, "gelu")
    x = torch.randn(100_000, H, dtype=torch.float64)
    h = F.gelu(x @ W.double().T + b.double())
    keep = torch.arange(0, I, 2)
    plain = _err(D, h, keep, D[:, keep])
    errs = {}
    for mode in ("pair", "lstsq"):
        for hb in (False, True):
            rec = reconstruct(D, ch, keep, None, 1.0, 1.0, mode, has_bias=hb)
            errs[mode, hb] = _err(D, h, keep, rec.D, rec.bias_delta)
    assert errs["pair", True] < errs["pair", False] < 0.85 * plain
    assert errs["lstsq", True] < 0.55 * plain


def test_quantization_scale_is_closed_form_optimum():
    """s' = K(h, hhat) / K(hhat, hhat) minimizes E(h - s hhat)^2 for each channel (exact for linear channels)."""
    torch.manual_seed(0)
    G = torch.randn(4, 16)
    Gq = G + 0.1 * torch.randn(4, 16)
    ch, chq = Channels(G, None, torch.zeros(4), "linear"), Channels(Gq, None, torch.zeros(4), "linear")
    rec = reconstruct(torch.eye(4), ch, torch.arange(4), chq, 1.0, 1.0, "pair")
    x = torch.randn(200_000, 16, dtype=torch.float64)
    h, hq = x @ G.double().T, x @ Gq.double().T
    s_emp = (h * hq).mean(0) / (hq * hq).mean(0)
    assert torch.allclose(rec.s_q, s_emp, rtol=0.01)


# ---------------------------------------------------------------------------------------------- the pass
def run_pass(folder, **opts):
    """Apply UDFC to every layer of a fully materialized model (in memory); returns (model, config, qweights)."""
    return udfc_full_model(folder, QuantSpec(bits=6, group_size=-1), **opts)


def test_zero_prune_no_quant_is_identity(tiny_models):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    model, cfg, qw = run_pass(tiny_models["llama"], prune_ratio=0.0, quantize=False)
    assert qw == {} and cfg.intermediate_size == 160
    ref_sd = ref.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k


@pytest.mark.parametrize("kind", ["llama-gqa", "opt"])
def test_compress_shrinks_and_loads_in_transformers(tiny_models, tmp_path, monkeypatch, kind):
    """`ptq compress --recipe udfc --prune-ratio 0.3 --bits 6` reads no calibration data, writes smaller
    matrices and a matching config; transformers loads it and gives our in-memory logits."""
    import calib.data
    from transformers import AutoModelForCausalLM

    from ptq.compress import CompressOptions, compress

    def boom(*a, **k):
        raise AssertionError("UDFC must not read calibration data")

    for fn in ("load_calibration", "read_text", "sample_windows", "tokenize"):
        monkeypatch.setattr(calib.data, fn, boom)
    out = tmp_path / "out"
    # (--calib with this data-free recipe is refused up front: tests/test_fault_battery.py)
    compress(CompressOptions(model=str(tiny_models[kind]), out=str(out), recipe="udfc", bits=6, format="fp",
                             pass_options={"udfc": {"prune_ratio": 0.3}}))
    cfg = json.loads((out / "config.json").read_text())
    attr = "ffn_dim" if kind == "opt" else "intermediate_size"
    assert cfg[attr] == n_keep_for(160, 0.3) == 112
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    sd = hf.state_dict()
    down = "model.decoder.layers.0.fc2.weight" if kind == "opt" else "model.layers.0.mlp.down_proj.weight"
    assert tuple(sd[down].shape) == (64, 112)
    ours, _, qw = run_pass(tiny_models[kind], prune_ratio=0.3)
    assert len(qw) == 2 * (4 + (2 if kind == "opt" else 3))  # q k v o + MLP linears, 2 layers
    ids = torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf(input_ids=ids).logits, ours(input_ids=ids, use_cache=False).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    orig = AutoModelForCausalLM.from_pretrained(tiny_models[kind], dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(orig(input_ids=ids).logits, a, atol=1e-3)  # it did change something


def test_reconstruction_helps_whole_tiny_model(tiny_models):
    """End to end on a tiny random Llama: prune 30% + 6 bit, logits closer to fp32 with (lstsq) reconstruction.
    (i.i.d. random weights have almost no redundant channels; there pair mode is neutral.)"""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    ids = torch.randint(2, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = ref(input_ids=ids).logits
        errs = {}
        for rec in (False, True):
            m, _, _ = run_pass(tiny_models["llama"], prune_ratio=0.3, reconstruct=rec, mode="lstsq")
            errs[rec] = float((m(input_ids=ids, use_cache=False).logits - z).pow(2).mean())
    assert errs[True] < errs[False]


@pytest.mark.parametrize("kind,expected", [("llama", "pair"), ("opt", "lstsq")])
def test_auto_mode_picks_the_family_mode(tiny_models, kind, expected):
    """mode=auto (the default) is pair for gated MLPs and lstsq for fc MLPs: identical weights to the explicit mode,
    different from the other one."""
    other = {"pair": "lstsq", "lstsq": "pair"}[expected]
    sds = {m: run_pass(tiny_models[kind], prune_ratio=0.3, mode=m)[0].state_dict() for m in ("auto", expected, other)}
    assert all(torch.equal(v, sds[expected][k]) for k, v in sds["auto"].items())
    assert any(not torch.equal(v, sds[other][k]) for k, v in sds["auto"].items())


def test_options_are_strict():
    with pytest.raises(RecipeError, match="prune_ratio"):
        parse_recipe({"passes": [{"udfc": {"prune_ratio": 1.0}}]})
    with pytest.raises(RecipeError, match="mode"):
        parse_recipe({"passes": [{"udfc": {"mode": "bogus"}}]})
    r = load_recipe("udfc")
    assert not r.needs_calibration and r.defaults.bits == 6
    assert n_keep_for(1536, 0.3) == 1075 and n_keep_for(1536, 0.3, round_to=32) == 1088


def test_pruned_gptq_export_reads_back(tiny_models, tmp_path):
    """Quantized export (GPTQ format) of a pruned model: our reader rebuilds the smaller layers and matches the
    in-memory model up to the fp16 rounding of the scales."""
    from ptq.compress import CompressOptions, compress
    from ptq.model_io import full_model

    out = tmp_path / "gptq"
    compress(CompressOptions(model=str(tiny_models["llama"]), out=str(out), recipe="udfc", format="gptq",
                             pass_options={"udfc": {"prune_ratio": 0.2}}))
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 128
    back, _ = full_model(out)
    ours, _, _ = run_pass(tiny_models["llama"], prune_ratio=0.2)
    ids = torch.randint(2, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = back(input_ids=ids, use_cache=False).logits, ours(input_ids=ids, use_cache=False).logits
    assert (a - b).abs().max() < 2e-2 * b.abs().max()


def test_resumed_run_replays_moments(tiny_models):
    """A run resumed at layer 1 (ptq.resume) must compress layer 1 exactly like an uninterrupted run: the
    propagated input moments of the skipped layer are replayed from its original weights."""
    from ptq.model_io import StreamingModel
    from ptq.passes.udfc import UDFCPass
    from ptq.pipeline import LayerContext

    spec = QuantSpec(bits=6, group_size=-1)

    def layer1(start):
        sm = StreamingModel.open(str(tiny_models["llama"]))
        p = UDFCPass(UDFCPass.Options(prune_ratio=0.3), spec)
        p.setup(sm)
        for i in range(start, 2):
            ctx = LayerContext(i, sm.load_layer(i), sm.layer_prefix(i), sm.lmap, sm.config, [], spec)
            p.apply(ctx)
        return sm.layers[1].mlp.down_proj.weight.data

    assert torch.equal(layer1(0), layer1(1))


def test_merge_baseline_merges_redundant_channels_only_above_threshold():
    """Neuron-Merging baseline: on noisy rescaled copies it finds the copy's source with the norm-ratio scale and
    lowers the next-layer error; with a threshold above every cosine it is plain column dropping."""
    Wg, Wu, D, h = _gated(redundant=True)
    keep = torch.arange(32)  # keep the originals, prune the copies
    plain = _err(D, h, keep, D[:, keep])
    rec = merge_by_cosine(D, Wg, Wu, keep, threshold=0.3)
    assert torch.equal(rec.partner, torch.arange(32))  # every copy goes to its source
    assert ((rec.s > 0.55) & (rec.s < 0.85)).all()  # norm ratio: 0.6 inflated by the copies' noise
    assert _err(D, h, keep, rec.D) < 0.3 * plain
    assert torch.equal(merge_by_cosine(D, Wg, Wu, keep, threshold=1.01).D, D[:, keep])
