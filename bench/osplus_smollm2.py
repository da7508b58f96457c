"""OS+ vs SmoothQuant vs naive W/A quantization on SmolLM2-135M: wikitext-2 perplexity (no BOS, non-overlapping
512-token windows). Weights: asymmetric per-channel min/max (RTN, or GPTQ); activations: asymmetric per-token
dynamic fake-quant on every decoder linear's input (the OS+ LLaMA setting). Calibration: Jane Austen text.

Each config is compressed with the real layer loop into an fp checkpoint (DenseWriter), re-loaded with
ptq.model_io.full_model, the activation quantizers re-installed from config.json (load_act_quant), then
evaluated with ptq.eval.metrics.model_metrics. Results are appended to a JSONL file; `--table` prints them.

    .venv/bin/python bench/osplus_smollm2.py --configs os-scale-w4a4,naive-w4a4 --results bench/osplus.jsonl
    .venv/bin/python bench/osplus_smollm2.py --table --results bench/osplus.jsonl
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def passes_for(name: str, grid: int, search_samples: int):
    from ptq.passes.act_quant import ActQuantPass
    from ptq.passes.gptq import GPTQPass
    from ptq.passes.osplus import OSPlusPass
    from ptq.passes.rtn import RTNPass
    from ptq.passes.smoothquant import SmoothQuantPass

    method = name.rsplit("-", 1)[0]

    def osp(shift):
        return OSPlusPass(OSPlusPass.Options(shift=shift, grid=grid, max_steps=grid, search_samples=search_samples))

    table = {
        "naive": lambda: [RTNPass(), ActQuantPass()],
        "sq": lambda: [SmoothQuantPass(SmoothQuantPass.Options(alpha=0.5)), RTNPass(), ActQuantPass()],
        "os-scale": lambda: [osp("auto"), RTNPass(), ActQuantPass()],
        "os-shift": lambda: [osp("on"), RTNPass(), ActQuantPass()],
        "os-scale-gptq": lambda: [osp("auto"), GPTQPass(), ActQuantPass()],
        "os-shift-gptq": lambda: [osp("on"), GPTQPass(), ActQuantPass()],
        "gptq": lambda: [GPTQPass(), ActQuantPass()],
    }
    return table[method]()


def run_config(name: str, args, model_dir, tok, calib, windows) -> dict:
    from ptq.eval.metrics import model_metrics
    from ptq.export.base import DenseWriter
    from ptq.model_io import StreamingModel, full_model
    from ptq.passes.act_quant import load_act_quant
    from ptq.pipeline import compress_loop
    from ptq.quant.primitives import QuantSpec
    from ptq.recipes import Defaults

    t0 = time.time()
    if name.startswith("dir:"):  # evaluate an already compressed folder (kept with --keep)
        folder = Path(name[4:])
        model, _ = full_model(folder)
        spec_json = load_act_quant(model, folder)
        m = model_metrics(model, windows)
        return {"config": folder.name, "ppl": m.ppl, "tokens": m.tokens,
                "act_quant_linears": len(spec_json["linears"]) if spec_json else 0,
                "eval_s": round(time.time() - t0, 1)}
    if name == "fp32":
        model, _ = full_model(model_dir)
        m = model_metrics(model, windows)
        return {"config": name, "ppl": m.ppl, "tokens": m.tokens, "eval_s": round(time.time() - t0, 1)}
    wa = name.rsplit("-", 1)[1]  # e.g. w6a6
    wb, ab = (int(v) for v in wa[1:].split("a"))
    spec = QuantSpec(bits=wb, group_size=-1, sym=False)
    defaults = Defaults(bits=wb, group_size=-1, act_bits=ab, act_granularity="token")
    passes = passes_for(name, args.grid, args.search_samples)
    for p in passes:
        p.spec, p.defaults = spec, defaults
    needs = [p for p in passes if p.name in ("smoothquant", "os+", "gptq")]
    n = 0
    if needs:
        n = args.search_samples
        if any(p.name == "smoothquant" for p in needs):
            n = args.sq_samples
        if any(p.name == "gptq" for p in needs):
            n = args.calib_samples
    out = Path(args.work) / name
    shutil.rmtree(out, ignore_errors=True)
    sm = StreamingModel.open(str(model_dir))
    w = DenseWriter(out, sm, spec)
    def progress(i, nl, pname):
        print(f"  {name}: layer {i + 1}/{nl} {pname} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)

    loop = compress_loop(sm, passes, calib[:n] if n else None, spec, w, progress=progress)
    w.write_nonlayer()
    w.finalize(loop.artifacts)
    t1 = time.time()
    model, _ = full_model(out)
    spec_json = load_act_quant(model, out)
    m = model_metrics(model, windows)
    res = {"config": name, "ppl": m.ppl, "tokens": m.tokens, "calib_samples": n,
           "act_quant_linears": len(spec_json["linears"]) if spec_json else 0,
           "compress_s": round(t1 - t0, 1), "eval_s": round(time.time() - t1, 1)}
    keys = [k for k in loop.layer_stats[0] if k.endswith(("os_t", "os_smax", "sq_smax"))]
    for k in keys:
        res["mean_" + k] = sum(s[k] for s in loop.layer_stats) / len(loop.layer_stats)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return res


def print_table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(f"{'config':<18} {'ppl':>10} {'calib':>6} {'compress s':>11} {'eval s':>7}")
    for r in sorted(rows, key=lambda r: (r["config"].rsplit("-", 1)[-1], r["config"])):
        print(f"{r['config']:<18} {r['ppl']:>10.3f} {r.get('calib_samples', 0):>6} {r.get('compress_s', 0):>11} "
              f"{r['eval_s']:>7}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="fp32,naive-w8a8,naive-w6a6,naive-w4a4,sq-w6a6,sq-w4a4,os-scale-w6a6,"
                    "os-scale-w4a4,os-shift-w6a6,os-shift-w4a4,os-scale-gptq-w6a6,os-scale-gptq-w4a4")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--search-samples", type=int, default=1, help="OS+ statistics/search samples (official: 1 batch)")
    ap.add_argument("--sq-samples", type=int, default=8, help="calibration samples for SmoothQuant's absmax")
    ap.add_argument("--grid", type=int, default=16, help="OS+ t-grid steps (official: >= 100)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ptq_osplus_bench"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "osplus_smollm2.jsonl"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.table:
        print_table(Path(args.results))
        return
    from calib.data import load_calibration, read_text, tokenize
    from ptq.eval.metrics import eval_windows
    from ptq.model_io import tokenizer_for
    from ptq.models import smollm2

    model_dir = smollm2.ensure_cache()
    tok = tokenizer_for(model_dir)
    names = args.configs.split(",")
    calib = None
    if any(not (n == "fp32" or n.startswith(("dir:", "naive"))) for n in names):
        calib = load_calibration(DATA / "janeausten", tok,
                                 max(args.calib_samples, args.sq_samples, args.search_samples), 512, seed=0,
                                 bos=True)
    windows = eval_windows(tokenize(read_text(DATA / "wikitext2_test.raw.txt"), tok), 512, args.windows)
    for name in names:
        res = run_config(name, args, model_dir, tok, calib, windows)
        print(json.dumps(res), flush=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
