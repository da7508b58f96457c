"""Does subsampling the OS+ search change the chosen scales? On chosen SmolLM2 layers, each OS+ group's scale is
searched twice on the same captured inputs: the dense reference (every grid point, loss on every token and output
feature) and the recipe's fast search (loss on ``loss_tokens`` tokens incl. the outliers x ``loss_rows`` features,
coarse-to-fine grid). Both choices are then scored with the full-data loss; the row reports the ratio
fast / dense (1.0 = as good) and the number of loss evaluations of each.

The model is left unchanged (fp inputs flow to the next layer), so every layer sees the fp model's activations.

    python bench/osplus_search_check.py --layers 5,20 --samples 4 --loss-tokens 512 --bits 4

Rows: bench/results/osplus_search_check.jsonl (bench/results_log.append).
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
sys.path.insert(0, str(ROOT / "bench"))
DATA = Path(os.environ.get("PTQ_DATA", ROOT.parent / "shared" / "data"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="5,20")
    ap.add_argument("--samples", type=int, default=4, help="512-token calibration samples")
    ap.add_argument("--loss-tokens", type=int, default=512)
    ap.add_argument("--loss-rows", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--act-bits", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from results_log import append

    from calib.data import load_calibration
    from ptq.model_io import StreamingModel, tokenizer_for
    from ptq.models import smollm2
    from ptq.passes.migration import SubModule, make_act_quant
    from ptq.passes.osplus import LossProbe, OSPlusPass, search_scale
    from ptq.pipeline import Pass, compress_loop
    from ptq.quant.primitives import QuantSpec

    layers = {int(v) for v in args.layers.split(",")}
    wspec = QuantSpec(args.bits, -1, False)
    act_q = make_act_quant(args.act_bits, "token", False)
    act_q.granularity = "token"
    d = OSPlusPass.Options()

    class Probe(Pass):
        name = "osplus-search-check"
        needs_calibration = True
        quantizes_weights = False

        @torch.no_grad()
        def apply(self, ctx):
            if ctx.index > max(layers):
                raise _Done
            if ctx.index not in layers:
                return
            for g in [g for g in ctx.lmap.groups if g.prev_is_norm or g.name == "mlp_out"]:
                sub = SubModule(ctx, g, ctx.batches)
                xs = [x.float() for x in sub.xs]
                amax = torch.stack([x.reshape(-1, x.shape[-1]).abs().amax(0) for x in xs]).amax(0)
                full = LossProbe(sub, xs, wspec, act_q, 0, 0)
                t0 = time.time()
                s_d, t_d, i_d = search_scale(full, amax, 0.1, d.grid, d.max_steps, coarse=0)
                t_dense = time.time() - t0
                fast = LossProbe(sub, xs, wspec, act_q, args.loss_tokens, args.loss_rows, seed=ctx.index)
                t0 = time.time()
                s_f, t_f, i_f = search_scale(fast, amax, 0.1, d.grid, d.max_steps, d.coarse, d.patience)
                t_fast = time.time() - t0
                l_f = full.losses(torch.stack([s_f]), [None])[0]
                row = {"layer": ctx.index, "group": g.name, "w_bits": args.bits, "a_bits": args.act_bits,
                       "tokens": sum(x.shape[0] * x.shape[1] for x in xs), "loss_tokens": args.loss_tokens,
                       "loss_rows": args.loss_rows, "grid_steps": i_d["steps"], "t_dense": t_d, "t_fast": t_f,
                       "loss_noscale": i_d["loss_noscale"], "loss_dense": i_d["loss"], "loss_fast_on_full": l_f,
                       "ratio_fast_to_dense": l_f / i_d["loss"], "evals_dense": i_d["evals"],
                       "evals_fast": i_f["evals"], "search_s_dense": round(t_dense, 1),
                       "search_s_fast": round(t_fast, 1)}
                print(append("osplus_search_check", row), flush=True)

    model_dir = smollm2.ensure_cache()
    tok = tokenizer_for(model_dir)
    calib = load_calibration(DATA / "janeausten", tok, args.samples, 512, seed=0, bos=True)
    sm = StreamingModel.open(str(model_dir))
    try:
        compress_loop(sm, [Probe(None, wspec)], calib, wspec, None)
    except _Done:
        pass


class _Done(Exception):
    pass


if __name__ == "__main__":
    main()
