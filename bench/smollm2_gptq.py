"""SmolLM2-135M: fp32 vs RTN vs GPTQ perplexity (wikitext-2 raw test, first N windows of 512 tokens), with
compression wall time and peak RSS of each `ptq compress` run (child process rusage), side by side.

    python bench/smollm2_gptq.py [--windows 40] [--nsamples 64] [--settings w4g32,w4g64,w3g64] [--format gptq]

Calibration: Jane Austen novels (``$PTQ_DATA/janeausten``), seed 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PTQ_DATA", ROOT.parent / "shared" / "data"))
SETTINGS = {"w4g32": (4, 32), "w4g64": (4, 64), "w3g64": (3, 64), "w4g128": (4, 128), "w4pc": (4, -1),
            "w3pc": (3, -1)}


def run(cmd: list[str]) -> tuple[float, int]:
    t = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, ru = os.wait4(p.pid, 0)
    err = p.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return time.time() - t, ru.ru_maxrss * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--settings", default="w4g32,w4g64,w3g64")
    ap.add_argument("--recipes", default="rtn,gptq")
    ap.add_argument("--format", default="gptq")
    ap.add_argument("--calib", default=str(DATA / "janeausten"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from ptq.models.smollm2 import ensure_cache

    model = ensure_cache()
    text = str(DATA / "wikitext2_test.raw.txt")
    ptq = [sys.executable, "-m", "cli.main"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.settings.split(","):
            bits, gs = SETTINGS[s]
            for recipe in args.recipes.split(","):
                out = Path(tmp) / f"{recipe}-{s}"
                cmd = ptq + ["compress", str(model), "--recipe", recipe, "--bits", str(bits), "--group-size",
                             str(gs), "--format", args.format, "--calib", args.calib, "--nsamples",
                             str(args.nsamples), "--seqlen", str(args.seqlen), "--out", str(out),
                             "--eval-text", text, "--eval-windows", str(args.windows)]
                wall, rss = run(cmd)
                rep = json.loads((out / "report.json").read_text())
                ev = rep["eval"]
                rows.append(dict(setting=s, recipe=recipe, ppl=ev["ppl"], ppl_fp32=ev["ppl_ref"], kl=ev["kl"],
                                 top1=ev["top1"], compress_s=rep["compress_seconds"], wall_s=wall,
                                 peak_rss_mib=rss / 2**20, size_mib=rep["size_after_bytes"] / 2**20))
                r = rows[-1]
                print(f"{s:7s} {recipe:5s} ppl {r['ppl']:8.3f} (fp32 {r['ppl_fp32']:.3f}) KL {r['kl']:.4f} "
                      f"top1 {r['top1']:.3f} compress {r['compress_s']:.0f}s wall {wall:.0f}s "
                      f"peakRSS {r['peak_rss_mib']:.0f} MiB size {r['size_mib']:.1f} MiB", flush=True)
    print("\n| setting | recipe | ppl | fp32 ppl | KL | top-1 | compress s | peak RSS MiB | size MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['recipe']} | {r['ppl']:.3f} | {r['ppl_fp32']:.3f} | {r['kl']:.4f} | "
              f"{r['top1']:.3f} | {r['compress_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['size_mib']:.1f} |")


if __name__ == "__main__":
    main()
