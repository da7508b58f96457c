"""UDFC on SmolLM2-135M: prune 10/20/30 % of the MLP channels + 6/8-bit per-channel RTN, in one process (the model
is compressed from the cached checkpoint and evaluated in memory for every setting). Reconstructions compared on
the same kept channels: none (drop the columns), merge (data-free Neuron-Merging baseline: cosine partner,
norm-ratio scale, no covariance model), pair and lstsq (UDFC's closed forms), and auto: per setting, the closed
form with the lower perplexity on held-in Jane Austen text (the start of Emma), never on the evaluated windows.
No calibration data enters any compression. Metric: wikitext-2 perplexity on the first N non-overlapping
512-token windows (no BOS) and top-1 agreement with fp32. Appends one row per setting to
bench/results/udfc_smollm2.jsonl.

    PYTHONPATH=. python bench/udfc_smollm2.py --windows 40 > udfc_smollm2.log 2>&1
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from results_log import append  # noqa: E402
from calib.data import read_text, tokenize  # noqa: E402
from ptq.eval.metrics import eval_windows
from ptq.model_io import full_model, tokenizer_for
from ptq.models.smollm2 import ensure_cache
from ptq.passes.udfc import udfc_full_model
from ptq.quant.primitives import QuantSpec

DATA_DIR = Path(os.environ.get("PTQ_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CLOSED_FORMS = ("pair", "lstsq")


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
    ap.add_argument("--heldin-windows", type=int, default=4, help="Jane Austen (Emma) windows for the auto choice")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--bits", type=int, nargs="+", default=[6, 8])
    ap.add_argument("--modes", nargs="+", default=["none", "merge", "pair", "lstsq"])
    ap.add_argument("--input-model", default="propagate", help="propagate | isotropic")
    ap.add_argument("--no-baseline", action="store_true", help="skip the 0%%-pruning RTN rows")
    ap.add_argument("--dry", action="store_true", help="print, append no rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    src = ensure_cache()
    tok = tokenizer_for(src)
    windows = eval_windows(tokenize(read_text(str(DATA_DIR / "wikitext2_test.raw.txt")), tok), args.seqlen,
                           args.windows)
    heldin = eval_windows(tokenize(read_text(str(DATA_DIR / "janeausten" / "emma.txt")), tok), args.seqlen,
                          args.heldin_windows)
    log = (lambda table, row: print("ROW", row)) if args.dry else append
    t = time.time()
    ref, _ = full_model(src)
    ppl_ref, _, ref_top = evaluate(ref.eval(), windows)
    held_ref = evaluate(ref, heldin)[0]
    del ref
    common = dict(windows=int(windows.shape[0]), heldin_windows=int(heldin.shape[0]), input_model=args.input_model)
    log("udfc_smollm2", dict(bits=None, prune=0.0, mode="fp32", ppl=ppl_ref, top1=1.0, heldin_ppl=held_ref,
                             **common))
    print(f"fp32: ppl {ppl_ref:.3f} held-in {held_ref:.3f} ({time.time() - t:.0f} s), "
          f"{windows.shape[0]} x {args.seqlen} tokens", flush=True)
    moments = {}  # propagated input moments: the same for every setting
    for bits in args.bits:
        spec = QuantSpec(bits=bits, group_size=-1)
        for ratio in ([] if args.no_baseline else [0.0]) + args.ratios:
            found = {}
            for mode in (["none"] if ratio == 0 else args.modes):
                t = time.time()
                opts = dict(prune_ratio=ratio, reconstruct=mode != "none", mode="pair" if mode == "none" else mode,
                            input_model=args.input_model)
                if mode == "none":
                    opts["attn_comp"] = False
                model, cfg, _ = udfc_full_model(src, spec, moment_cache=moments, **opts)
                ppl, top1, _ = evaluate(model, windows, ref_top)
                held = evaluate(model, heldin)[0] if mode in CLOSED_FORMS else None
                del model
                found[mode] = dict(ppl=ppl, top1=top1, heldin_ppl=held)
                log("udfc_smollm2", dict(bits=bits, prune=ratio, intermediate=cfg.intermediate_size, mode=mode,
                                         **found[mode], **common))
                print(f"W{bits} prune {ratio:.0%} (I={cfg.intermediate_size}) {mode:6s} ppl {ppl:9.3f} top1 "
                      f"{top1:.4f} held-in {held if held is not None else float('nan'):.3f} "
                      f"({time.time() - t:.0f} s)", flush=True)
            if all(m in found for m in CLOSED_FORMS):
                chosen = min(CLOSED_FORMS, key=lambda m: found[m]["heldin_ppl"])
                log("udfc_smollm2", dict(bits=bits, prune=ratio, intermediate=cfg.intermediate_size, mode="auto",
                                         chosen=chosen, **found[chosen], **common))
                print(f"W{bits} prune {ratio:.0%} auto -> {chosen} (held-in)", flush=True)


if __name__ == "__main__":
    main()
