"""SmolLM2-135M: fp32 vs RTN vs GPTQ perplexity (wikitext-2 raw test, first N windows of 512 tokens), with
compression wall time, CPU time and peak RSS of each `ptq compress` run (child rusage), side by side.

    python bench/smollm2_gptq.py [--windows 40] [--nsamples 64] [--settings w4g32,w4g64,w3g64] [--format gptq]

Each measured row (and the fp32 reference) is appended to ``bench/results/gptq_smollm2.jsonl`` through
`bench/results_log.py` as soon as it is measured (``--no-log`` to skip); README's GPTQ table is rendered from it.

Calibration: Jane Austen novels (``$PTQ_DATA/janeausten``), seed 0. Perplexity is measured on the exported
artifact (`ptq eval`, which dequantizes what was written). CPU seconds are reported beside wall seconds
because wall time is meaningless on a shared, loaded machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PTQ_DATA", ROOT.parent / "shared" / "data"))
SETTINGS = {"w4g32": (4, 32), "w4g64": (4, 64), "w3g64": (3, 64), "w4g128": (4, 128), "w4pc": (4, -1),
            "w3pc": (3, -1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--settings", default="w4g32,w4g64,w3g64")
    ap.add_argument("--recipes", default="rtn,gptq")
    ap.add_argument("--format", default="gptq")
    ap.add_argument("--calib", default=str(DATA / "janeausten"))
    ap.add_argument("--fp-ppl", type=float, default=None, help="reuse a measured fp32 perplexity")
    ap.add_argument("--table", default="gptq_smollm2", help="bench/results/<table>.jsonl to append rows to")
    ap.add_argument("--no-log", action="store_true", help="print only, append no rows")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from results_log import append, run_child
    run = run_child

    calib_name = Path(args.calib).name
    common = dict(windows=args.windows, eval_seqlen=512, calib=calib_name, nsamples=args.nsamples,
                  seqlen=args.seqlen, format=args.format)

    def log(row: dict) -> None:
        if not args.no_log:
            append(args.table, {**row, **common})
    from ptq.models.smollm2 import ensure_cache

    model = ensure_cache()
    text = str(DATA / "wikitext2_test.raw.txt")
    ptq = [sys.executable, "-m", "cli.main"]

    def ppl(folder) -> float:
        _, _, _, out = run(ptq + ["eval", str(folder), "--text", text, "--windows", str(args.windows), "--json"])
        return json.loads(out)["ppl"]

    fp = args.fp_ppl if args.fp_ppl is not None else ppl(model)
    print(f"fp32 ppl {fp:.3f}", flush=True)
    if args.fp_ppl is None:
        log(dict(setting="fp32", recipe="fp32", ppl=fp))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.settings.split(","):
            bits, gs = SETTINGS[s]
            for recipe in args.recipes.split(","):
                out = Path(tmp) / f"{recipe}-{s}"
                cmd = ptq + ["compress", str(model), "--recipe", recipe, "--bits", str(bits), "--group-size",
                             str(gs), "--format", args.format, "--calib", args.calib, "--nsamples",
                             str(args.nsamples), "--seqlen", str(args.seqlen), "--out", str(out),
                             "--bos"]  # README rows: BOS-prefixed calibration, no-BOS evaluation (`ptq eval`)
                wall, cpu, rss, _ = run(cmd)
                rep = json.loads((out / "report.json").read_text())
                man = json.loads((out / "manifest.json").read_text())
                r = dict(setting=s, recipe=recipe, ppl=ppl(out), wall=wall, cpu=cpu, rss=rss / 2**20,
                         size=rep["size_after_bytes"] / 2**20)
                rows.append(r)
                log(dict(setting=s, recipe=recipe, ppl=r["ppl"], bits=bits, group_size=gs, wall_s=round(wall, 1),
                         cpu_s=round(cpu, 1),
                         peak_rss_mib=round(r["rss"], 1), size_mib=round(r["size"], 2),
                         passes=rep["passes"], stages=rep.get("stages"),
                         calib_tokens_sha256=(man.get("calibration") or {}).get("tokens_sha256")))
                print(f"{s:6s} {recipe:5s} ppl {r['ppl']:8.3f} wall {wall:6.0f}s cpu {cpu:6.0f}s "
                      f"peakRSS {r['rss']:5.0f} MiB size {r['size']:6.1f} MiB", flush=True)
    print(f"\nfp32 perplexity: {fp:.3f} ({args.windows} windows x 512 tokens)\n")
    print("| setting | recipe | ppl | ppl / fp32 | compress wall s | compress CPU s | peak RSS MiB | size MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['recipe']} | {r['ppl']:.3f} | {r['ppl'] / fp:.3f} | {r['wall']:.0f} | "
              f"{r['cpu']:.0f} | {r['rss']:.0f} | {r['size']:.1f} |")


if __name__ == "__main__":
    main()
