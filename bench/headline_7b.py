"""The headline command exactly as a user types it, on a local folder named ``llama-7b``:

    python bench/headline_7b.py [--hidden 512] [--layers 2]

builds a random-init Llama with Llama-7B proportions (head_dim 128, intermediate = hidden * 11008 / 4096,
vocabulary 32000, untied head) at reduced width / depth as fp16 safetensors in a temp folder, then runs
``ptq compress llama-7b --bits 4 --recipe os+`` there (no other option: recipe defaults, embedded calibration
text, default output folder) and records the exit code, the output folder printed on the first line, the time,
the input / output sizes and the per-layer progress lines. Row in bench/results/headline_7b.jsonl.
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
sys.path.insert(0, str(ROOT / "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    a = ap.parse_args()
    from bench.results_log import append
    from ptq.model_io import dir_size
    from test_cli_headline import make_7b_shaped

    root = Path(tempfile.mkdtemp(prefix="ptq-headline-"))
    try:
        make_7b_shaped(root / "llama-7b", hidden=a.hidden, layers=a.layers, vocab=32000, dtype=torch.float16)
        cmd = [sys.executable, "-m", "cli.main", "compress", "llama-7b", "--bits", "4", "--recipe", "os+"]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        t = time.time()
        res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        secs = time.time() - t
        lines = (res.stderr + res.stdout).splitlines()
        outs = [p for p in root.iterdir() if p.name != "llama-7b"]
        row = {"headline_command": "ptq compress llama-7b --bits 4 --recipe os+",
               "model": f"random Llama, 7B proportions, hidden {a.hidden}, {a.layers} layers, vocab 32000, fp16",
               "exit_code": res.returncode, "first_line": lines[0].replace(str(root), "<tmp>") if lines else None,
               "output_folders": [p.name for p in outs], "seconds": round(secs, 1),
               "input_bytes": dir_size(root / "llama-7b"), "output_bytes": dir_size(outs[0]) if outs else None,
               "layer_lines": [ln for ln in lines if ln.startswith("layer ")]}
        print(json.dumps(row, indent=1))
        append("headline_7b", row, command="python bench/headline_7b.py " + " ".join(sys.argv[1:]))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
