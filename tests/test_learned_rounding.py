"""Learned rounding: never ends above its initialisation's layer error on the calibration inputs, improves on its
init where there is room, and produces ordinary QuantizedWeights that every exporter takes."""
import json

import pytest
import torch

from ptq.model_io import StreamingModel
from ptq.passes.learned_rounding import LearnedLinear, LearnedRoundingPass
from ptq.pipeline import LayerContext, capture_inputs, run_layer
from ptq.quant.primitives import QuantSpec
from ptq.quant.qweight import QuantizedWeight


def _contexts(folder, spec, n=4):
    ids = torch.randint(2, 300, (n, 40), generator=torch.Generator().manual_seed(5))
    sm = StreamingModel.open(str(folder))
    batches = capture_inputs(sm, ids, batch_size=2)
    for i in range(len(sm.layers)):
        layer = sm.load_layer(i)
        yield LayerContext(i, layer, sm.layer_prefix(i), sm.lmap, sm.config, batches, spec)
        batches = run_layer(layer, batches)


def _layer_error(ctx, targets):
    return sum(float((o.float() - t).pow(2).mean()) for o, t in zip(ctx.outputs(), targets)) / len(targets)


@pytest.mark.parametrize("init,sym,clip", [("rtn", False, True), ("gptq", False, False), ("gptq", True, True)])
def test_never_above_init_and_weights_match_codes(tiny_models, init, sym, clip):
    spec = QuantSpec(3, 32, sym)
    kept = 0
    for ctx in _contexts(tiny_models["llama-gqa"], spec):
        targets = [y.float() for y in ctx.outputs()]
        p = LearnedRoundingPass(LearnedRoundingPass.Options(init=init, iters=6, batch=2, learn_clip=clip), spec)
        p.apply(ctx)
        st = ctx.stats
        err = _layer_error(ctx, targets)
        assert err <= st["lr_loss_init"] * (1 + 1e-5) + 1e-9, (err, st)
        assert abs(err - min(st["lr_loss_init"], st["lr_loss_final"])) <= 1e-5 * max(err, 1e-6)
        kept += st["lr_kept"]
        for mine, ref in zip(ctx.next_hidden, ctx.outputs()):  # handed to the loop instead of a second forward
            torch.testing.assert_close(mine, ref)
        for n in ctx.linears():
            qw = ctx.qweights[ctx.prefix + n]
            assert isinstance(qw, QuantizedWeight) and qw.codes.dtype == torch.uint8 and qw.sym == sym
            assert int(qw.codes.max()) <= 7
            torch.testing.assert_close(ctx.module(n).weight.data.float(), qw.dequantize(), rtol=0, atol=0)
    if init == "rtn":
        assert kept >= 1  # from RTN there is room: learning must win somewhere


def test_learned_linear_starts_exactly_at_its_init():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    qw = QuantizedWeight.from_float(w, QuantSpec(3, 32, False))
    shifted = qw.codes.clone()
    shifted[0, :8] = torch.clamp(shifted[0, :8].long() + 1, max=7).to(torch.uint8)  # an init that moved codes
    qw2 = QuantizedWeight(shifted, qw.scale, qw.zero, 3, 32, qw.g_idx)
    for q in (qw, qw2):
        ll = LearnedLinear(w, q, learn_clip=True)
        assert torch.equal(ll.export().codes, q.codes)
        torch.testing.assert_close(ll.weight().detach(), q.dequantize())
    # a GPTQ-like init: codes rounded from error-updated weights, some pushed past the grid's ends, although the
    # original weights lie inside the range (the codes at 0 and 2^b - 1 must be reproduced too)
    start = w + 0.8 * torch.randn(16, 64, generator=g)
    s, z = qw.scale, qw.zero.float()
    S, Z = s.repeat_interleave(32, 1), z.repeat_interleave(32, 1)
    codes = torch.clamp(torch.round(start / S) + Z, 0, 7).to(torch.uint8)
    q3 = QuantizedWeight(codes, s, qw.zero, 3, 32, qw.g_idx)
    edge = ((codes == 0) | (codes == 7)) & (torch.clamp(torch.round(w / S) + Z, 0, 7) != codes.float())
    assert int(edge.sum()) > 5  # the case exists in this draw
    for clip in (False, True):
        ll = LearnedLinear(w, q3, learn_clip=clip, start=start)
        assert torch.equal(ll.export().codes, codes)
        torch.testing.assert_close(ll.weight().detach(), q3.dequantize(), rtol=0, atol=0)
    assert int(codes.min()) == 0 and int(codes.max()) == 7  # both ends of the grid are exercised


def test_recipe_compresses_and_exports(tiny_models, tmp_path):
    from ptq.compress import CompressOptions, compress
    from ptq.model_io import open_weights

    out = tmp_path / "lr"
    rep = compress(CompressOptions(model=str(tiny_models["llama"]), out=str(out), recipe="learned-rounding",
                                   bits=3, group_size=32, nsamples=4, seqlen=32,
                                   pass_options={"learned-rounding": {"iters": 4}}))
    assert all(layer["lr_loss_final"] >= 0 for layer in rep["layers"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"]) == (3, 32)
    reader = open_weights(out)
    qw = reader.qweight("model.layers.0.mlp.down_proj")
    assert qw is not None and qw.bits == 3


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="init must be"):
        LearnedRoundingPass.Options(init="adaround")
    with pytest.raises(ValueError, match="iters"):
        LearnedRoundingPass.Options(iters=-1)


def test_after_osplus(tiny_models):
    """OS+ folds its scales into the layer; learned rounding then works on the layer's current weights."""
    from ptq.passes.osplus import OSPlusPass
    from ptq.pipeline import compress_loop
    from ptq.recipes import Defaults

    spec = QuantSpec(3, 32, False)
    osp = OSPlusPass(OSPlusPass.Options(grid=8, max_steps=8, search_samples=1), spec)
    lr = LearnedRoundingPass(LearnedRoundingPass.Options(iters=4), spec)
    for p in (osp, lr):
        p.defaults = Defaults(bits=3, group_size=32, act_bits=8)
    sm = StreamingModel.open(str(tiny_models["llama"]))
    ids = torch.randint(2, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    loop = compress_loop(sm, [osp, lr], ids, spec, batch_size=2)
    assert all("lr_loss_init" in s and min(s["lr_loss_init"], s["lr_loss_final"]) > 0 for s in loop.layer_stats)
    assert all(s["lr_loss_final"] < s["lr_loss_init"] or not s["lr_kept"] for s in loop.layer_stats)


def test_fp_target_follows_the_fp_model(tiny_models):
    """``target: fp``: the targets of every layer are the fp model's own hidden states (AutoRound's objective),
    not the fp layer on the compressed chain's inputs."""
    from ptq.pipeline import compress_loop, for_layer

    spec = QuantSpec(3, 32, False)
    sm = StreamingModel.open(str(tiny_models["llama"]))
    ids = torch.randint(2, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    fp = for_layer(capture_inputs(sm, ids, batch_size=2), 0)
    for i in range(len(sm.layers)):
        fp = for_layer(run_layer(sm.load_layer(i), for_layer(fp, i)), min(i + 1, len(sm.layers) - 1))
    lr = LearnedRoundingPass(LearnedRoundingPass.Options(iters=2, target="fp"), spec)
    loop = compress_loop(StreamingModel.open(str(tiny_models["llama"])), [lr], ids, spec, batch_size=2)
    assert lr._fp_index == len(sm.layers)
    for mine, ref in zip(lr._fp_stream, fp):
        torch.testing.assert_close(mine, ref.hidden)
    assert all(s["lr_loss_init"] > 0 for s in loop.layer_stats)
    with pytest.raises(ValueError, match="target must be"):
        LearnedRoundingPass.Options(target="teacher")


def test_loop_uses_the_outputs_of_the_last_pass_only(tiny_models):
    """The loop reuses learned rounding's outputs as the next layer's inputs only when no pass ran after it."""
    from ptq.pipeline import Pass, compress_loop

    class Halve(Pass):
        name = "halve"

        def apply(self, ctx):
            for n in ctx.linears():
                ctx.module(n).weight.data *= 0.5

    spec = QuantSpec(3, 32, False)
    ids = torch.randint(2, 300, (4, 32), generator=torch.Generator().manual_seed(0))

    def final(passes):
        sm = StreamingModel.open(str(tiny_models["llama"]))
        return compress_loop(sm, passes, ids, spec, batch_size=2).final

    opts = LearnedRoundingPass.Options(iters=2)
    alone = final([LearnedRoundingPass(opts, spec)])
    halved = final([LearnedRoundingPass(opts, spec), Halve()])
    assert all(float((a.hidden - b.hidden).abs().max()) > 1e-3 for a, b in zip(alone, halved))


@pytest.mark.parametrize("kind", ["llama", "llama-gqa", "opt", "qwen3", "gemma3_text", "qwen2-sliding"])
def test_stacked_batches_equal_one_at_a_time(tiny_models, family_models, kind):
    """Learned rounding runs a step's calibration sequences as one stacked forward; the stack is used only where
    it reproduces the per-sequence outputs, and then the loss it computes is the per-sequence mean."""
    from ptq.passes.learned_rounding import _Stacker

    folder = tiny_models.get(kind) or family_models[kind]
    ids = torch.randint(2, 300, (5, 40), generator=torch.Generator().manual_seed(3))
    sm = StreamingModel.open(str(folder))
    from ptq.pipeline import for_layer

    batches = for_layer(capture_inputs(sm, ids, batch_size=1), 0)
    layer = sm.load_layer(0)
    st = _Stacker(layer, batches, batch=4)
    assert st.stacked, kind  # every family here passes equal masks / rotary tables to every sequence
    assert [len(c) for c in st.chunks()] == [5]
    with torch.no_grad():
        got = st.split(st.forward(layer, [0, 2, 4], None), [0, 2, 4])
        from ptq.pipeline import layer_forward

        for i, g in zip([0, 2, 4], got):
            torch.testing.assert_close(g, layer_forward(layer, batches[i]), rtol=1e-4, atol=1e-5)


def test_unequal_kwargs_run_one_at_a_time(tiny_models):
    from ptq.passes.learned_rounding import _Stacker
    from ptq.pipeline import Batch, for_layer

    sm = StreamingModel.open(str(tiny_models["llama"]))
    ids = torch.randint(2, 300, (3, 24), generator=torch.Generator().manual_seed(4))
    batches = for_layer(capture_inputs(sm, ids, batch_size=1), 0)
    kw = dict(batches[1].kwargs)
    cos, sin = kw["position_embeddings"]
    kw["position_embeddings"] = (cos * 0.5, sin)  # a different rotary table: stacking would be wrong
    batches[1] = Batch(batches[1].hidden, kw, batches[1].attn)
    st = _Stacker(sm.load_layer(0), batches, batch=2)
    assert not st.stacked and st.group([0, 1]) == [[0], [1]]
