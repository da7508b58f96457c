"""How good is the embedded default calibration text? SmolLM2-135M, GPTQ W4 g128 (asym, act-order) calibrated on
calib/default_calibration.txt vs on Jane Austen, wikitext-2 perplexity / KL / top-1 on N windows of 512 tokens.

    python bench/calib_default.py [--windows 40] [--nsamples 64] [--bits 4] [--group-size 128] [--recipe gptq]

Each `ptq compress` runs as a child process (peak RSS from its rusage). Prints a markdown table and appends one
row per calibration source to ``bench/results/calib_default.jsonl`` (bench/results_log.py; ``--no-log`` skips).
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


def run(cmd: list[str]) -> tuple[float, int]:
    t = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return time.time() - t, ru.ru_maxrss * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--recipe", default="gptq")
    ap.add_argument("--calibs", default="default,austen")
    ap.add_argument("--no-log", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from results_log import append
    from ptq.models.smollm2 import ensure_cache

    model = ensure_cache()
    text = str(DATA / "wikitext2_test.raw.txt")
    sources = {"default": None, "austen": str(DATA / "janeausten"), "shakespeare": str(DATA / "tinyshakespeare.txt")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.calibs.split(","):
            out = Path(tmp) / name
            cmd = [sys.executable, "-m", "cli.main", "compress", str(model), "--recipe", args.recipe, "--bits",
                   str(args.bits), "--group-size", str(args.group_size), "--nsamples", str(args.nsamples),
                   "--seqlen", str(args.seqlen), "--out", str(out), "--eval-text", text,
                   "--eval-windows", str(args.windows)]
            if sources[name]:
                cmd += ["--calib", sources[name]]
            wall, rss = run(cmd)
            rep = json.loads((out / "report.json").read_text())
            ev = rep["eval"]
            rows.append((name, ev["ppl"], ev["ppl_ref"], ev["kl"], ev["top1"], wall, rss / 2**20))
            if not args.no_log:
                append("calib_default", {"calib": name, "ppl": ev["ppl"], "ppl_ref": ev["ppl_ref"], "kl": ev["kl"],
                                         "top1": ev["top1"], "windows": args.windows, "recipe": args.recipe,
                                         "bits": args.bits, "group_size": args.group_size,
                                         "nsamples": args.nsamples, "seqlen": args.seqlen, "wall_s": round(wall, 1),
                                         "peak_rss_mib": round(rss / 2**20, 1), "cpu_s": rep.get("cpu_seconds"),
                                         "stages": rep.get("stages")})
            print(f"{name:10s} ppl {ev['ppl']:.3f} (fp32 {ev['ppl_ref']:.3f}) KL {ev['kl']:.4f} top1 {ev['top1']:.3f} "
                  f"wall {wall:.0f}s peakRSS {rss / 2**20:.0f} MiB", flush=True)
    print(f"\nSmolLM2-135M {args.recipe} W{args.bits} g{args.group_size}, {args.nsamples}x{args.seqlen} calibration, "
          f"wikitext-2 {args.windows}x512")
    print("| calibration | ppl | fp32 ppl | KL | top-1 | wall s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.4f} | {r[4]:.3f} | {r[5]:.0f} | {r[6]:.0f} |")


if __name__ == "__main__":
    main()
