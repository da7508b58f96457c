"""OS+ vs SmoothQuant vs naive W/A quantization on SmolLM2-135M: wikitext-2 perplexity (no BOS, non-overlapping
512-token windows). Weights: asymmetric per-channel min/max (RTN, or GPTQ); activations: asymmetric per-token
dynamic fake-quant on the decoder linears' inputs (the OS+ LLaMA setting). Calibration: Jane Austen text
(``$PTQ_DATA/janeausten``), the same ``--calib-samples`` x 512 tokens for every method (OS+ statistics and
search, SmoothQuant's absmax, GPTQ).

Config names: ``METHOD[-sym|-asym]-wXaY[-dpfp|-dpq]``
(``-sym`` / ``-asym``: weight symmetry; default the recipe's for ``os-recipe``, asymmetric otherwise). METHOD: ``naive`` (RTN + act quant), ``sq`` (SmoothQuant alpha 0.5),
``os`` (OS+ scale search, recipe defaults), ``os-dense`` (OS+ with every grid point and the loss on all tokens:
the unsubsampled reference search), ``os-gptq`` (OS+ then GPTQ), ``os-shift`` (OS+ with explicit RMSNorm shift).
Without ``-dpfp`` the down_proj input is quantized (and migrated from up_proj by ``sq`` / ``os``); with
``-dpfp`` it stays in full precision (the other official OS+ LLaMA configuration). ``fp32`` evaluates the model.

Each config is compressed with the real layer loop into an fp checkpoint (DenseWriter), re-loaded with
ptq.model_io.full_model, the activation quantizers re-installed from config.json (load_act_quant), evaluated with
ptq.eval.metrics.model_metrics, and logged with bench/results_log.append (table ``osplus_smollm2``).

    python bench/osplus_smollm2.py --configs os-w4a4,os-w4a4-dpfp,sq-w4a4,naive-w4a4
    python bench/osplus_smollm2.py --table
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
DATA = Path(os.environ.get("PTQ_DATA", ROOT.parent / "shared" / "data"))
TABLE = "osplus_smollm2"
SERIES = 2  # rows of this script's current form (current evaluator, down_proj migrated / quantized / fp)


DOWN = {None: "migrated", "-dpfp": "fp", "-dpq": "quantized"}  # down_proj input: name suffix -> treatment


def parse(name: str) -> tuple[str, int, int, str]:
    m = re.fullmatch(r"(.+)-w(\d+)a(\d+)(-dpfp|-dpq)?", name)
    if not m:
        raise SystemExit(f"bad config name {name!r} (METHOD-wXaY[-dpfp|-dpq])")
    return m.group(1), int(m.group(2)), int(m.group(3)), DOWN[m.group(4)]


OLD_SEARCH = dict(search_samples=1, grid=16, max_steps=16, loss_tokens=0, loss_rows=0, coarse=0)  # 9509178


def passes_for(method: str, down: str, args):
    """Passes of METHOD with the down_proj input ``down`` = migrated | quantized (not migrated) | fp."""
    from ptq.passes.act_quant import ActQuantPass
    from ptq.passes.gptq import GPTQPass
    from ptq.passes.osplus import LossProbe, OSPlusPass
    from ptq.passes.rtn import RTNPass
    from ptq.passes.smoothquant import SmoothQuantPass
    from ptq.passes import get_pass_class
    from ptq.recipes import load_recipe

    aq = ActQuantPass(ActQuantPass.Options(skip=["mlp.down_proj"] if down == "fp" else []))
    migrate = down == "migrated"

    def osp(**kw):
        kw = {"search_samples": args.calib_samples, **kw}
        return OSPlusPass(OSPlusPass.Options(down_proj=migrate, **kw))

    def recipe_gptq():  # the os+ recipe's GPTQ options
        return GPTQPass(next(o for n, o in load_recipe("os+").passes if n == "gptq"))

    LossProbe.unbiased = method != "os-biased"
    over = {"down_loss": "normed"} if method == "os-recipe-normed" else {}
    if method in ("os-recipe", "os-recipe-normed"):  # the recipe's passes (os+ -> gptq -> act-quant)
        if down == "quantized":
            raise SystemExit("os-recipe: the recipes migrate down_proj (os+) or keep it fp (os+-down-fp)")
        rec = load_recipe("os+-down-fp" if down == "fp" else "os+")
        out = []
        for n, o in rec.passes:
            if n == "os+":
                o = dataclasses.replace(o, search_samples=args.calib_samples, **over)
            out.append(get_pass_class(n)(o))
        return out
    table = {
        "naive": lambda: [RTNPass(), aq],
        "sq": lambda: [SmoothQuantPass(SmoothQuantPass.Options(alpha=0.5, down_proj=migrate)), RTNPass(), aq],
        "os": lambda: [osp(), RTNPass(), aq],
        # 075c055's search: loss on 2048 tokens x 2048 features, tokens unweighted (outliers over-counted)
        "os-biased": lambda: [osp(loss_tokens=2048, loss_rows=2048), RTNPass(), aq],
        "os-old": lambda: [osp(**OLD_SEARCH), RTNPass(), aq],
        "os-normed": lambda: [osp(down_loss="normed"), RTNPass(), aq],
        "os-dense": lambda: [osp(loss_tokens=0, loss_rows=0, coarse=0), RTNPass(), aq],
        "os-shift": lambda: [osp(shift="on"), RTNPass(), aq],
        "os-gptq": lambda: [osp(), recipe_gptq(), aq],
        "naive-gptq": lambda: [recipe_gptq(), aq],
    }
    return table[method]()


def run_config(name: str, args, model_dir, calib, windows) -> dict:
    from ptq.eval.metrics import model_metrics
    from ptq.export.base import DenseWriter
    from ptq.model_io import StreamingModel, full_model
    from ptq.passes.act_quant import load_act_quant
    from ptq.pipeline import compress_loop
    from ptq.quant.primitives import QuantSpec
    from ptq.recipes import Defaults

    t0 = time.time()
    if name == "fp32":
        model, _ = full_model(model_dir)
        m = model_metrics(model, windows)
        return {"config": name, "series": SERIES, "ppl": m.ppl, "tokens": m.tokens, "windows": len(windows),
                "eval_s": round(time.time() - t0, 1)}
    method, wb, ab, down = parse(name)
    wsym = None  # weight symmetry: METHOD-sym / METHOD-asym override; default: the recipe's, else asymmetric
    if method.endswith(("-asym", "-sym")):
        method, wsym = method.rsplit("-", 1)[0], method.endswith("-sym")
    if method.startswith("naive") and down == "migrated":
        down = "quantized"  # nothing migrates without a migration pass
    if wsym is None:
        from ptq.recipes import load_recipe
        rec = "os+-down-fp" if down == "fp" else "os+"
        wsym = load_recipe(rec).defaults.sym if method.startswith("os-recipe") else False
    spec = QuantSpec(bits=wb, group_size=-1, sym=wsym)
    defaults = Defaults(bits=wb, group_size=-1, act_bits=ab, act_granularity="token")
    passes = passes_for(method, down, args)
    for p in passes:
        p.spec, p.defaults = spec, defaults
    n = 0 if method == "naive" else 1 if method == "os-old" else args.calib_samples
    out = Path(tempfile.mkdtemp(prefix="ptq-osplus-bench-")) / name
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
    res = {"config": name, "series": SERIES, "method": method, "w_bits": wb, "w_sym": wsym, "a_bits": ab,
           "down_proj_input": down, "ppl": m.ppl, "tokens": m.tokens,
           "windows": len(windows), "calib_samples": n, "calib_seqlen": 512,
           "act_quant_linears": sum(1 for e in (spec_json or {}).get("linears", {}).values() if e.get("quant", True)),
           "compress_s": round(t1 - t0, 1), "eval_s": round(time.time() - t1, 1)}
    for k in loop.layer_stats[0]:
        if k.endswith(("os_t", "os_smax", "sq_smax", "os_evals", "os_loss", "os_loss_noscale")):
            res["mean_" + k] = sum(s[k] for s in loop.layer_stats) / len(loop.layer_stats)
    shutil.rmtree(out.parent, ignore_errors=True)
    return res


def print_table() -> None:
    from results_log import rows

    print(f"{'config':<22} {'ppl':>10} {'calib':>6} {'compress s':>11} {'eval s':>7} commit")
    for r in rows(TABLE):
        print(f"{r['config']:<22} {r['ppl']:>10.3f} {r.get('calib_samples', 0):>6} {r.get('compress_s', 0):>11} "
              f"{r['eval_s']:>7} {r['commit']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="fp32,os-w6a6,os-w4a4,os-w4a4-dpfp,sq-w4a4,sq-w4a4-dpfp,naive-w4a4,"
                    "naive-w4a4-dpfp")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib-samples", type=int, default=64,
                    help="512-token calibration samples for every method (official OS+: 16 x 2048 tokens)")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--no-log", action="store_true", help="print the rows without appending them (exploration)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.table:
        print_table()
        return
    from results_log import append

    from calib.data import load_calibration, read_text, tokenize
    from ptq.eval.metrics import eval_windows
    from ptq.model_io import tokenizer_for
    from ptq.models import smollm2

    model_dir = smollm2.ensure_cache()
    tok = tokenizer_for(model_dir)
    names = args.configs.split(",")
    calib = load_calibration(DATA / "janeausten", tok, args.calib_samples, 512, seed=0,
                             bos=True)  # README rows: BOS-prefixed calibration
    windows = eval_windows(tokenize(read_text(DATA / "wikitext2_test.raw.txt"), tok), 512, args.windows)
    for name in names:
        res = run_config(name, args, model_dir, calib, windows)
        print(res if args.no_log else append(TABLE, res), flush=True)


if __name__ == "__main__":
    main()
