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
    assert 25_000 <= len(text.encode()) <= 40_000
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
