"""OS+ compress time at Llama-7B width, as a ratio to GPTQ's on the same model in the same run (target <= 2x).
The ratio is of CPU time (process time, 1 thread): wall time on a shared machine measures the neighbours.

Model: random-init Llama with 7B shapes (hidden 4096, intermediate 11008, 32 heads, vocab 32000) but 2 decoder
layers (bench/rss_7b.py's writer, fp16 safetensors), with 8 planted outlier channels (x 20) in every RMSNorm
weight so the scale search sees the outlier pattern it exists for. Both recipes run through `compress()` in this
process, one after the other, on the same calibration (``--nsamples`` x ``--seqlen`` tokens of the embedded
default text): ``gptq`` (W4 g128) and ``os+`` (OS+ search on q/k/v, gate/up and down_proj inputs, then the same
GPTQ, then per-token activation quant). The OS+ search runs at the recipe's defaults (loss on 1024 tokens x
1024 output features, coarse-to-fine grid); ``--dense`` also times the unsubsampled search (every grid point,
loss on every token and feature) for comparison.

    python bench/osplus_speed.py [--nsamples 16] [--seqlen 512] [--dense]

Rows go to bench/results/osplus_speed.jsonl (bench/results_log.append).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def plant_outliers(folder: Path, n: int = 8, factor: float = 20.0, seed: int = 0) -> None:
    """Multiply ``n`` random channels of every decoder RMSNorm weight by ``factor`` (in place, per shard)."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    for f in sorted(folder.glob("model-*.safetensors")):
        sd = load_file(str(f))
        keys = [k for k in sd if k.endswith("layernorm.weight")]
        if not keys:
            continue
        for k in keys:
            idx = torch.randperm(sd[k].numel(), generator=g)[:n]
            sd[k][idx] *= factor
        save_file(sd, str(f), metadata={"format": "pt"})


def timed(model: Path, out: Path, recipe: str, args, sets: dict | None = None) -> tuple[float, dict]:
    from ptq.compress import CompressOptions, compress

    t, c = time.time(), time.process_time()
    rep = compress(CompressOptions(model=str(model), out=str(out), recipe=recipe, nsamples=args.nsamples,
                                   seqlen=args.seqlen, group_size=128, pass_options=sets or {}, force=True))
    rep["cpu_s"] = time.process_time() - c  # the ratio uses CPU time: wall time on a shared machine is noise
    return time.time() - t, rep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--dense", action="store_true", help="also time the unsubsampled OS+ search")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from results_log import append
    from rss_7b import make_random_7b

    work = Path(tempfile.mkdtemp(prefix="ptq-osplus-speed-"))
    try:
        model = make_random_7b(work / "llama-7b-2l", layers=2)
        plant_outliers(model)
        runs = [("gptq", "gptq", None), ("os+", "os+", None)]
        if args.dense:
            runs.append(("os+ dense search", "os+", {"os+": {"loss_tokens": 0, "loss_rows": 0, "coarse": 0}}))
        times, cpu, stages = {}, {}, {}
        for label, recipe, sets in runs:
            s, rep = timed(model, work / label.replace(" ", "_"), recipe, args, sets)
            times[label], cpu[label] = s, rep["cpu_s"]
            evals = [v for lay in rep["layers"] for k, v in lay.items() if k.endswith("os_evals")]
            stages[label] = {k: v["cpu_s"] for k, v in rep.get("stages", {}).items() if v["cpu_s"] >= 0.5}
            print(f"{label}: {s:.1f} s wall, {cpu[label]:.1f} CPU-s" + (f" ({sum(evals)} search evaluations)" if evals else "")
                  + f" stages {stages[label]}", flush=True)
            shutil.rmtree(work / label.replace(" ", "_"), ignore_errors=True)
        row = {"model": "random Llama 7B shapes, 2 layers, 8 outlier channels x20 per norm",
               "nsamples": args.nsamples, "seqlen": args.seqlen, "threads": torch.get_num_threads(),
               "gptq_cpu_s": round(cpu["gptq"], 1), "osplus_cpu_s": round(cpu["os+"], 1),
               "ratio_osplus_to_gptq": round(cpu["os+"] / cpu["gptq"], 3),
               "gptq_wall_s": round(times["gptq"], 1), "osplus_wall_s": round(times["os+"], 1),
               "stages_cpu_s": stages}
        if args.dense:
            row["osplus_dense_cpu_s"] = round(cpu["os+ dense search"], 1)
            row["ratio_dense_to_gptq"] = round(cpu["os+ dense search"] / cpu["gptq"], 3)
        print(append("osplus_speed", row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
