"""Peak RSS of `ptq gate` on SmolLM2-135M (compressed vs fp32 baseline model, exact metrics).

    python bench/gate_rss.py [--windows 8] [--baseline-code DIR]

Compresses SmolLM2 with RTN W4 g64 (GPTQ format) into a temp folder, then runs
``python -m cli.main gate Q --baseline SMOLLM2 --text wikitext-2 --windows N --max-ppl-ratio 100`` as a child
process and reads its peak RSS (``ru_maxrss`` of the finished child). ``--baseline-code DIR`` runs the same
command a second time with the ptq code of another checkout (e.g. before logits were streamed in chunks), so
both numbers come from one run on one machine. Rows in bench/results/gate_rss.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)


def gate_rss(code: Path, q: Path, ref: Path, text: Path, windows: int) -> tuple[int, float, dict]:
    """(peak RSS bytes, seconds, metrics) of one `ptq gate` child process running the code in ``code``."""
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "cli.main", "gate", str(q), "--baseline", str(ref), "--text", str(text),
           "--windows", str(windows), "--max-ppl-ratio", "100", "--json"]
    t = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=str(code), stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"gate failed ({proc.returncode}): {stderr[-2000:]}")
    return usage.ru_maxrss * 1024, time.time() - t, json.loads(stdout)["metrics"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--baseline-code", type=Path, default=None, help="another ptq checkout to measure first")
    a = ap.parse_args()
    from bench.results_log import append
    from ptq.compress import CompressOptions, compress
    from ptq.models import smollm2

    ref = smollm2.ensure_cache()
    text = Path(os.environ.get("PTQ_DATA", ROOT.parent / "shared" / "data")) / "wikitext2_test.raw.txt"
    root = Path(tempfile.mkdtemp(prefix="ptq-gate-rss-"))
    try:
        q = root / "q"
        compress(CompressOptions(model=str(ref), out=str(q), recipe="rtn", format="gptq", bits=4, group_size=64))
        runs = ([("baseline-code", a.baseline_code)] if a.baseline_code else []) + [("this", ROOT)]
        for label, code in runs:
            rss, secs, m = gate_rss(code, q, ref, text, a.windows)
            row = {"model": "smollm2-135m", "compressed": "rtn W4 g64 gptq", "windows": a.windows, "code": label,
                   "peak_rss_bytes": rss, "peak_rss_gib": round(rss / 2**30, 3), "seconds": round(secs, 1),
                   "ppl": m["ppl"], "ppl_ref": m["ppl_ref"], "kl": m["kl"], "top1": m["top1"]}
            print(json.dumps(row))
            append("gate_rss", row)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
