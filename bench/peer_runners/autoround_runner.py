"""auto-round (Intel, SignRound: signed-gradient rounding offsets and min/max tuning per decoder block) on ptq's
calibration ids; saves the dequantized fp32 checkpoint for `ptq eval`. Run by auto-round's own interpreter:

    PEER_PY bench/peer_runners/autoround_runner.py --model DIR --ids IDS.json --bits 3 --group-size 64 --out OUT
        [--iters N]   (default: auto-round's own default iterations, 200)

After ``quantize()`` auto-round leaves each quantized linear's weight as its quantize-dequantize value, which is
read back, checked (<= 2^bits levels per group) and saved.
"""
from __future__ import annotations

import time

import torch

from _common import check_levels, linear_names, load_ids, parser, save_fp


def main():
    ap = parser(__doc__)
    ap.add_argument("--iters", type=int, default=None, help="default: auto-round's own (200)")
    ap.add_argument("--batch-size", type=int, default=8, help="auto-round's default: 8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import auto_round
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_ids(args.ids)
    n, seqlen = ids.shape
    data = [{"input_ids": ids[i:i + 1], "attention_mask": torch.ones_like(ids[i:i + 1])} for i in range(n)]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    kw = {} if args.iters is None else {"iters": args.iters}
    t = time.process_time()
    ar = AutoRound(model, tok, bits=args.bits, group_size=args.group_size, sym=args.sym, dataset=data,
                   nsamples=n, seqlen=seqlen, batch_size=min(args.batch_size, n), device_map="cpu",
                   enable_torch_compile=False, **kw)
    qmodel, _ = ar.quantize()
    cpu = time.process_time() - t
    mods = dict(qmodel.named_modules())
    weights = {name: mods[name].weight.detach().clone() for name in linear_names(qmodel)}
    check_levels(weights, args.bits, args.group_size)
    iters = getattr(getattr(ar, "quantize_config", None), "iters", None) or getattr(ar, "iters", None)
    save_fp(args.model, weights, args.out, {"tool": "auto-round", "version": auto_round.__version__,
                                            "iters": iters, "batch_size": min(args.batch_size, n),
                                            "bits": args.bits, "group_size": args.group_size, "sym": args.sym,
                                            "nsamples": n, "seqlen": seqlen, "quantize_cpu_s": round(cpu, 1)})
    print(f"auto-round {auto_round.__version__}: {len(weights)} linears, iters {iters}, {cpu:.0f} CPU s")


if __name__ == "__main__":
    main()
