"""Gate on SmolLM2-135M: exact metrics (baseline model) vs the stored-baseline mode (top-k KL lower bound).

    .venv/bin/python bench/gate_smollm2.py [--windows 8] [--seqlen 512]

Compresses SmolLM2 with RTN W4 g128 (fp export) into a temp folder, measures ppl ratio / KL / top-1 against the fp32
model, then re-measures from stored baselines with k = 8 and 32 and prints how tight the KL bound is, the
baseline file size and the wall time of each mode. Every mode is one row of ``bench/results/gate_smollm2.jsonl``
(rendered into docs/ci.md by ``bench/tables.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)
from bench.results_log import append  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    a = ap.parse_args()
    from ptq.compress import CompressOptions, compress
    from ptq.gate import load_baseline, measure, save_baseline
    from ptq.models import smollm2

    ref = smollm2.ensure_cache()
    text = Path(os.environ.get("PTQ_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "wikitext2_test.raw.txt"
    root = Path(tempfile.mkdtemp(prefix="ptq-gate-bench-"))
    q = root / "q"
    t = time.time()
    compress(CompressOptions(model=str(ref), out=str(q), recipe="rtn", format="fp", bits=4, group_size=128))
    print(f"compress rtn w4g128: {time.time() - t:.1f} s")
    rows = []
    t = time.time()
    exact, base8 = measure(str(q), str(text), a.seqlen, a.windows, baseline=str(ref), topk=8)
    rows.append(("exact (--baseline)", exact, time.time() - t, None))
    for k in (8, 32):
        if k != 8:
            _, base = measure(str(q), str(text), a.seqlen, a.windows, baseline=str(ref), topk=k)
        else:
            base = base8
        f = root / f"b{k}.json"
        save_baseline(str(f), base)
        t = time.time()
        m, _ = measure(str(q), str(text), a.seqlen, a.windows, stored=load_baseline(str(f)))
        rows.append((f"stored top{k}", m, time.time() - t, f.stat().st_size))
    print(f"\nSmolLM2-135M RTN W4 g128, wikitext-2 test, {a.windows} x {a.seqlen} tokens")
    print(f"{'mode':22s} {'ppl':>8s} {'ppl_ref':>8s} {'ratio':>7s} {'KL':>8s} {'top1':>7s} {'time s':>7s} {'file':>9s}")
    for name, m, dt, size in rows:
        print(f"{name:22s} {m['ppl']:8.3f} {m['ppl_ref']:8.3f} {m['ppl_ratio']:7.4f} {m['kl']:8.4f} "
              f"{m['top1']:7.4f} {dt:7.1f} {'-' if size is None else f'{size / 2**20:.2f}MiB':>9s}")
    print(json.dumps({n: {k: m[k] for k in ('ppl', 'ppl_ref', 'kl', 'top1')} for n, m, _, _ in rows}))
    for name, m, dt, size in rows:
        append("gate_smollm2", {"model": "smollm2-135m", "compressed": "rtn W4 g128 (fp export)",
                                "windows": a.windows, "seqlen": a.seqlen, "mode": name,
                                "ppl": m["ppl"], "ppl_ref": m["ppl_ref"], "ppl_ratio": m["ppl_ratio"],
                                "kl": m["kl"], "top1": m["top1"], "seconds": round(dt, 1),
                                "baseline_file_bytes": size})


if __name__ == "__main__":
    main()
