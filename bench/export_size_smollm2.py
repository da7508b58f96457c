"""Export sizes of SmolLM2-135M at W4 g64 against its fp32 folder, with the arithmetic floor, and the
"an fp16 source never comes out larger" check.

    python bench/export_size_smollm2.py [--recipe rtn] [--nsamples 8] [--onnx-embed-bits 8,4]

One run, one row per artifact in bench/results/export_size.jsonl (RTN: the size does not depend on calibration):

* ``gptq`` W4 g64 asymmetric from the fp32 folder, unquantized tensors as stored (fp32) and with
  ``--store-dtype float16``; each row splits the bytes into the parts of the GPTQ format (int4 codes ``qweight``,
  fp16 ``scales``, packed ``qzeros``, int32 ``g_idx``), the embedding, other tensors and non-tensor files
  (tokenizer, config, manifest);
* ONNX (MatMulNBits) exported from the fp16-embedding checkpoint with the embedding quantized to each of
  ``--onnx-embed-bits`` (GatherBlockQuantized, the one runtime here that reads quantized embeddings), with the
  validation numbers of the default accuracy level 4 and of level 0 against the PyTorch fake-quant model;
* an fp16 copy of the source folder (safetensors cast to fp16, tokenizer and config as they are) compressed to
  ``gptq`` and ``compressed-tensors`` with the default ``--store-dtype auto``: each row has
  ``ratio_vs_source`` (must be < 1).

The floor row is arithmetic, not a measurement: 4-bit codes of every decoder linear weight plus the fp16 embedding
(tied lm_head: one table), then + the g64 fp16 scales and 4-bit zero points, then + the tokenizer files that every
export copies.
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

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja", "tokenizer.model")


def breakdown(folder: Path) -> dict:
    """Bytes of ``folder`` by part: GPTQ tensors by suffix, embedding, other tensors, non-tensor files."""
    from safetensors import safe_open

    parts: dict[str, int] = {}
    tensor_files = sorted(folder.glob("*.safetensors"))
    for f in tensor_files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                t = st.get_slice(k)
                n = 1
                for d in t.get_shape():
                    n *= d
                nbytes = n * {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I8": 1, "U8": 1, "I64": 8}[t.get_dtype()]
                suffix = k.rsplit(".", 1)[-1]
                part = ("embedding" if "embed_tokens" in k or k.startswith("lm_head") else
                        suffix if suffix in ("qweight", "scales", "qzeros", "g_idx") else "other tensors")
                parts[part] = parts.get(part, 0) + nbytes
    header = sum(f.stat().st_size for f in tensor_files) - sum(parts.values())
    parts["safetensors headers"] = header
    parts["tokenizer files"] = sum((folder / n).stat().st_size for n in TOKENIZER_FILES if (folder / n).exists())
    from ptq.model_io import dir_size

    parts["other files"] = dir_size(folder) - sum(parts.values())
    return parts


def floor_bytes(src: Path) -> dict:
    """Arithmetic lower bounds (module doc) from the source's tensor shapes."""
    from safetensors import safe_open

    lin, emb = 0, 0
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                if len(shape) != 2:
                    continue
                if "embed_tokens" in k or k.startswith("lm_head"):
                    emb += shape[0] * shape[1]
                elif ".layers." in k:
                    lin += shape[0] * shape[1]
    groups = lin // 64
    tok = sum((src / n).stat().st_size for n in TOKENIZER_FILES if (src / n).exists())
    codes, table = lin // 2, emb * 2
    return {"linear_weights": lin, "embedding_weights": emb, "int4_codes_bytes": codes, "fp16_embedding_bytes": table,
            "floor_codes_plus_embedding": codes + table,
            "floor_plus_g64_scales_zeros": codes + table + groups * 2 + groups // 2,
            "floor_plus_tokenizer": codes + table + groups * 2 + groups // 2 + tok}


def fp16_copy(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            sd = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(f)).items()}
            save_file(sd, str(dst / f.name), metadata={"format": "pt"})
        elif f.name == "config.json":
            cfg = json.loads(f.read_text())
            cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] = "float16"
            (dst / f.name).write_text(json.dumps(cfg, indent=2))
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="rtn", choices=["rtn", "gptq"])
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--onnx-embed-bits", default="8,4", help="comma list of embedding bits for the ONNX exports "
                    "(empty: none)")
    a = ap.parse_args()
    from bench.results_log import append
    from cli.export_cmd import export_onnx_dir
    from ptq.compress import CompressOptions, compress
    from ptq.model_io import dir_size
    from ptq.models import smollm2

    src = smollm2.ensure_cache()
    base = dir_size(src)
    fl = floor_bytes(src)
    row = {"model": "smollm2-135m", "artifact": "arithmetic floor, W4 g64 + fp16 embedding", **fl,
           "fp32_folder_bytes": base, **{f"ratio_{k}": round(v / base, 4) for k, v in fl.items() if k.startswith("floor")}}
    print(json.dumps(row))
    append("export_size", row)
    root = Path(tempfile.mkdtemp(prefix="ptq-size-bench-"))

    def run(model: Path, out: Path, fmt: str, store: str = "auto") -> int:
        compress(CompressOptions(model=str(model), out=str(out), recipe=a.recipe, format=fmt, bits=4,
                                 group_size=64, nsamples=a.nsamples, seqlen=512, store_dtype=store))
        return dir_size(out)

    try:
        ckpts = {}
        for store in ("auto", "float16"):
            out = root / f"w4g64-{store}"
            size = run(src, out, "gptq", store)
            ckpts[store] = out
            row = {"model": "smollm2-135m", "artifact": f"gptq W4 g64 asym, {a.recipe}", "store_dtype": store,
                   "embeddings": "fp32" if store == "auto" else "fp16", "bytes": size, "fp32_folder_bytes": base,
                   "ratio_vs_fp32": round(size / base, 4), "parts": breakdown(out)}
            print(json.dumps(row))
            append("export_size", row)
        for eb in (int(b) for b in a.onnx_embed_bits.split(",") if b):
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
        half = fp16_copy(src, root / "smollm2-fp16")
        half_size = dir_size(half)
        for fmt in ("gptq", "compressed-tensors"):
            size = run(half, root / f"fp16src-{fmt}", fmt)
            row = {"model": "smollm2-135m (fp16 copy)", "artifact": f"{fmt} W4 g64 asym, {a.recipe}",
                   "store_dtype": "auto", "embeddings": "fp16", "bytes": size, "source_bytes": half_size,
                   "ratio_vs_source": round(size / half_size, 4), "fp32_folder_bytes": base,
                   "ratio_vs_fp32": round(size / base, 4), "not_larger_than_source": size < half_size}
            print(json.dumps(row))
            append("export_size", row)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
