"""GPTQ group modes on SmolLM2-135M, whole model at once (not the sequential converter): Hessians from fp
activations on Jane Austen text, every decoder linear quantized with one variant, wikitext-2 perplexity.

Variants (comma list): ``rtn``; ``d<damp>`` (act-order, groups refit on the error-updated weights), with the
suffixes ``-static`` (qparams fixed up front from the original weights, contiguous groups) and ``-noact``.

    PTQ_DATA=../shared/data .venv/bin/python bench/gptq_group_modes.py --variants rtn,d0.01,d0.01-static,d0.01-noact

Measured 2026-11-29 (W3 g64, 64 x 512 Austen tokens, 8 windows): rtn 99.13, d0.01 97.36, d0.01-static 83.15,
d0.01-noact 175.05, d0.01-static-noact 165.59.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("PTQ_DATA", ROOT.parent / "shared" / "data"))


def main():
    from calib.data import load_calibration, read_text, tokenize
    from ptq.eval.metrics import eval_windows, model_metrics
    from ptq.model_io import full_model, tokenizer_for
    from ptq.models import smollm2
    from ptq.passes.gptq import HessianAccumulator, gptq_quantize
    from ptq.quant.primitives import QuantSpec, fake_quantize

    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="rtn,d0.01,d0.01-static")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    md = smollm2.ensure_cache()
    tok = tokenizer_for(md)
    model, _ = full_model(md)
    model.eval()
    lin = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n}
    shared = ("k_proj", "v_proj", "up_proj")  # share q_proj's / gate_proj's input

    def owner(n):
        return n.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")

    accs: dict[str, HessianAccumulator] = {}

    def hook(name):
        def f(mod, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])
            accs.setdefault(name, HessianAccumulator(x.shape[1])).add(x)
        return f

    hooks = [m.register_forward_hook(hook(n)) for n, m in lin.items() if not n.endswith(shared)]
    with torch.no_grad():
        for w in load_calibration(DATA / "janeausten", tok, args.nsamples, 512, seed=0, bos=True):
            model(w[None])
    for h in hooks:
        h.remove()
    windows = eval_windows(tokenize(read_text(DATA / "wikitext2_test.raw.txt"), tok), 512, args.windows)
    orig = {n: m.weight.data.clone() for n, m in lin.items()}
    spec = QuantSpec(bits=args.bits, group_size=args.group_size, sym=False)
    for v in args.variants.split(","):
        t = time.time()
        for n, m in lin.items():
            if v == "rtn":
                m.weight.data = fake_quantize(orig[n], spec)
                continue
            parts = v.split("-")
            qw, _ = gptq_quantize(orig[n], accs[owner(n)].H, spec, act_order="noact" not in parts,
                                  damp=float(parts[0][1:]), static_groups="static" in parts)
            m.weight.data = qw.dequantize()
        print(f"{v}: ppl {model_metrics(model, windows).ppl:.3f} ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
