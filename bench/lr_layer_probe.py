"""Learned rounding on one SmolLM2-135M decoder layer: the layer-output loss (the pass's own objective, full
calibration set, fp32) reached from each start and schedule, and the CPU seconds of the pass on that layer.

The layer's inputs are the fp model's hidden states on the calibration text (Jane Austen, ``--nsamples`` x 512
tokens, seed 0, as `ptq compress`), so every configuration sees the same inputs; ``loss_init`` is the start's
(RTN or GPTQ) loss, ``loss_final`` the learned weights' (the pass keeps the better of the two). Rows go to
``bench/results/lr_layer_probe.jsonl``; docs/learned_rounding.md renders them.

    python bench/lr_layer_probe.py --layer 10 --bits 3 --group-size 64 [--configs NAME,...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.results_log import append  # noqa: E402

DATA = Path(os.environ.get("PTQ_DATA", ROOT.parent / "shared" / "data"))
# name -> learned-rounding options (the rest: the pass defaults)
CONFIGS = {
    "gptq": dict(init="gptq", iters=0),
    "rtn": dict(init="rtn", iters=0),
    "default": dict(),
    "gptq-start-40x4": dict(init="gptq", iters=40),
    "autoround-schedule": dict(init="rtn", iters=200, batch=8, lr=0.005),
    "gptq-start-autoround-schedule": dict(init="gptq", iters=200, batch=8, lr=0.005),
    "200x4": dict(iters=200),
    "300x4": dict(iters=300),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--dry", action="store_true", help="print, append no rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from calib.data import load_calibration
    from ptq.model_io import StreamingModel, tokenizer_for
    from ptq.models import smollm2
    from ptq.passes.learned_rounding import LearnedRoundingPass
    from ptq.pipeline import LayerContext, capture_inputs, for_layer, run_layer
    from ptq.quant.primitives import QuantSpec

    src = smollm2.ensure_cache()
    sm = StreamingModel.open(str(src))
    ids = load_calibration(str(DATA / "janeausten"), tokenizer_for(src), args.nsamples, 512, 0)
    batches = capture_inputs(sm, ids, batch_size=1)
    for i in range(args.layer):
        batches = run_layer(sm.load_layer(i), for_layer(batches, i))
    batches = for_layer(batches, args.layer)
    spec = QuantSpec(args.bits, args.group_size, False)
    for name in args.configs.split(","):
        opts = LearnedRoundingPass.Options(**CONFIGS[name])
        layer = sm.load_layer(args.layer)
        ctx = LayerContext(args.layer, layer, sm.layer_prefix(args.layer), sm.lmap, sm.config, batches, spec)
        t = time.process_time()
        LearnedRoundingPass(opts, spec).apply(ctx)
        cpu = time.process_time() - t
        st = ctx.stats
        row = dict(layer=args.layer, bits=args.bits, group_size=args.group_size, nsamples=args.nsamples,
                   config=name, init=opts.init, iters=opts.iters, batch=opts.batch, lr=opts.lr,
                   learn_clip=opts.learn_clip, loss_init=st["lr_loss_init"],
                   loss_final=min(st["lr_loss_init"], st["lr_loss_final"]), cpu_s=round(cpu, 1))
        print(f"{name:32s} init {opts.init:4s} loss {row['loss_init']:.5f} -> {row['loss_final']:.5f} "
              f"({cpu:.0f} CPU s)", flush=True)
        if not args.dry:
            append("lr_layer_probe", row)


if __name__ == "__main__":
    main()
