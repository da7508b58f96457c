"""UDFC on SmolLM2-135M: prune 10/20/30% of the MLP channels + 6/8-bit per-channel RTN, with and without the
closed-form reconstruction (no calibration data anywhere). Metric: wikitext-2 perplexity on non-overlapping
512-token windows (no BOS) and top-1 agreement with fp32.

    PYTHONPATH=. .venv/bin/python bench/udfc_smollm2.py --windows 40 > udfc_smollm2.log 2>&1
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from calib.data import read_text, tokenize
from ptq.eval.metrics import eval_windows
from ptq.model_io import full_model, tokenizer_for
from ptq.models.smollm2 import ensure_cache
from ptq.passes.udfc import udfc_full_model
from ptq.quant.primitives import QuantSpec

DATA = str(Path(os.environ.get("PTQ_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
           / "wikitext2_test.raw.txt")


@torch.no_grad()
def evaluate(model, windows, ref_top=None, bs=4):
    """Perplexity and (with ``ref_top [n, L-1]``) top-1 agreement; returns (ppl, top1, argmax)."""
    nll, tok, agree, tops = 0.0, 0, 0, []
    for s in range(0, windows.shape[0], bs):
        ids = windows[s:s + bs]
        lp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
        nll += float(-lp.gather(-1, ids[:, 1:, None]).sum())
        tok += ids[:, 1:].numel()
        top = lp.argmax(-1)
        tops.append(top)
        if ref_top is not None:
            agree += int((top == ref_top[s:s + bs]).sum())
    return math.exp(nll / tok), (agree / tok if ref_top is not None else 1.0), torch.cat(tops)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--bits", type=int, nargs="+", default=[6, 8])
    ap.add_argument("--modes", nargs="+", default=["none", "pair", "lstsq"])
    ap.add_argument("--group-size", type=int, default=-1)
    ap.add_argument("--input-model", default="propagate", help="propagate | isotropic")
    ap.add_argument("--no-baseline", action="store_true", help="skip the 0%%-pruning RTN rows")
    ap.add_argument("--no-ref", action="store_true", help="skip the fp32 evaluation (no top-1 column)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    src = ensure_cache()
    tok = tokenizer_for(src)
    windows = eval_windows(tokenize(read_text(DATA), tok), args.seqlen, args.windows)
    ppl_ref, ref_top, t = float("nan"), None, time.time()
    if not args.no_ref:
        ref, _ = full_model(src)
        ppl_ref, _, ref_top = evaluate(ref.eval(), windows)
        del ref
    print(f"fp32: ppl {ppl_ref:.3f} ({time.time() - t:.0f} s/eval), {windows.shape[0]} x {args.seqlen} tokens",
          flush=True)
    rows = []
    for bits in args.bits:
        spec = QuantSpec(bits=bits, group_size=args.group_size)
        for ratio in ([] if args.no_baseline else [0.0]) + args.ratios:
            for mode in (["none"] if ratio == 0 else args.modes):
                opts = dict(prune_ratio=ratio, reconstruct=mode != "none", mode="pair" if mode == "none" else mode,
                            input_model=args.input_model)
                if mode == "none":
                    opts["attn_comp"] = False
                model, cfg, _ = udfc_full_model(src, spec, **opts)
                ppl, top1, _ = evaluate(model, windows, ref_top)
                del model
                rows.append((bits, ratio, cfg.intermediate_size, mode, ppl, top1))
                print(f"W{bits} prune {ratio:.0%} (I={cfg.intermediate_size}) {mode:6s} ppl {ppl:9.3f}  "
                      f"top1 {top1:.4f}", flush=True)
    print(f"\n| bits | prune | I | reconstruction | ppl (fp32 {ppl_ref:.3f}) | top-1 vs fp32 |")
    print("|---|---|---|---|---|---|")
    for bits, ratio, inter, mode, ppl, top1 in rows:
        print(f"| {bits} | {ratio:.0%} | {inter} | {mode} | {ppl:.3f} | {top1:.4f} |")


if __name__ == "__main__":
    main()
