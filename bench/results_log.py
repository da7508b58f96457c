"""One row format for every benchmark: `append(table, row)` adds a JSON line to ``bench/results/<table>.jsonl``
with the exact command, the git commit, the machine's core count, the torch/transformers versions and a UTC
timestamp beside the measured numbers. README.md and docs/ cite only numbers that stand in such a row
(`bench/tables.py` prints the tables from them)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "") if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def context(command: str | None = None) -> dict:
    """Provenance fields of a row: command, commit, cores, threads, library versions, time."""
    import torch

    try:
        import transformers
        tv = transformers.__version__
    except ImportError:
        tv = None
    cmd = command or "python " + " ".join(shlex.quote(a) for a in [_rel(sys.argv[0]), *sys.argv[1:]])
    return {"command": cmd, "commit": _commit(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": tv,
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _rel(p: str) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path(__file__).resolve().parent.parent))
    except ValueError:
        return Path(p).name


def append(table: str, row: dict, command: str | None = None) -> dict:
    """Append ``row`` (measured numbers) plus provenance to ``bench/results/<table>.jsonl``; returns the row."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    full = {"table": table, **row, **context(command)}
    with open(RESULTS / f"{table}.jsonl", "a") as f:
        f.write(json.dumps(full, sort_keys=False) + "\n")
    return full


def rows(table: str) -> list[dict]:
    p = RESULTS / f"{table}.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


# The child is started by this small Python process, not by the benchmark itself: a process's peak RSS (ru_maxrss)
# counts the memory it had at fork time, so a child forked by a parent that imported torch would report at least
# the parent's RSS. The wrapper writes the grandchild's own rusage (utime + stime, maxrss KiB) to the file argv[1].
_WRAPPER = ("import os, subprocess, sys\n"
            "p = subprocess.Popen(sys.argv[2:])\n"
            "_, status, ru = os.wait4(p.pid, 0)\n"
            "open(sys.argv[1], 'w').write(f'{ru.ru_utime + ru.ru_stime} {ru.ru_maxrss}')\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run_child(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, float, int, str]:
    """(wall s, CPU s, peak RSS bytes, stdout) of one child process (its own peak, not the benchmark's); exits
    with its stderr tail if it fails."""
    t = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rusage") as usage:
        p = subprocess.Popen([sys.executable, "-c", _WRAPPER, usage.name, *cmd], stdout=out, stderr=err, text=True,
                             env=env, cwd=cwd)
        p.wait()
        out.seek(0)
        err.seek(0)
        if p.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{err.read()[-3000:]}")
        cpu, maxrss_kib = usage.read().split()
        return time.time() - t, float(cpu), int(maxrss_kib) * 1024, out.read()
