"""The streamed evaluator (`ptq eval`) against transformers' own forward on SmolLM2-135M: perplexity on the first
N non-overlapping 512-token windows of wikitext-2 test (no BOS), both models fp32, same token ids.

    python bench/eval_vs_transformers.py --windows 8      # rows in bench/results/eval_vs_transformers.jsonl
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_log import append  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--text", default=os.path.join(os.environ.get("PTQ_DATA", "../shared/data"),
                                                   "wikitext2_test.raw.txt"))
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from calib.data import read_text, tokenize
    from ptq.eval.metrics import eval_windows, stream_metrics
    from ptq.model_io import StreamingModel, tokenizer_for
    from ptq.models.smollm2 import ensure_cache

    folder = ensure_cache()
    ids = tokenize(read_text(a.text), tokenizer_for(folder))
    w = eval_windows(ids, 512, a.windows)
    ptq_ppl = stream_metrics(StreamingModel.open(str(folder)), w).ppl
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for x in w:
            lg = hf(x[None]).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(lg, x[1:], reduction="sum").item()
            n += x.numel() - 1
    hf_ppl = math.exp(nll / n)
    print(f"windows {a.windows}: ptq eval {ptq_ppl:.4f}  transformers {hf_ppl:.4f}  ratio {ptq_ppl / hf_ppl:.6f}")
    append("eval_vs_transformers", {"model": "smollm2-135m", "windows": a.windows, "tokens": n,
                                    "ptq_ppl": ptq_ppl, "transformers_ppl": hf_ppl})


if __name__ == "__main__":
    main()
