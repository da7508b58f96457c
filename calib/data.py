"""Calibration sets: N samples x L tokens drawn with a seed from a text file, a JSONL file (a ``text`` field per
line), a folder of ``.txt`` files, or the embedded default text (`default_calibration.txt`, see README).

The text is tokenized once (no special tokens), then cut into non-overlapping windows of L tokens, of which N are
drawn with the seed, so no text is used twice. When the text holds fewer than N windows, every window is used once
and the rest are drawn at random offsets (they overlap the others); `sample_windows` records this in ``report`` and
`ptq compress` says so (``calibration_check`` in report.json).
BOS: `resolve_bos` decides once per run, for calibration and evaluation alike: by default the tokenizer's own
setting (does ``tokenizer("a")`` start with its BOS token? Llama-3, Gemma: yes; SmolLM2, GPT-2: no), or
``--bos/--no-bos``. With BOS, windows hold the BOS token and L-1 text tokens.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

DEFAULT_TEXT = Path(__file__).with_name("default_calibration.txt")


class CalibrationError(ValueError):
    pass


def read_text(path: str | Path | None) -> str:
    """All text of a .txt file, a .jsonl file (``text`` field), or a folder of .txt files; None = embedded default."""
    if path is None:
        return DEFAULT_TEXT.read_text(encoding="utf-8")
    p = Path(path)
    if not p.exists():
        raise CalibrationError(f"calibration path {p} does not exist")
    from ptq.validate import read_text_file  # bounded, and binary files are refused (never decoded as junk)

    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise CalibrationError(f"calibration folder {p} has no .txt files")
        return "\n\n".join(read_text_file(f, "text file") for f in files)
    if p.suffix == ".jsonl":
        parts = []
        for i, line in enumerate(read_text_file(p, "text file").splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{p}:{i + 1}: not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise CalibrationError(f"{p}:{i + 1}: each JSONL line needs a string field 'text'")
            parts.append(rec["text"])
        return "\n\n".join(parts)
    return read_text_file(p, "text file")


def tokenize(text: str, tokenizer) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0,
                   bos_id: int | None = None, report: dict | None = None) -> torch.Tensor:
    """``[nsamples, seqlen]`` windows of the 1-D token stream ``ids``: the stream (from a seeded offset) is cut
    into ``k = len // body`` non-overlapping windows and ``nsamples`` of them are drawn without replacement. If
    ``k < nsamples``, all ``k`` are used and the other ``nsamples - k`` start at seeded random offsets (overlapping).
    ``report`` (a dict) receives ``text_tokens``, ``distinct_windows`` and ``overlapping_windows``."""
    body = seqlen - (1 if bos_id is not None else 0)
    if nsamples < 1 or seqlen < 2:
        raise CalibrationError("need nsamples >= 1 and seqlen >= 2")
    if ids.numel() < body + 1:
        raise CalibrationError(f"calibration text is too short: {ids.numel()} tokens, need at least {body + 1} "
                               f"for {seqlen}-token samples; give more text or lower --seqlen")
    g = torch.Generator().manual_seed(seed)
    k = ids.numel() // body
    shift = int(torch.randint(0, ids.numel() - k * body + 1, (1,), generator=g))
    chunks = torch.randperm(k, generator=g)[:nsamples]
    starts = [shift + body * int(c) for c in chunks]
    extra = nsamples - len(starts)
    if extra > 0:
        starts += torch.randint(0, ids.numel() - body, (extra,), generator=g).tolist()
    if report is not None:
        report.update(text_tokens=int(ids.numel()), distinct_windows=nsamples - max(extra, 0),
                      overlapping_windows=max(extra, 0))
    rows = torch.stack([ids[s:s + body] for s in starts])
    if bos_id is not None:
        rows = torch.cat([torch.full((nsamples, 1), bos_id, dtype=torch.long), rows], 1)
    return rows


def load_calibration(path, tokenizer, nsamples: int = 128, seqlen: int = 512, seed: int = 0,
                     bos: bool | None = None, report: dict | None = None) -> torch.Tensor:
    """``[nsamples, seqlen]`` calibration ids; ``bos`` as in `resolve_bos` (None: the tokenizer's default);
    ``report`` as in `sample_windows`."""
    text = read_text(path)
    if not text.strip():
        raise CalibrationError(f"calibration text {path or DEFAULT_TEXT.name} is empty")
    return sample_windows(tokenize(text, tokenizer), nsamples, seqlen, seed, resolve_bos(tokenizer, bos), report)


def bos_id_of(tokenizer) -> int | None:
    return getattr(tokenizer, "bos_token_id", None)


def tokenizer_adds_bos(tokenizer) -> bool:
    """The tokenizer's own setting: does plain ``tokenizer(text)`` start with its BOS token?"""
    bos = bos_id_of(tokenizer)
    if bos is None:
        return False
    ids = tokenizer("a", return_attention_mask=False)["input_ids"]
    return bool(ids) and ids[0] == bos


def resolve_bos(tokenizer, bos: bool | None) -> int | None:
    """BOS id to prepend to every window, or None. ``bos`` True/False forces it (``--bos/--no-bos``); None
    follows the tokenizer (`tokenizer_adds_bos`)."""
    if bos is None:
        bos = tokenizer_adds_bos(tokenizer)
    if not bos:
        return None
    if bos_id_of(tokenizer) is None:
        raise CalibrationError("--bos: the tokenizer has no BOS token; drop --bos")
    return bos_id_of(tokenizer)


def recorded_bos(folder) -> bool | None:
    """The BOS choice a ptq output was calibrated with, when its run overrode the tokenizer (``--bos`` /
    ``--no-bos``, manifest.json ``calibration.bos_source``); None otherwise. `ptq eval` / `ptq gate` use it as
    their default, so a model is evaluated with the BOS setting it was calibrated with."""
    try:
        cal = json.loads((Path(folder) / "manifest.json").read_text()).get("calibration") or {}
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return bool(cal.get("bos")) if cal.get("bos_source") in ("--bos", "--no-bos") else None


def eval_bos(folder, tokenizer, bos: bool | None) -> tuple[bool | None, dict]:
    """``bos`` for evaluating the model in ``folder`` and its note: an explicit ``bos`` wins, else the model's
    recorded calibration choice (`recorded_bos`, note source ``"manifest"``), else the tokenizer's setting."""
    if bos is None:
        rec = recorded_bos(folder) if folder is not None else None
        if rec is not None:
            return rec, {**bos_note(tokenizer, rec), "source": "manifest"}
    return bos, bos_note(tokenizer, bos)


def bos_note(tokenizer, bos: bool | None) -> dict:
    """What the report records: ``{"bos": used?, "source": "tokenizer" | "--bos" | "--no-bos"}``."""
    return {"bos": resolve_bos(tokenizer, bos) is not None,
            "source": "tokenizer" if bos is None else ("--bos" if bos else "--no-bos")}


def calibration_hash(ids: torch.Tensor) -> str:
    """sha256 of the token ids actually used (recorded in the manifest)."""
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()


def calibration_coverage(ids: torch.Tensor, ngram: int = 8) -> dict:
    """How much distinct text the windows ``ids [n, L]`` hold: ``unique_tokens`` estimates the distinct text
    positions as the number of distinct ``ngram``-token runs (overlapping windows repeat theirs), ``reuse`` =
    tokens used / unique tokens (1.0 = every token used once)."""
    ngram = min(ngram, ids.shape[1])
    grams = ids.unfold(1, ngram, 1).reshape(-1, ngram)
    heads = int(torch.unique(ids[:, :ngram], dim=0).shape[0])  # distinct windows (each starts ngram-1 tokens early)
    unique = int(torch.unique(grams, dim=0).shape[0]) + heads * (ngram - 1)
    unique = min(unique, ids.numel())
    return {"tokens": int(ids.numel()), "unique_tokens": unique, "reuse": round(ids.numel() / max(1, unique), 3)}
