"""How good is the embedded default calibration text? SmolLM2-135M, the quick start's GPTQ (asym, act-order, static
groups) calibrated on each source, wikitext-2 perplexity on the first N windows of 512 tokens (`ptq eval`, no BOS).

    python bench/calib_default.py [--settings w4g64,w3g64] [--calibs old-default,default] [--nsamples 32]
                                  [--windows 40] [--old-commit COMMIT]

Sources: ``default`` = calib/default_calibration.txt as checked out; ``old-default`` = the same file at
``--old-commit`` (the 8.8k-token text before it was extended), read with ``git show``; ``austen`` /
``shakespeare`` = the shared corpora (``$PTQ_DATA``). Each compress and eval runs as a child process at one thread
(`results_log.run_child`). Prints a markdown table with each row's ratio to the ``default`` row of its setting
and appends one row per (source, setting) to ``bench/results/calib_default.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.results_log import append, run_child  # noqa: E402

DATA = Path(os.environ.get("PTQ_DATA", ROOT.parent / "shared" / "data"))
SETTINGS = {"w4g64": (4, 64), "w3g64": (3, 64), "w4g128": (4, 128), "w2g64": (2, 64)}


def run(cmd: list[str]) -> tuple[float, float, int, str]:
    return run_child(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"), cwd=ROOT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="w4g64,w3g64")
    ap.add_argument("--calibs", default="old-default,default")
    ap.add_argument("--old-commit", default="0669254")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=32)  # the README quick start
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--recipe", default="gptq")
    ap.add_argument("--no-log", action="store_true")
    args = ap.parse_args()
    from ptq.models.smollm2 import ensure_cache

    model = ensure_cache()
    text = str(DATA / "wikitext2_test.raw.txt")
    ptq = [sys.executable, "-m", "cli.main"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old_default_calibration.txt"
        old.write_bytes(subprocess.run(["git", "show", f"{args.old_commit}:calib/default_calibration.txt"],
                                       cwd=ROOT, capture_output=True, check=True).stdout)
        sources = {"default": None, "old-default": str(old), "austen": str(DATA / "janeausten"),
                   "shakespeare": str(DATA / "tinyshakespeare.txt")}
        for s in args.settings.split(","):
            bits, gs = SETTINGS[s]
            for name in args.calibs.split(","):
                out = Path(tmp) / f"{name}-{s}"
                cmd = ptq + ["compress", str(model), "--recipe", args.recipe, "--bits", str(bits), "--group-size",
                             str(gs), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", "0",
                             "--out", str(out)]
                if sources[name]:
                    cmd += ["--calib", sources[name]]
                wall, cpu, rss, _ = run(cmd)
                rep = json.loads((out / "report.json").read_text())
                chk = rep.get("calibration_check") or {}
                _, _, _, ev = run(ptq + ["eval", str(out), "--text", text, "--windows", str(args.windows), "--json"])
                ppl = json.loads(ev)["ppl"]
                r = {"calib": name, "setting": s, "ppl": ppl, "windows": args.windows, "recipe": args.recipe,
                     "bits": bits, "group_size": gs, "nsamples": args.nsamples, "seqlen": args.seqlen,
                     "text_tokens": chk.get("text_tokens"), "unique_tokens": chk.get("unique_tokens"),
                     "reuse": chk.get("reuse"), "overlapping_windows": chk.get("overlapping_windows"),
                     "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mib": round(rss / 2**20)}
                rows.append(r)
                if not args.no_log:
                    append("calib_default", r)
                print(f"{s:6s} {name:12s} ppl {ppl:.3f}  text tokens {r['text_tokens']}  reuse {r['reuse']}  "
                      f"cpu {cpu:.0f}s", flush=True)
    print(f"\nSmolLM2-135M {args.recipe}, {args.nsamples} x {args.seqlen} calibration tokens, "
          f"wikitext-2 {args.windows} x 512 (ratio to the `default` row of the same setting)")
    print("| setting | calibration | text tokens | reuse | ppl | ppl / default |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ref = next((x for x in rows if x["setting"] == r["setting"] and x["calib"] == "default"), r)
        print(f"| {r['setting']} | {r['calib']} | {r['text_tokens']} | {r['reuse']} | {r['ppl']:.2f} | "
              f"{r['ppl'] / ref['ppl']:.3f} |")


if __name__ == "__main__":
    main()
