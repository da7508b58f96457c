"""Cost of README's quick-start compress: runs exactly that `ptq compress` (into a temp folder) and logs the
run's own report.json numbers (CPU seconds, peak RSS, time per stage) plus the child's rusage to
``bench/results/quickstart_cost.jsonl``.

    python bench/quickstart_cost.py [--no-log]
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
# README quick start, step 1 (after the install): keep the two in sync (tests/test_tables.py checks it)
QUICKSTART = ["compress", "smollm2-135m", "--recipe", "gptq", "--bits", "4", "--group-size", "64",
              "--nsamples", "32"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-log", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from results_log import append

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "smollm2-w4g64"
        t = time.time()
        p = subprocess.Popen([sys.executable, "-m", "cli.main", *QUICKSTART, "--out", str(out)], cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit("quick-start compress failed")
        wall = time.time() - t
        rep = json.loads((out / "report.json").read_text())
    row = {"setting": "quickstart", "ptq_command": "ptq " + " ".join(QUICKSTART) + " --out out/smollm2-w4g64",
           "cpu_s": rep["cpu_seconds"], "peak_rss_gib": round(rep["peak_rss_bytes"] / 2**30, 3),
           "child_cpu_s": round(ru.ru_utime + ru.ru_stime, 1), "child_wall_s": round(wall, 1),
           "compress_seconds": rep["compress_seconds"], "stages": rep["stages"],
           "layers": len(rep["layers"]), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    print(json.dumps(row, indent=2))
    if not args.no_log:
        append("quickstart_cost", row)


if __name__ == "__main__":
    main()
