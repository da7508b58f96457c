"""Model families beyond Llama/OPT on tiny random configs (tests/conftest.py FAMILIES): the streamed layer loop
equals a plain transformers forward, including layers of different attention types (sliding window vs full)
with inputs longer than the window; compression and exports end to end."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from ptq.compress import CompressOptions, compress
from ptq.eval.metrics import eval_windows, model_metrics, stream_metrics
from ptq.model_io import StreamingModel
from ptq.pipeline import compress_loop
from ptq.quant.primitives import QuantSpec

torch.set_num_threads(1)


def ids_of(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def streamed_logits(folder, ids: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Logits of the layer loop with no passes (``[n, L, V]``), through our loader and streamed head."""
    sm = StreamingModel.open(str(folder))
    res = compress_loop(sm, [], ids, QuantSpec(), batch_size=batch_size)
    return torch.cat([sm.logits(b.hidden) for b in res.final])


@pytest.fixture(scope="module")
def sliding(tmp_path_factory):
    from conftest import make_family

    return make_family("qwen2-sliding", tmp_path_factory.mktemp("fam") / "qwen2-sliding")


def test_mixed_sliding_layers_get_their_own_mask(sliding):
    """Qwen2 with layers 0-1 full and 2-3 sliding (window 32) on 256-token inputs: each layer gets the mask of
    its own type, so the streamed logits equal transformers' (layer 0's mask for every layer is off by ~2)."""
    from ptq.pipeline import capture_inputs

    sm = StreamingModel.open(str(sliding))
    assert sm.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    ids = ids_of(2, 256)
    b = capture_inputs(sm, ids, 2)[0]
    assert b.attn.of_layer == (0, 0, 1, 1)
    with torch.no_grad():
        ref = hf_model(sliding)(input_ids=ids).logits
    out = streamed_logits(sliding, ids)
    assert ref.abs().max() > 1.0
    assert (out - ref).abs().max() <= 1e-4
    short = ids_of(1, 24)  # shorter than the window: both masks are plain causal
    with torch.no_grad():
        ref_short = hf_model(sliding)(input_ids=short).logits
    assert (streamed_logits(sliding, short) - ref_short).abs().max() <= 1e-4


def test_streamed_eval_uses_per_layer_masks(sliding):
    """`ptq eval` / gate / --eval-text path (stream_metrics) == in-memory transformers metrics."""
    w = eval_windows(ids_of(1, 900)[0], 128, 6)
    a = stream_metrics(StreamingModel.open(str(sliding)), w)
    b = model_metrics(hf_model(sliding), w)
    assert a.tokens == b.tokens == 6 * 127
    assert a.ppl == pytest.approx(b.ppl, rel=1e-5)


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "report.json"}


def test_resume_into_sliding_layer_is_byte_identical(sliding, tmp_path):
    """Interrupted after layer 1 (full attention), resumed at layer 2 (sliding): the resumed run binds layer 2's
    mask and writes the same bytes as an uninterrupted run."""
    calib = tmp_path / "calib.txt"
    calib.write_text("It is a truth universally acknowledged, that a single man in possession. " * 40)

    def opts(out, **kw):
        return CompressOptions(model=str(sliding), out=str(out), recipe="gptq", format="fp", calib=str(calib),
                               nsamples=2, seqlen=96, **kw)

    compress(opts(tmp_path / "ref"))

    def ctrl_c(i, n, pname):
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress(opts(tmp_path / "q"), progress=ctrl_c)
    report = compress(opts(tmp_path / "q", resume=True))
    assert report["resumed_from_layer"] == 2
    assert _hashes(tmp_path / "q") == _hashes(tmp_path / "ref")


# ---- every dense family ------------------------------------------------------------------------------------------

KINDS = ["qwen2-sliding", "qwen3", "gemma2", "gemma3_text", "phi3"]


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_forward_equals_transformers(family_models, kind):
    """256-token inputs (8x the 32-token window of the sliding layers): max |logit diff| <= 1e-4 in fp32."""
    from ptq.pipeline import capture_inputs

    f = family_models[kind]
    ids = ids_of(2, 256, seed=3)
    with torch.no_grad():
        ref = hf_model(f)(input_ids=ids).logits
    out = streamed_logits(f, ids, batch_size=2)
    assert ref.abs().max() > 1.0
    diff = float((out - ref).abs().max())
    assert diff <= 1e-4, diff
    sm = StreamingModel.open(str(f))
    types = getattr(sm.config, "layer_types", None) or ["full_attention"] * sm.config.num_hidden_layers
    attn = capture_inputs(sm, ids[:1])[0].attn
    # one kwargs set per attention type, bound to exactly the layers of that type
    assert len(attn.variants) == len(set(types))
    assert all((attn.of_layer[i] == attn.of_layer[j]) == (types[i] == types[j])
               for i in range(len(types)) for j in range(len(types)))


def test_streamed_eval_applies_final_softcap(family_models):
    """Gemma 2's final-logit soft-capping in the streamed head (eval / gate / --eval-text): same perplexity as
    transformers."""
    f = family_models["gemma2"]
    w = eval_windows(ids_of(1, 600)[0], 96, 5)
    a = stream_metrics(StreamingModel.open(str(f)), w)
    b = model_metrics(hf_model(f), w)
    assert a.tokens == b.tokens == 5 * 95
    assert a.ppl == pytest.approx(b.ppl, rel=1e-5)


def _calib(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 30)
    return p


def _linears(sm) -> list[str]:
    return [f"{sm.layer_prefix(i)}{n}" for i in range(len(sm.layers)) for n in sm.lmap.linears()]


@pytest.mark.parametrize("kind", KINDS)
def test_rtn_and_gptq_end_to_end(family_models, tmp_path, kind):
    """`compress()` with the rtn and gptq recipes to the GPTQ format: every linear of the layer map (fused ones as
    the checkpoint has them) is stored quantized under its checkpoint name, and on the calibration text GPTQ's
    dequantized model is closer to the original than RTN's (measured 3-6x lower logit MSE on these models)."""
    from ptq.model_io import full_model, open_weights, tokenizer_for

    f = family_models[kind]
    calib = _calib(tmp_path)
    sm = StreamingModel.open(str(f))
    ids = tokenizer_for(f)(calib.read_text()[:300], return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        ref = hf_model(f)(input_ids=ids).logits
    mse = {}
    for recipe in ("rtn", "gptq"):
        out = tmp_path / recipe
        cal = dict(calib=str(calib), nsamples=2, seqlen=64) if recipe == "gptq" else {}
        rep = compress(CompressOptions(model=str(f), out=str(out), recipe=recipe, format="gptq", bits=4,
                                       group_size=32, **cal))
        assert len(rep["layers"]) == sm.config.num_hidden_layers
        reader = open_weights(out)
        names = _linears(sm)
        assert all(reader.qweight(n) is not None for n in names), [n for n in names if reader.qweight(n) is None]
        assert set(reader.keys()) == set(open_weights(f).keys())  # checkpoint names kept (fused, tied)
        q, _ = full_model(out)
        with torch.no_grad():
            mse[recipe] = float((q(input_ids=ids).logits - ref).pow(2).mean())
    assert 0 < mse["gptq"] < 0.6 * mse["rtn"], mse


@pytest.mark.parametrize("kind", KINDS)
def test_rtn_compressed_tensors_loads_in_transformers(family_models, tmp_path, kind):
    """RTN -> compressed-tensors export; transformers (compressed-tensors) loads it and its logits equal those of
    our dequantized model."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from ptq.model_io import full_model

    out = tmp_path / "ct"
    compress(CompressOptions(model=str(family_models[kind]), out=str(out), recipe="rtn", format="compressed-tensors",
                             bits=4, group_size=32, sym=False))
    ours, _ = full_model(out)
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                             quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    ids = ids_of(1, 96, seed=5)
    with torch.no_grad():
        a, b = m(input_ids=ids).logits, ours(input_ids=ids).logits
    assert b.abs().max() > 1.0
    assert float((a - b).abs().max()) <= 1e-4


@pytest.mark.slow  # gptqmodel import + kernel setup: 30-120 s on the shared box
@pytest.mark.parametrize("kind", KINDS)
def test_gptq_checkpoint_loads_in_transformers(family_models, tmp_path, kind):
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM, GPTQConfig

    from ptq.model_io import full_model

    out = tmp_path / "gptq"
    compress(CompressOptions(model=str(family_models[kind]), out=str(out), recipe="rtn", format="gptq", bits=4,
                             group_size=32, sym=True))
    ours, _ = full_model(out)
    m = AutoModelForCausalLM.from_pretrained(out, quantization_config=GPTQConfig(bits=4, backend="torch"),
                                             dtype=torch.float16)
    ids = ids_of(1, 48, seed=6)
    with torch.no_grad():
        ref, got = ours(input_ids=ids).logits.float(), m(input_ids=ids).logits.float()
    assert (got - ref).abs().max().item() / ref.abs().max().item() < 3e-3


def _plant_outliers(folder, factor: float = 25.0) -> None:
    """Multiply the effective scale (``offset + w``) of a few channels of every group-feeding norm by
    ``factor``: the outlier pattern OS+ / SmoothQuant migrate."""
    from safetensors.torch import load_file, save_file

    sm = StreamingModel.open(str(folder))
    norms = {g.prev for g in sm.lmap.groups if g.prev_is_norm}
    path = folder / "model.safetensors"
    sd = load_file(str(path))
    g = torch.Generator().manual_seed(1)
    off = sm.lmap.norm_offset
    for k in sd:
        if any(k.endswith(f".{n}.weight") for n in norms):
            idx = torch.randperm(sd[k].numel(), generator=g)[:4]
            sd[k][idx] = (sd[k][idx] + off) * factor - off
    save_file(sd, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["os+", "smoothquant"])
def test_migration_folding_keeps_fp_outputs(family_models, tmp_path, kind, method):
    """OS+ / SmoothQuant scales folded into the norms (Gemma: into ``1 + w``), up_proj rows and the linears: the
    streamed fp model equals the original transformers model (max |logit diff| <= 1e-4)."""
    import shutil

    from ptq.passes.osplus import OSPlusPass
    from ptq.passes.smoothquant import SmoothQuantPass
    from ptq.recipes import Defaults

    f = tmp_path / kind
    shutil.copytree(family_models[kind], f)
    _plant_outliers(f)
    if method == "os+":
        p = OSPlusPass(OSPlusPass.Options(grid=6, max_steps=6, search_samples=1), QuantSpec(4, -1, False))
        key = "attn_in.os_smax"
    else:
        p = SmoothQuantPass(SmoothQuantPass.Options(alpha=0.5, down_proj=True), QuantSpec(4, -1, False))
        key = "attn_in.sq_smax"
    p.defaults = Defaults(act_bits=8)
    ids = ids_of(2, 80, seed=7)
    sm = StreamingModel.open(str(f))
    res = compress_loop(sm, [p], ids, QuantSpec(4, -1, False))
    assert max(st[key] for st in res.layer_stats) > 1.5  # channels really rescaled
    # up_proj -> down_proj migration too, except Phi-3's fused gate_up_proj (skipped, as for OPT)
    assert (key.replace("attn_in", "mlp_out") in res.layer_stats[0]) == (kind != "phi3")
    with torch.no_grad():
        ref = hf_model(f)(input_ids=ids).logits
        out = torch.cat([sm.logits(b.hidden) for b in res.final])
    assert ref.abs().max() > 1.0
    assert float((out - ref).abs().max()) <= 1e-4


def test_unsupported_family_and_pass_are_refused(family_models, tmp_path):
    """A family without a layer map, and a pass a family cannot run, stop with exit 2 before any work, naming
    the supported families and docs/architectures.md."""
    from transformers import AutoConfig
    from typer.testing import CliRunner

    from cli.main import app
    from conftest import save_random_model
    from ptq.layermap import LAYER_MAPS

    gpt2 = save_random_model(AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=320),
                             tmp_path / "gpt2")
    text = tmp_path / "t.txt"
    text.write_text("some evaluation text " * 50)
    for args in (["eval", str(gpt2), "--text", str(text)], ["compress", str(gpt2), "--out", str(tmp_path / "o")]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2, r.output
        msg = " ".join(r.output.split())
        assert "unsupported architecture 'gpt2'" in msg and "docs/architectures.md" in msg
        assert all(k in msg for k in LAYER_MAPS)
    r = CliRunner().invoke(app, ["compress", str(family_models["gemma2"]), "--out", str(tmp_path / "c"),
                                 "--recipe", "cskv"])
    assert r.exit_code == 2 and "docs/architectures.md" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_nupes_data_free_end_to_end(family_models, tmp_path, kind):
    """nupes-data-free (power-exponent LUT codes) on every linear of the layer map; the read-back model is the
    quantized one (within 4-bit noise of the original, same top-1 on most positions)."""
    from ptq.model_io import full_model, open_weights

    f = family_models[kind]
    out = tmp_path / "nupes"
    rep = compress(CompressOptions(model=str(f), out=str(out), recipe="nupes-data-free", bits=4))
    sm = StreamingModel.open(str(f))
    exps = [v for st in rep["layers"] for k, v in st.items() if k.endswith(".exponent")]
    assert len(exps) == len(_linears(sm)) and all(0.2 <= e <= 1.0 for e in exps)
    reader = open_weights(out)
    assert all(reader.qweight(n) is not None and reader.qweight(n).lut is not None for n in _linears(sm))
    ids = ids_of(1, 96, seed=8)
    q, _ = full_model(out)
    with torch.no_grad():
        a, b = hf_model(f)(input_ids=ids).logits, q(input_ids=ids).logits
    assert 0 < float((a - b).abs().max()) < 0.5 * float(a.abs().max())
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) > 0.4  # chance: 1/320


@pytest.mark.parametrize("kind", ["qwen2-sliding", "qwen3"])
def test_udfc_shrinks_and_loads_in_transformers(family_models, tmp_path, kind):
    """UDFC (data-free prune 30% + 6 bit) on the Llama-layout families: smaller MLPs and a matching config that
    transformers loads with our reader's logits; the closed-form reconstruction (lstsq) lowers the logit error."""
    from transformers import AutoModelForCausalLM

    from ptq.model_io import full_model

    ids = ids_of(2, 96, seed=9)
    with torch.no_grad():
        z = hf_model(family_models[kind])(input_ids=ids).logits
    err = {}
    for rec in (False, True):
        out = tmp_path / f"udfc-{rec}"
        compress(CompressOptions(model=str(family_models[kind]), out=str(out), recipe="udfc", bits=6, format="fp",
                                 pass_options={"udfc": {"prune_ratio": 0.3, "reconstruct": rec, "mode": "lstsq"}}))
        assert json.loads((out / "config.json").read_text())["intermediate_size"] == 112
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert tuple(hf.model.layers[0].mlp.down_proj.weight.shape) == (64, 112)
        ours, _ = full_model(out)
        with torch.no_grad():
            a, b = hf(input_ids=ids).logits, ours(input_ids=ids).logits
        assert float((a - b).abs().max()) <= 1e-4
        err[rec] = float((a - z).pow(2).mean())
    assert err[True] < err[False], err


@pytest.mark.slow  # one torch.onnx export per family: 30-100 s each on the shared box
@pytest.mark.parametrize("kind", KINDS)
def test_onnx_export_matches_pytorch(family_models, tmp_path, kind):
    """`ptq compress --format onnx` (MatMulNBits) validated in onnxruntime against the PyTorch model."""
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["compress", str(family_models[kind]), "--out", str(out), "--recipe", "rtn",
                                 "--bits", "4", "--group-size", "16", "--format", "onnx"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "onnx" / "onnx_report.json").read_text())
    sm = StreamingModel.open(str(family_models[kind]))
    assert set(rep["replaced"].values()) == {"MatMulNBits"} and len(rep["replaced"]) >= len(_linears(sm))
    v = rep["validation"]
    assert v["max_abs_logit_diff_acc0"] < 1e-4 and v["greedy_match_acc0"]


# ---- BOS -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory, family_models):
    """The tiny Gemma 3 with a tokenizer that prepends BOS (as Gemma's does)."""
    import shutil

    from conftest import byte_tokenizer

    f = tmp_path_factory.mktemp("bos") / "gemma3-bos"
    shutil.copytree(family_models["gemma3_text"], f)
    byte_tokenizer(add_bos=True).save_pretrained(f)
    return f


def test_bos_follows_the_tokenizer_unless_overridden(bos_model, family_models, tmp_path):
    from calib.data import load_calibration, resolve_bos
    from ptq.compress import evaluate_pair
    from ptq.model_io import tokenizer_for

    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 40)
    adds, plain = tokenizer_for(bos_model), tokenizer_for(family_models["gemma3_text"])
    assert resolve_bos(adds, None) == 0 and resolve_bos(plain, None) is None
    assert resolve_bos(adds, False) is None and resolve_bos(plain, True) == 0
    cal = load_calibration(str(text), adds, 3, 40, 0)
    assert (cal[:, 0] == 0).all() and load_calibration(str(text), plain, 3, 40, 0)[:, 0].ne(0).all()
    d = evaluate_pair(str(bos_model), None, str(text), 64, 4)
    n = evaluate_pair(str(bos_model), None, str(text), 64, 4, bos=False)
    assert (d["bos"], d["bos_source"], n["bos"], n["bos_source"]) == (True, "tokenizer", False, "--no-bos")
    assert d["tokens"] == n["tokens"] == 4 * 63 and abs(d["ppl"] - n["ppl"]) > 1e-3 * n["ppl"]


def test_compress_calibration_and_eval_agree_on_bos(bos_model, tmp_path):
    """--eval-text and calibration use one BOS decision; report and manifest say which."""
    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 40)
    for bos, expect in ((None, True), (False, False)):
        out = tmp_path / f"q{bos}"
        rep = compress(CompressOptions(model=str(bos_model), out=str(out), recipe="gptq", format="fp",
                                       calib=str(text), nsamples=2, seqlen=48, eval_text=str(text), eval_windows=3,
                                       eval_seqlen=64, bos=bos))
        man = json.loads((out / "manifest.json").read_text())
        src = "tokenizer" if bos is None else "--no-bos"
        assert (rep["eval"]["bos"], rep["eval"]["bos_source"]) == (expect, src)
        assert (man["calibration"]["bos"], man["calibration"]["bos_source"]) == (expect, src)
        assert man["calibration"]["source"] == "t.txt"
        assert rep["calibration"]["bos"] == bos


def test_later_eval_uses_the_bos_the_model_was_calibrated_with(bos_model, tmp_path):
    """A model compressed with --no-bos on a BOS tokenizer is evaluated (ptq eval / gate) without BOS by default,
    as it was calibrated; an explicit flag still wins."""
    from ptq.compress import evaluate_pair
    from ptq.gate import text_windows

    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 40)
    out = tmp_path / "nobos"
    cal = dict(recipe="gptq", format="fp", calib=str(text), nsamples=2, seqlen=48)
    compress(CompressOptions(model=str(bos_model), out=str(out), bos=False, **cal))
    d = evaluate_pair(str(out), str(bos_model), str(text), 64, 3)
    assert (d["bos"], d["bos_source"]) == (False, "manifest") and d["tokens"] == 3 * 63
    w, _, note = text_windows(out, str(text), 64, 3)
    assert note == {"bos": False, "source": "manifest"} and (w[:, 0] != 0).all()
    e = evaluate_pair(str(out), None, str(text), 64, 3, bos=True)
    assert (e["bos"], e["bos_source"]) == (True, "--bos")
    plain = tmp_path / "default"
    compress(CompressOptions(model=str(bos_model), out=str(plain), **cal))
    f = evaluate_pair(str(plain), None, str(text), 64, 3)
    assert (f["bos"], f["bos_source"]) == (True, "tokenizer")


def test_gate_baseline_file_records_bos(bos_model, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 40)
    base = tmp_path / "base.json"
    common = ["gate", str(bos_model), "--text", str(text), "--seqlen", "64", "--windows", "3"]
    r = CliRunner().invoke(app, common + ["--baseline", str(bos_model), "--save-baseline", str(base)])
    assert r.exit_code == 0, r.output
    assert json.loads(base.read_text())["bos"] is True
    ok = CliRunner().invoke(app, common + ["--baseline-json", str(base), "--min-top1", "0.99"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, common + ["--baseline-json", str(base), "--min-top1", "0.99", "--no-bos"])
    assert bad.exit_code == 2 and "measured with BOS" in bad.output, bad.output


@pytest.mark.slow
def test_smollm2_tokenizer_adds_no_bos(smollm2_dir):
    """README's SmolLM2 numbers are "no BOS": that is its tokenizer's own default, so they reproduce unchanged."""
    from calib.data import resolve_bos, tokenizer_adds_bos
    from ptq.model_io import tokenizer_for

    tok = tokenizer_for(smollm2_dir)
    assert tok.bos_token_id is not None and not tokenizer_adds_bos(tok) and resolve_bos(tok, None) is None
