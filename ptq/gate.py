"""Accuracy gate for CI: measure a compressed model and compare with thresholds.

Metrics (as in ptq.eval.metrics, over the scored positions t of non-overlapping windows, logits ``z [T, V]``):
``ppl_ratio = ppl / ppl_ref``, ``kl = mean_t KL(p_ref,t || p_t)`` (nats/token), ``top1 = mean_t [argmax
p_ref,t == argmax p_t]``. Checks: ``ppl_ratio <= max_ppl_ratio``, ``top1 >= min_top1``, ``kl <= max_kl``.

Two ways to get the reference side:

* a baseline model (``--baseline MODEL``): exact metrics, both models streamed layer by layer (the numbers
  are those of `ptq.eval.pair.evaluate_pair` / ``ptq eval``);
* a stored baseline file (``--baseline-json``, written by ``--save-baseline``): reference perplexity, the text
  hash and, per scored position, the reference top-k token ids and log-probs. Then only the compressed model
  runs; ``top1`` is exact and ``kl`` is the KL between the *coarse-grained* distributions over the k reference
  tokens plus one "rest" bucket:
  ``KL_k = sum_{v in S} q_v log(q_v / p_v) + q_rest log(q_rest / p_rest)``, ``q_rest = 1 - sum_S q_v``.
  By the data-processing inequality ``KL_k <= KL`` (a lower bound, tight when the reference mass sits in its
  top k tokens), so the report marks it ``kl_kind = "top{k}-lower-bound"``.
"""
from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SCHEMA = "ptq-gate-baseline/1"


class GateInputError(ValueError):
    """Bad gate input (exit code 2)."""


# -- pure gate logic --------------------------------------------------------------------------------------------
@dataclass
class Thresholds:
    max_ppl_ratio: float | None = None
    min_top1: float | None = None
    max_kl: float | None = None

    def validate(self) -> None:
        if self.max_ppl_ratio is None and self.min_top1 is None and self.max_kl is None:
            raise GateInputError("give at least one threshold: --max-ppl-ratio, --min-top1 or --max-kl")
        if self.max_ppl_ratio is not None and not self.max_ppl_ratio > 0:
            raise GateInputError(f"--max-ppl-ratio must be > 0, got {self.max_ppl_ratio}")
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise GateInputError(f"--min-top1 must be in [0, 1], got {self.min_top1}")
        if self.max_kl is not None and not self.max_kl >= 0:
            raise GateInputError(f"--max-kl must be >= 0, got {self.max_kl}")


@dataclass
class Check:
    metric: str
    value: float
    op: str  # "<=" or ">="
    limit: float
    passed: bool


def check(metrics: dict, th: Thresholds) -> list[Check]:
    """One `Check` per threshold set; NaN values fail. ``metrics`` needs ppl/ppl_ref, top1, kl as used."""
    out = []
    specs = [("ppl_ratio", "<=", th.max_ppl_ratio), ("top1", ">=", th.min_top1), ("kl", "<=", th.max_kl)]
    for name, op, limit in specs:
        if limit is None:
            continue
        v = metrics.get(name)
        if v is None:
            raise GateInputError(f"metric {name} was not measured; it needs a baseline model or a baseline file")
        ok = (v <= limit) if op == "<=" else (v >= limit)
        out.append(Check(name, float(v), op, float(limit), bool(ok and not math.isnan(v))))
    return out


def gate_report(metrics: dict, checks: list[Check]) -> dict:
    return {"passed": all(c.passed for c in checks), "checks": [asdict(c) for c in checks], "metrics": metrics}


# -- measurement ------------------------------------------------------------------------------------------------
def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def _unb64(s: str, dtype, shape) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=dtype).reshape(shape).copy())


def text_windows(model_folder: Path, text: str, seqlen: int, windows: int,
                 bos: bool | None = None) -> tuple[torch.Tensor, str, dict]:
    """``[n, seqlen]`` evaluation windows (as `evaluate_pair`, BOS as `calib.data.eval_bos`: the flag, else the
    model's recorded calibration choice, else the tokenizer's), the sha256 of the text file and the BOS note."""
    from calib.data import eval_bos, read_text, resolve_bos, tokenize
    from ptq.eval.metrics import eval_windows
    from ptq.model_io import tokenizer_for

    if not Path(text).is_file():
        raise GateInputError(f"text file {text} does not exist")
    raw = read_text(text)
    tok = tokenizer_for(model_folder)
    ids = tokenize(raw, tok)
    bos, note = eval_bos(model_folder, tok, bos)
    try:
        w = eval_windows(ids, seqlen, windows, resolve_bos(tok, bos))
    except ValueError as e:
        raise GateInputError(str(e)) from e
    return w, hashlib.sha256(raw.encode()).hexdigest(), note


@torch.no_grad()
def measure(model: str, text: str, seqlen: int = 512, windows: int = 40, baseline: str | None = None,
            stored: dict | None = None, topk: int = 0, dtype=torch.float32,
            allow_other_baseline: bool = False, progress=None,
            bos: bool | None = None) -> tuple[dict, dict | None]:
    """Metrics of ``model`` against a baseline model or a stored baseline; with ``topk > 0`` (baseline
    model only) also returns a baseline file dict for `save_baseline`. Before any forward pass the baseline
    is checked to be the artifact's source model and to tokenize the text identically (`check_gate_inputs`).
    ``bos`` as in `calib.data.resolve_bos` (None: the tokenizer's setting); the metrics record it."""
    from ptq.eval.metrics import _Accumulator, _stream_final, logit_chunks
    from ptq.model_io import StreamingModel
    from ptq.identity import baseline_identity, check_gate_inputs
    from ptq.validate import UsageError

    sm = StreamingModel.open(model, dtype=dtype)
    ref = StreamingModel.open(baseline, dtype=dtype) if baseline else None
    w, text_sha, note = text_windows(sm.folder, text, seqlen, windows, bos)
    ref_w = text_windows(ref.folder, text, seqlen, windows, note["bos"])[0] if ref is not None else None
    if stored is not None:
        _check_stored(stored, text_sha, w, note["bos"])
    try:
        check_gate_inputs(sm, ref, stored, w, ref_w, allow_other_baseline)
    except UsageError as e:
        raise GateInputError(str(e)) from e
    bs = 4
    final = _stream_final(sm, w, bs, progress)
    final_ref = _stream_final(ref, w, bs, progress) if ref is not None else None
    acc = _Accumulator(False)
    top_ids, top_lp, agree, kl_k, pos = [], [], 0, 0.0, 0
    # logits in chunks of positions (`logit_chunks`): never a whole window's [L, V] logits of both models
    for tgt, logits, ref_logits in logit_chunks(sm, final, w, bs, ref, final_ref):
        acc.add_positions(tgt, logits, ref_logits)
        if ref_logits is not None and topk:
            v, i = F.log_softmax(ref_logits.float(), -1).topk(topk, -1)
            top_ids.append(i.to(torch.int32))
            top_lp.append(v)
        if stored is not None:
            lp = F.log_softmax(logits.float(), -1)
            s_ids, s_lp = stored["_ids"][pos:pos + lp.shape[0]], stored["_lp"][pos:pos + lp.shape[0]]
            pos += lp.shape[0]
            agree += int((lp.argmax(-1) == s_ids[:, 0].long()).sum())
            kl_k += float(coarse_kl(s_lp, lp.gather(1, s_ids.long())).sum())
    m = acc.result().to_dict()
    m["kl_kind"] = "exact" if ref is not None else None
    m["bos"], m["bos_source"] = note["bos"], note["source"]
    if stored is not None:
        m.update(ppl_ref=stored["ppl_ref"], top1=agree / pos, kl=kl_k / pos,
                 kl_kind=f"top{stored['topk']['k']}-lower-bound")
    m["ppl_ratio"] = m["ppl"] / m["ppl_ref"] if m.get("ppl_ref") else None
    base = None
    if ref is not None and topk:
        ids_t, lp_t = torch.cat(top_ids), torch.cat(top_lp)
        base = {"schema": SCHEMA, "text_sha256": text_sha, "seqlen": seqlen, "windows": int(w.shape[0]),
                "bos": note["bos"],
                **baseline_identity(ref, w),
                "tokens": m["tokens"], "reference": Path(baseline).name, "ppl_ref": m["ppl_ref"],
                "measured_with": {k: m[k] for k in ("ppl", "kl", "top1")},
                "topk": {"k": topk, "positions": int(ids_t.shape[0]),
                         "ids": _b64(ids_t.numpy().astype("<i4")),
                         "logprobs": _b64(lp_t.numpy().astype("<f4"))}}
    return m, base


def coarse_kl(q_lp: torch.Tensor, p_lp: torch.Tensor) -> torch.Tensor:
    """``KL_k`` per position from reference log-probs ``q_lp [T, k]`` and the model's log-probs of the same
    tokens ``p_lp [T, k]`` (see module docstring); returns ``[T]``, each >= 0."""
    q_lp, p_lp = q_lp.double(), p_lp.double()
    head = (q_lp.exp() * (q_lp - p_lp)).sum(-1)
    q_rest = (1 - q_lp.exp().sum(-1)).clamp(min=0)
    p_rest = (1 - p_lp.exp().sum(-1)).clamp(min=1e-30)
    tail = torch.where(q_rest > 0, q_rest * (q_rest.clamp(min=1e-30).log() - p_rest.log()), torch.zeros_like(q_rest))
    return (head + tail).clamp(min=0)


def _check_stored(stored: dict, text_sha: str, w: torch.Tensor, bos: bool) -> None:
    if stored.get("text_sha256") != text_sha:
        raise GateInputError("the baseline file was measured on a different --text file (sha256 differs)")
    if bool(stored.get("bos", False)) != bos:  # files written before the BOS setting was recorded: no BOS
        was = "with" if stored.get("bos") else "without"
        raise GateInputError(f"the baseline file was measured {was} BOS, this run {'with' if bos else 'without'}; "
                             f"pass {'--bos' if stored.get('bos') else '--no-bos'}")
    if stored.get("seqlen") != w.shape[1] or stored.get("windows") != w.shape[0]:
        raise GateInputError(f"the baseline file used {stored.get('windows')} windows of {stored.get('seqlen')} "
                             f"tokens, this run {w.shape[0]} of {w.shape[1]}; pass the same --windows/--seqlen")


def load_baseline(path: str) -> dict:
    import json

    from ptq.validate import MAX_JSON_BYTES, UsageError, read_bounded

    p = Path(path)
    if not p.is_file():
        raise GateInputError(f"baseline file {path} does not exist")
    try:
        raw = read_bounded(p, MAX_JSON_BYTES, "baseline file")
    except UsageError as e:
        raise GateInputError(str(e)) from e
    try:
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise ValueError(f"schema {SCHEMA!r} expected")
        k, n = d["topk"]["k"], d["topk"]["positions"]
        d["_ids"] = _unb64(d["topk"]["ids"], "<i4", (n, k))
        d["_lp"] = _unb64(d["topk"]["logprobs"], "<f4", (n, k))
        if not isinstance(d.get("ppl_ref"), (int, float)) or not 1 <= k <= 64:
            raise ValueError("ppl_ref / topk.k missing or out of range")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, base64.binascii.Error) as e:
        raise GateInputError(f"{path} is not a ptq gate baseline file ({e}); write one with --save-baseline") from e
    return d


def save_baseline(path: str, base: dict) -> None:
    import json

    Path(path).write_text(json.dumps(base, indent=1, sort_keys=True) + "\n")
