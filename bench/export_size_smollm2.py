"""Export sizes of SmolLM2-135M at W4 g64 against its fp32 folder, and what the default ONNX accuracy level does.

    python bench/export_size_smollm2.py [--recipe rtn] [--nsamples 8] [--onnx]

Compresses the fp32 SmolLM2 cache to the GPTQ format (W4 g64 asymmetric; the file size does not depend on the
calibration, so RTN is the default) twice: unquantized tensors as stored (fp32 embedding) and with
``--store-dtype float16``. With ``--onnx`` it also exports the fp16-embedding checkpoint to ONNX with the
embedding quantized to 8 bits (GatherBlockQuantized: the one runtime here that reads quantized embeddings; 4 with
``--onnx-embed-bits 8,4``), and records the validation numbers: accuracy_level 0 vs the default (4) against the PyTorch
fake-quant model (max |logit diff|, greedy tokens). One row per artifact in bench/results/export_size.jsonl.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="rtn", choices=["rtn", "gptq"])
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--onnx", action="store_true")
    ap.add_argument("--onnx-embed-bits", default="8", help="comma list of embedding bits for the ONNX exports")
    a = ap.parse_args()
    from bench.results_log import append
    from cli.export_cmd import export_onnx_dir
    from ptq.compress import CompressOptions, compress
    from ptq.model_io import dir_size
    from ptq.models import smollm2

    src = smollm2.ensure_cache()
    base = dir_size(src)
    root = Path(tempfile.mkdtemp(prefix="ptq-size-bench-"))
    try:
        ckpts = {}
        for store in ("auto", "float16"):
            out = root / f"w4g64-{store}"
            compress(CompressOptions(model=str(src), out=str(out), recipe=a.recipe, format="gptq", bits=4,
                                     group_size=64, nsamples=a.nsamples, seqlen=512, store_dtype=store))
            ckpts[store] = out
            size = dir_size(out)
            row = {"model": "smollm2-135m", "artifact": f"gptq W4 g64 asym, {a.recipe}", "store_dtype": store,
                   "embeddings": "fp32" if store == "auto" else "fp16", "bytes": size, "fp32_folder_bytes": base,
                   "ratio_vs_fp32": round(size / base, 4)}
            print(json.dumps(row))
            append("export_size", row)
        if a.onnx:
            for eb in (int(b) for b in a.onnx_embed_bits.split(",")):
                out = root / f"onnx-e{eb}"
                rep = export_onnx_dir(ckpts["float16"], out, embed_bits=eb)
                size = dir_size(out)
                v = rep.get("validation", {})
                row = {"model": "smollm2-135m", "artifact": f"onnx MatMulNBits W4 g64 asym, {a.recipe}",
                       "embeddings": f"int{eb} GatherBlockQuantized", "bytes": size, "fp32_folder_bytes": base,
                       "ratio_vs_fp32": round(size / base, 4),
                       **{k: v.get(k) for k in ("logit_abs_max", "max_abs_logit_diff_acc0",
                                                "max_abs_logit_diff_exported", "greedy_match_acc0",
                                                "greedy_prefix_match_acc0", "greedy_match_exported",
                                                "greedy_prefix_match_exported", "top1_agreement_exported",
                                                "n_new_tokens")}, "accuracy_level_exported": 4}
                print(json.dumps(row))
                append("export_size", row)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
