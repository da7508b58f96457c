"""NUPES vs uniform RTN vs GPTQ on SmolLM2-135M: wikitext-2 perplexity (40 windows x 512, no BOS).

Calibration (GPTQ, NUPES data-driven): 32 samples x 512 tokens from the Jane Austen folder, seed 0.
Methods: ``fp``, ``rtn`` (asymmetric min/max, the project baseline), ``pow1`` (symmetric levels -L..L: NUPES at
a = 1), ``nupes-df`` (PowerQuant exponent search), ``nupes`` (data-driven), ``gptq`` (act-order, asym).
Configs: ``w{3,4}pc`` (per channel) and ``w{3,4}g64``. Each finished row is appended to ``--out`` (JSONL) and
the table is printed from that file, so several processes can fill one table.

    PYTHONPATH=. .venv/bin/python bench/nupes_smollm2.py --methods rtn,nupes-df --configs w3pc,w4pc,w3g64,w4g64
    PYTHONPATH=. .venv/bin/python bench/nupes_smollm2.py --table
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PTQ_DATA", ROOT.parent / "shared" / "data"))
CONFIGS = {"w3pc": (3, -1), "w4pc": (4, -1), "w3g64": (3, 64), "w4g64": (4, 64)}
RANK = [128]
ORDER = ["fp", "rtn", "pow1", "nupes-df", "nupes", "gptq"]


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


class Pow1Pass:
    """NUPES at a = 1: symmetric uniform levels -L..L, scale absmax / L (the exact uniform counterpart)."""

    name = "pow1"
    needs_calibration = False

    def __init__(self, opts, spec):
        self.spec = spec

    def setup(self, sm):
        pass

    def finalize(self, sm):
        return {}

    @torch.no_grad()
    def apply(self, ctx):
        from ptq.quant.power import quantize_power

        for name in ctx.linears():
            lin = ctx.module(name)
            qw = quantize_power(lin.weight.data, 1.0, self.spec.bits, self.spec.group_size)
            lin.weight.data = qw.dequantize().to(lin.weight.dtype)
            ctx.qweights[ctx.prefix + name] = qw


def build_pass(method: str, spec, steps: int):
    from ptq.passes.gptq import GPTQPass
    from ptq.passes.nupes import NUPESDataFreePass, NUPESPass
    from ptq.passes.rtn import RTNPass
    from ptq.recipes import Defaults

    if method == "rtn":
        p = RTNPass(None, replace(spec, sym=False))
    elif method == "gptq":
        p = GPTQPass(GPTQPass.Options(), replace(spec, sym=False))
    elif method == "pow1":
        p = Pow1Pass(NUPESDataFreePass.Options(), spec)
    elif method == "nupes-df":
        p = NUPESDataFreePass(NUPESDataFreePass.Options(), spec)
    elif method == "nupes":
        p = NUPESPass(NUPESPass.Options(steps=steps, rank=RANK[0]), spec)
    else:
        raise ValueError(method)
    p.defaults = Defaults()
    return p


def run_one(method: str, cfg: str, model_dir: Path, windows, calib_ids, steps: int) -> dict:
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
        p = build_pass(method, spec, steps)
        w = MemWriter()
        loop = compress_loop(sm, [p], calib_ids if p.needs_calibration else None, spec, w)
        sd = {k: sm.source.get(k) for k in sm.nonlayer_keys()}
        sd.update(w.sd)
        ev = StreamingModel(None, sm.config, StateDictSource(sd))
        row["exponents"] = w.exponents
        errs = [v for st in loop.layer_stats for k, v in st.items() if k.endswith(".out_err")]
        errs0 = [v for st in loop.layer_stats for k, v in st.items() if k.endswith(".out_err_search")]
        if errs:
            row["mean_out_err"] = sum(errs) / len(errs)
            row["mean_out_err_search"] = sum(errs0) / len(errs0)
    row["quant_s"] = round(time.time() - t0, 1)
    m = stream_metrics(ev, windows, batch_size=4)
    row.update(ppl=m.ppl, tokens=m.tokens, windows=int(windows.shape[0]), total_s=round(time.time() - t0, 1))
    if method == "nupes":
        row.update(steps=steps, rank=RANK[0], nsamples=int(calib_ids.shape[0]))
    return row


def table(path: Path) -> str:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    res = {(r["method"], r["config"]): r for r in rows}
    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    cfgs = list(CONFIGS)
    lines = [f"fp32 ppl: {fp:.3f}" if fp else "fp32 ppl: -", "",
             "| method | " + " | ".join(cfgs) + " |", "|---|" + "---|" * len(cfgs)]
    for m in ORDER[1:]:
        cells = [f"{res[(m, c)]['ppl']:.3f}" if (m, c) in res else "-" for c in cfgs]
        if any(x != "-" for x in cells):
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for m in ("nupes-df", "nupes"):
        for c in cfgs:
            r = res.get((m, c))
            if r and r.get("exponents"):
                e = list(r["exponents"].values())
                by = {}
                for path, v in r["exponents"].items():
                    by.setdefault(path.rsplit(".", 1)[-1], []).append(v)
                per = " ".join(f"{k}={sum(v) / len(v):.2f}" for k, v in by.items())
                lines.append(f"{m} {c}: exponent mean {sum(e) / len(e):.3f} min {min(e):.3f} max {max(e):.3f}; "
                             f"per linear type: {per}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="fp,rtn,nupes-df,nupes,gptq")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rank", type=int, default=64, help="NUPES: rank of the H factor (0 = exact H)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "nupes_smollm2.jsonl"))
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "nupes_bench_cache"), help="tokenized windows / calibration ids")
    ap.add_argument("--table", action="store_true", help="only print the table from --out")
    args = ap.parse_args()
    out = Path(args.out)
    RANK[0] = args.rank
    if args.table:
        print(table(out))
        return
    torch.set_num_threads(1)
    from calib.data import load_calibration, read_text, tokenize
    from ptq.eval.metrics import eval_windows
    from ptq.model_io import tokenizer_for
    from ptq.models.smollm2 import ensure_cache

    model_dir = ensure_cache()
    tok = tokenizer_for(model_dir)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    wf = cache / f"wikitext_{args.windows}.pt"
    if not wf.exists():
        torch.save(eval_windows(tokenize(read_text(DATA / "wikitext2_test.raw.txt"), tok), 512, args.windows), wf)
    windows = torch.load(wf)
    methods = args.methods.split(",")
    calib = None
    if {"gptq", "nupes"} & set(methods):
        cf = cache / f"austen_{args.nsamples}x512.pt"
        if not cf.exists():
            torch.save(load_calibration(DATA / "janeausten", tok, args.nsamples, 512, 0, bos=True), cf)
        calib = torch.load(cf)
    out.parent.mkdir(parents=True, exist_ok=True)
    for cfg in args.configs.split(","):
        for m in methods:
            if m == "fp" and cfg != args.configs.split(",")[0]:
                continue
            row = run_one(m, cfg, model_dir, windows, calib, args.steps)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "exponents"}), flush=True)
    print(table(out))


if __name__ == "__main__":
    main()
