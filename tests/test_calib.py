"""Calibration loading (calib/data.py): text / JSONL / folder sources, the embedded default text, seeded window
sampling, BOS handling and the errors a user sees for bad input."""
from __future__ import annotations

import json

import pytest
import torch

from calib.data import (DEFAULT_TEXT, CalibrationError, calibration_hash, load_calibration, read_text,
                        sample_windows, tokenize)
from conftest import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_default_text_embedded(tok):
    text = read_text(None)
    assert text == DEFAULT_TEXT.read_text(encoding="utf-8")
    assert len(text.encode()) >= 250_000  # ~66k SmolLM2 tokens: 128 x 512 windows without reuse
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) >= 120]
    assert len(paragraphs) > 500 and len(set(paragraphs)) == len(paragraphs)  # no repeated passages
    # varied content: prose, dialogue, code, numbers, lists
    for marker in ('"', "def ", "import ", "1.", "- ", "{", "Q:"):
        assert marker in text, marker
    ids = load_calibration(None, tok, nsamples=8, seqlen=512, seed=0, bos=True)
    assert ids.shape == (8, 512) and torch.all(ids[:, 0] == tok.bos_token_id)
    assert (ids[:, 1:] != tok.bos_token_id).all()
    plain = load_calibration(None, tok, nsamples=8, seqlen=512, seed=0)  # the tokenizer adds no BOS: none here
    assert plain.shape == (8, 512) and (plain != tok.bos_token_id).all()


def test_text_jsonl_folder_sources(tmp_path, tok):
    (tmp_path / "a.txt").write_text("alpha " * 50)
    sub = tmp_path / "dir"
    sub.mkdir()
    (sub / "b.txt").write_text("beta " * 40)
    (sub / "c.txt").write_text("gamma " * 30)
    (sub / "ignored.md").write_text("delta")
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["one two", "three"])) + "\n\n")
    assert read_text(tmp_path / "a.txt") == "alpha " * 50
    assert read_text(sub) == "beta " * 40 + "\n\n" + "gamma " * 30  # sorted, .txt only
    assert read_text(jl) == "one two\n\nthree"
    ids = load_calibration(sub, tok, nsamples=3, seqlen=32, seed=1)
    assert ids.shape == (3, 32)
    assert tok.decode(ids[0, 1:]) in read_text(sub)  # windows are contiguous slices of the text


def test_seeded_determinism(tok):
    a = load_calibration(None, tok, nsamples=6, seqlen=64, seed=3)
    b = load_calibration(None, tok, nsamples=6, seqlen=64, seed=3)
    c = load_calibration(None, tok, nsamples=6, seqlen=64, seed=4)
    assert torch.equal(a, b) and calibration_hash(a) == calibration_hash(b)
    assert not torch.equal(a, c) and calibration_hash(a) != calibration_hash(c)


def test_sample_windows_offsets():
    ids = torch.arange(100)
    w = sample_windows(ids, 5, 10, seed=0)  # no BOS: 10 consecutive tokens
    assert w.shape == (5, 10) and torch.all(w[:, 1:] - w[:, :-1] == 1)
    w = sample_windows(ids, 5, 10, seed=0, bos_id=-1)  # BOS + 9 tokens
    assert torch.all(w[:, 0] == -1) and torch.all(w[:, 2:] - w[:, 1:-1] == 1)
    assert sample_windows(torch.arange(11), 2, 10).shape == (2, 10)  # exactly enough tokens


def test_errors(tmp_path, tok):
    with pytest.raises(CalibrationError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(CalibrationError, match="empty"):
        load_calibration(empty, tok, 2, 16)
    (tmp_path / "nofiles").mkdir()
    with pytest.raises(CalibrationError, match="no .txt files"):
        read_text(tmp_path / "nofiles")
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    with pytest.raises(CalibrationError, match="too short.*--seqlen"):
        load_calibration(short, tok, 2, 64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2: not valid JSON"):
        read_text(bad)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"content": "x"}\n')
    with pytest.raises(CalibrationError, match="'text'"):
        read_text(nofield)
    with pytest.raises(CalibrationError, match="nsamples"):
        sample_windows(torch.arange(100), 0, 10)
    assert tokenize("ab", tok).tolist() == tok("ab", add_special_tokens=False)["input_ids"]


def test_windows_do_not_overlap_when_the_text_suffices():
    ids = torch.arange(1000)
    rep: dict = {}
    w = sample_windows(ids, 9, 100, seed=3, report=rep)
    assert w.numel() == len(set(w.flatten().tolist()))  # every token at most once
    assert rep == {"text_tokens": 1000, "distinct_windows": 9, "overlapping_windows": 0}
    assert not torch.equal(w, sample_windows(ids, 9, 100, seed=4))


def test_short_text_uses_every_window_then_says_it_overlaps(capsys):
    import types

    from ptq.preflight import check_calibration
    from ptq.recipes import load_recipe

    ids = torch.arange(350)
    rep: dict = {}
    w = sample_windows(ids, 6, 100, seed=0, report=rep)
    assert rep == {"text_tokens": 350, "distinct_windows": 3, "overlapping_windows": 3}
    firsts = {int(r[0]) for r in w[:3]}
    assert len(firsts) == 3 and max(firsts) - min(firsts) >= 200  # the three distinct windows tile the text
    cov = check_calibration(w, types.SimpleNamespace(hidden_size=8, intermediate_size=16), load_recipe("gptq"), rep)
    err = capsys.readouterr().err
    assert "350 tokens, fewer than --nsamples 6 x --seqlen 100" in err and "--nsamples 3" in err
    assert cov["overlapping_windows"] == 3


@pytest.mark.slow
def test_default_text_fills_128_windows_without_reuse(smollm2_dir):
    """The quick start's calibration (128 x 512 SmolLM2 tokens) never repeats text."""
    from ptq.model_io import tokenizer_for

    rep: dict = {}
    ids = load_calibration(None, tokenizer_for(smollm2_dir), 128, 512, 0, report=rep)
    assert rep["overlapping_windows"] == 0 and rep["text_tokens"] >= 128 * 512
    assert ids.unique().numel() > 5000


def test_coverage_counts_repeated_windows_once():
    import torch

    from calib.data import calibration_coverage

    text = torch.arange(1000) % 997 + 3  # 1000 distinct-ish tokens
    fresh = torch.stack([text[i * 100:(i + 1) * 100] for i in range(8)])
    again = torch.cat([fresh, fresh])
    a, b = calibration_coverage(fresh), calibration_coverage(again)
    assert a["unique_tokens"] == 800 and a["reuse"] == 1.0
    assert b["unique_tokens"] == 800 and b["reuse"] == 2.0


def test_few_unique_tokens_warn_and_raise_damping(capsys):
    import types

    import torch

    from ptq.preflight import MIN_DAMP_FEW_TOKENS, check_calibration
    from ptq.recipes import load_recipe

    recipe = load_recipe("gptq")
    ids = torch.arange(600).reshape(4, 150).repeat(2, 1)  # 600 unique tokens, each used twice
    cov = check_calibration(ids, types.SimpleNamespace(hidden_size=512, intermediate_size=1024), recipe)
    assert cov["unique_tokens"] == 600 and cov["reuse"] == 2.0
    assert recipe.passes[0][1].damp == MIN_DAMP_FEW_TOKENS and cov["damp_raised"] == {"gptq": MIN_DAMP_FEW_TOKENS}
    err = capsys.readouterr().err
    assert "overlap" in err and "rank-deficient" in err
    recipe = load_recipe("gptq")
    cov = check_calibration(ids[:4], types.SimpleNamespace(hidden_size=64, intermediate_size=160), recipe)
    assert cov["warnings"] == [] and recipe.passes[0][1].damp == 0.01
