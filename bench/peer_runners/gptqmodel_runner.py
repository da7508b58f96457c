"""GPTQModel (GPTQ, its own defaults except bits / group size / grid) on ptq's calibration ids; saves the
dequantized fp32 checkpoint for `ptq eval`. Run by GPTQModel's own interpreter:

    PEER_PY bench/peer_runners/gptqmodel_runner.py --model DIR --ids IDS.json --bits 3 --group-size 64 --out OUT

The quantized model is saved in GPTQ format, dequantized by GPTQModel's own ``dequantize_model``, checked
(<= 2^bits levels per group) and saved.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from _common import check_levels, load_ids, parser, save_fp

# its model loader asks for 2 CPU workers, more than the default pool gives on a 2-core machine
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def main():
    args = parser(__doc__).parse_args()
    torch.set_num_threads(args.threads)
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.utils.model_dequant import dequantize_model
    from safetensors.torch import load_file

    ids = load_ids(args.ids)
    n, seqlen = ids.shape
    calib = [{"input_ids": ids[i].tolist(), "attention_mask": [1] * seqlen} for i in range(n)]
    cfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=args.sym)
    t = time.process_time()
    model = GPTQModel.load(args.model, cfg, device="cpu")
    model.quantize(calib, batch_size=1)
    cpu = time.process_time() - t
    with tempfile.TemporaryDirectory() as tmp:
        packed, deq = Path(tmp) / "packed", Path(tmp) / "deq"
        model.save(str(packed))
        dequantize_model(packed, deq, target_dtype=torch.float32)
        sd = {}
        for f in sorted(deq.glob("*.safetensors")):
            sd.update(load_file(str(f)))
    weights = {k[:-len(".weight")]: v for k, v in sd.items() if ".layers." in k and k.endswith("proj.weight")}
    check_levels(weights, args.bits, args.group_size)
    save_fp(args.model, weights, args.out, {"tool": "gptqmodel", "version": gptqmodel.__version__,
                                            "bits": args.bits, "group_size": args.group_size, "sym": args.sym,
                                            "desc_act": getattr(cfg, "desc_act", None),
                                            "damp_percent": getattr(cfg, "damp_percent", None),
                                            "nsamples": n, "seqlen": seqlen, "quantize_cpu_s": round(cpu, 1)})
    print(f"GPTQModel {gptqmodel.__version__}: {len(weights)} linears, {cpu:.0f} CPU s")


if __name__ == "__main__":
    main()
