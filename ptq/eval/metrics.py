"""Accuracy validation: perplexity, KL divergence and top-1 agreement of a compressed model against the original.

Windows: the text is tokenized once (no special tokens) and cut into non-overlapping windows of L tokens
(the GPTQ / wikitext-2 convention: ``"\\n\\n".join`` of the raw file, tokenized once). With ``bos=True`` and a
tokenizer that has a BOS token, each window is ``[BOS] + (L-1) text tokens`` and the BOS position is not scored.

For logits ``z_ref, z [T, V]``:  ``ppl = exp(mean_t NLL_t)``,
``KL = mean_t sum_v p_ref log(p_ref / p)`` (nats/token), ``top1 = mean_t [argmax z_ref == argmax z]``.

Models are streamed layer by layer (`stream_metrics`) so a 7B checkpoint is evaluated in about one layer of
memory, or run whole (`model_metrics`) for small models and custom attention.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ptq.model_io import StreamingModel, release
from ptq.pipeline import Batch, capture_inputs, for_layer, run_layer


@dataclass
class Metrics:
    ppl: float
    tokens: int
    ppl_ref: float | None = None
    kl: float | None = None
    top1: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def eval_windows(ids: torch.Tensor, seqlen: int = 512, max_windows: int | None = 40,
                 bos_id: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, seqlen]`` windows of the 1-D stream ``ids`` (optionally BOS-prefixed)."""
    body = seqlen - (1 if bos_id is not None else 0)
    n = ids.numel() // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"evaluation text too short: {ids.numel()} tokens < one {seqlen}-token window")
    w = ids[: n * body].reshape(n, body)
    if bos_id is not None:
        w = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), w], 1)
    return w


class _Accumulator:
    def __init__(self, skip_first: bool):
        self.nll = self.nll_ref = self.kl = 0.0
        self.agree = self.tokens = 0
        self.skip = 1 if skip_first else 0
        self.has_ref = False

    def add(self, ids: torch.Tensor, logits: torch.Tensor, ref_logits: torch.Tensor | None):
        """``ids [b, L]``, logits ``[b, L, V]``: token t+1 predicted at position t."""
        s = self.skip
        v = logits.shape[-1]
        self.add_positions(ids[:, s + 1:].reshape(-1), logits[:, s:-1].reshape(-1, v),
                           None if ref_logits is None else ref_logits[:, s:-1].reshape(-1, v))

    def add_positions(self, tgt: torch.Tensor, logits: torch.Tensor, ref_logits: torch.Tensor | None):
        """Scored positions only: targets ``tgt [T]``, logits ``[T, V]`` (and the reference's ``[T, V]``)."""
        lp = F.log_softmax(logits.float(), -1)
        self.nll += float(-lp.gather(1, tgt[:, None]).sum())
        self.tokens += tgt.numel()
        if ref_logits is not None:
            self.has_ref = True
            lr = F.log_softmax(ref_logits.float(), -1)
            self.nll_ref += float(-lr.gather(1, tgt[:, None]).sum())
            self.kl += float((lr.exp() * (lr - lp)).sum())
            self.agree += int((lr.argmax(-1) == lp.argmax(-1)).sum())

    def result(self) -> Metrics:
        t = max(self.tokens, 1)
        m = Metrics(ppl=math.exp(self.nll / t), tokens=self.tokens)
        if self.has_ref:
            m.ppl_ref, m.kl, m.top1 = math.exp(self.nll_ref / t), self.kl / t, self.agree / t
        return m


@torch.no_grad()
def model_metrics(model, windows: torch.Tensor, ref_model=None, batch_size: int = 1,
                  skip_first: bool = False) -> Metrics:
    """Metrics of an in-memory causal LM (and optionally its reference) on ``windows [n, L]``."""
    acc = _Accumulator(skip_first)
    for s in range(0, windows.shape[0], batch_size):
        ids = windows[s:s + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits
        ref = ref_model(input_ids=ids, use_cache=False).logits if ref_model is not None else None
        acc.add(ids, logits, ref)
    return acc.result()


@torch.no_grad()
def _stream_final(sm: StreamingModel, windows: torch.Tensor, batch_size: int, progress=None) -> list[Batch]:
    batches = capture_inputs(sm, windows, batch_size)
    n = len(sm.layers)
    for i in range(n):
        layer = sm.load_layer(i)
        batches = run_layer(layer, for_layer(batches, i))
        release(layer)
        if progress:
            progress(i, n)
    return batches


LOGIT_CHUNK = 128  # positions per logits chunk: [128, V] fp32 = 25 MB at V = 49k (a whole window: 100 MB)


@torch.no_grad()
def logit_chunks(sm: StreamingModel, final: list[Batch], windows: torch.Tensor, batch_size: int,
                 ref: StreamingModel | None = None, final_ref: list[Batch] | None = None, skip_first: bool = False,
                 chunk: int = LOGIT_CHUNK):
    """Yield ``(tgt [T], logits [T, V], ref_logits [T, V] | None)`` over every scored position of ``windows``
    (position t predicts token t+1), one window and at most ``chunk`` positions at a time, from the final
    hidden states ``final`` (outputs of the last decoder layer, batches of ``batch_size`` windows). Only one
    chunk of logits per model is ever alive: memory does not grow with the window length or count."""
    s = 1 if skip_first else 0
    for j, b in enumerate(final):
        for r in range(b.hidden.shape[0]):
            ids = windows[j * batch_size + r]
            h = b.hidden[r]
            hr = final_ref[j].hidden[r] if final_ref is not None else None
            for c0 in range(s, ids.numel() - 1, chunk):
                c1 = min(c0 + chunk, ids.numel() - 1)
                logits = sm.logits(h[c0:c1])  # final norm, lm_head, family soft-capping
                ref_logits = ref.logits(hr[c0:c1]) if hr is not None else None
                yield ids[c0 + 1:c1 + 1], logits, ref_logits


@torch.no_grad()
def stream_metrics(sm: StreamingModel, windows: torch.Tensor, ref: StreamingModel | None = None,
                   batch_size: int = 4, skip_first: bool = False, progress=None) -> Metrics:
    """Layer-by-layer evaluation of ``sm`` (and ``ref``): memory ~ one layer + hidden states of ``windows``
    + one chunk of logits (`logit_chunks`)."""
    final = _stream_final(sm, windows, batch_size, progress)
    final_ref = _stream_final(ref, windows, batch_size, progress) if ref is not None else None
    acc = _Accumulator(skip_first)
    for tgt, logits, ref_logits in logit_chunks(sm, final, windows, batch_size, ref, final_ref, skip_first):
        acc.add_positions(tgt, logits, ref_logits)
    return acc.result()
