"""NUPES vs uniform RTN and GPTQ on SmolLM2-135M: wikitext-2 perplexity (first N windows x 512, no BOS), every
method in one process (compress in memory, evaluate with the streaming evaluator).

Calibration (GPTQ, NUPES data-driven): ``--nsamples`` x 512 tokens from the Jane Austen folder, seed 0.
Methods: ``fp``; ``rtn`` / ``rtn-sym`` (asymmetric min/max / symmetric uniform round-to-nearest); ``gptq`` /
``gptq-sym`` (act-order, static groups, asymmetric / symmetric); ``nupes-df`` (PowerQuant exponent search);
``nupes`` (data-driven: Hessian-weighted exponent search, GPTQ-style rounding on the power grid, exponent line
search with the rounding inside). Configs: ``w{3,4}pc`` (per channel) and ``w{3,4}g64``. Each finished row is
appended to ``bench/results/nupes_smollm2.jsonl`` (bench/results_log.py); docs/nupes.md renders it.

    PYTHONPATH=. python bench/nupes_smollm2.py --methods fp,nupes,gptq-sym,rtn,rtn-sym --configs w3pc,w4pc,w3g64
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
DATA = Path(os.environ.get("PTQ_DATA", ROOT.parent / "shared" / "data"))
CONFIGS = {"w3pc": (3, -1), "w4pc": (4, -1), "w3g64": (3, 64), "w4g64": (4, 64)}
SEARCH = {"grid": 9, "golden_iters": 8}


class MemWriter:
    """Keeps every finished layer's (quantized) parameters and exponents in memory."""

    def __init__(self):
        self.sd: dict[str, torch.Tensor] = {}
        self.exponents: dict[str, float] = {}

    def write_layer(self, ctx) -> None:
        for n, p in ctx.layer.named_parameters():
            self.sd[ctx.prefix + n] = p.data.detach().clone()
        for path, qw in ctx.qweights.items():
            if "exponent" in qw.meta:
                e = qw.meta["exponent"]
                self.exponents[path] = float(e.mean()) if isinstance(e, torch.Tensor) else float(e)


def build_pass(method: str, spec):
    from ptq.passes.gptq import GPTQPass
    from ptq.passes.nupes import NUPESDataFreePass, NUPESPass
    from ptq.passes.rtn import RTNPass
    from ptq.recipes import Defaults

    sym = method.endswith("-sym")
    if method in ("rtn", "rtn-sym"):
        p = RTNPass(None, replace(spec, sym=sym))
    elif method in ("gptq", "gptq-sym"):
        p = GPTQPass(GPTQPass.Options(), replace(spec, sym=sym))
    elif method == "nupes-df":
        p = NUPESDataFreePass(NUPESDataFreePass.Options(), spec)
    elif method == "nupes":
        p = NUPESPass(NUPESPass.Options(**SEARCH), spec)
    else:
        raise ValueError(method)
    p.defaults = Defaults()
    return p


def run_one(method: str, cfg: str, model_dir: Path, windows, calib_ids) -> dict:
    from ptq.eval.metrics import stream_metrics
    from ptq.model_io import StateDictSource, StreamingModel
    from ptq.pipeline import compress_loop
    from ptq.quant.primitives import QuantSpec

    t0 = time.time()
    sm = StreamingModel.open(str(model_dir))
    row = {"method": method, "config": cfg}
    if method == "fp":
        ev = sm
    else:
        bits, gs = CONFIGS[cfg]
        spec = QuantSpec(bits=bits, group_size=gs, sym=True)
        p = build_pass(method, spec)
        w = MemWriter()
        loop = compress_loop(sm, [p], calib_ids if p.needs_calibration else None, spec, w)
        sd = {k: sm.source.get(k) for k in sm.nonlayer_keys()}
        sd.update(w.sd)
        ev = StreamingModel(None, sm.config, StateDictSource(sd))
        if w.exponents:
            by: dict[str, list] = {}
            for path, v in w.exponents.items():
                by.setdefault(path.rsplit(".", 1)[-1], []).append(v)
            row["exponent_mean"] = {k: round(sum(v) / len(v), 4) for k, v in by.items()}
        errs = [v for st in loop.layer_stats for k, v in st.items() if k.endswith(".out_err")]
        errs0 = [v for st in loop.layer_stats for k, v in st.items() if k.endswith(".out_err_rtn")]
        if errs:
            row["mean_out_err"] = sum(errs) / len(errs)
            row["mean_out_err_rtn"] = sum(errs0) / len(errs0)
    row["quant_s"] = round(time.time() - t0, 1)
    m = stream_metrics(ev, windows, batch_size=4)
    row.update(ppl=m.ppl, tokens=m.tokens, windows=int(windows.shape[0]), total_s=round(time.time() - t0, 1))
    if method in ("gptq", "gptq-sym", "nupes"):
        row["nsamples"] = int(calib_ids.shape[0])
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="fp,nupes,gptq-sym,rtn,rtn-sym")
    ap.add_argument("--configs", default="w3pc,w4pc,w3g64")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--dry", action="store_true", help="print the rows, append none")
    ap.add_argument("--resume", action="store_true", help="skip (method, config) pairs already logged at --windows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from calib.data import load_calibration, read_text, tokenize
    from ptq.eval.metrics import eval_windows
    from ptq.model_io import tokenizer_for
    from ptq.models.smollm2 import ensure_cache
    from results_log import append, rows

    model_dir = ensure_cache()
    tok = tokenizer_for(model_dir)
    windows = eval_windows(tokenize(read_text(DATA / "wikitext2_test.raw.txt"), tok), 512, args.windows)
    methods = args.methods.split(",")
    calib = None
    if {"gptq", "gptq-sym", "nupes"} & set(methods):
        calib = load_calibration(DATA / "janeausten", tok, args.nsamples, 512, 0, bos=True)
    configs = args.configs.split(",")
    done = {(r["method"], r["config"]) for r in rows("nupes_smollm2") if r["windows"] == args.windows} \
        if args.resume else set()
    for cfg in configs:
        for m in methods:
            if m == "fp" and cfg != configs[0] or (m, None if m == "fp" else cfg) in done:
                continue
            row = run_one(m, cfg, model_dir, windows, calib)
            if m == "fp":
                row["config"] = None
            if not args.dry:
                append("nupes_smollm2", row)
            print(row, flush=True)


if __name__ == "__main__":
    main()
