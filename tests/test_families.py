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
