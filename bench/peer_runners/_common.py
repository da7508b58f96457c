"""Shared by the peer runners (run by each peer's own interpreter, so only torch / transformers / safetensors are
imported, never ptq): read the calibration ids ptq wrote, and hand back a plain fp32 checkpoint that `ptq eval`
reads, checking that every quantized weight group really holds at most ``2^bits`` levels.

Ids file (written by bench/peers.py): JSON ``{"ids": [[int] * seqlen] * nsamples, "sha256": ...}``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--model", required=True, help="fp checkpoint folder (config.json + safetensors)")
    ap.add_argument("--ids", required=True, help="calibration ids JSON written by bench/peers.py")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--sym", action="store_true", help="symmetric grid (default: asymmetric, as ptq's recipes)")
    ap.add_argument("--out", required=True, help="folder for the dequantized fp32 checkpoint")
    ap.add_argument("--threads", type=int, default=1)
    return ap


def load_ids(path: str) -> torch.Tensor:
    """``[nsamples, seqlen]`` int64 ids; the sha256 in the file must match (same bytes as ptq hashes)."""
    rec = json.loads(Path(path).read_text())
    ids = torch.tensor(rec["ids"], dtype=torch.int64)
    sha = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    if rec.get("sha256") and sha != rec["sha256"]:
        raise SystemExit(f"calibration ids hash {sha} != {rec['sha256']}")
    return ids


def linear_names(model) -> list[str]:
    """Decoder-layer linears (what every tool quantizes; lm_head and embeddings stay fp)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def check_levels(weights: dict[str, torch.Tensor], bits: int, group_size: int) -> int:
    """Raise unless every group of ``group_size`` weights along K in each ``W [N, K]`` holds <= 2^bits distinct
    values (what a real quantized weight must satisfy); returns the number of weights checked."""
    for name, w in weights.items():
        n, k = w.shape
        g = k if group_size <= 0 else group_size
        for start in range(0, k, g):  # a last group shorter than g when g does not divide K (576 = 4 x 128 + 64)
            srt = w[:, start:start + g].float().sort(-1).values
            levels = 1 + (srt[..., 1:] != srt[..., :-1]).sum(-1)
            if int(levels.max()) > 2**bits:
                raise SystemExit(f"{name}: a group holds {int(levels.max())} distinct values > 2^{bits}: "
                                 "not quantized")
    return len(weights)


def save_fp(model_dir: str, weights: dict[str, torch.Tensor], out: str, info: dict) -> None:
    """Load the fp model from ``model_dir``, replace the named linears' weights ``{module name: W [N, K]}``,
    save fp32 safetensors + config (no quantization_config) + tokenizer to ``out``, and ``peer_info.json``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    mods = dict(model.named_modules())
    missing = sorted(set(linear_names(model)) - set(weights))
    if missing:
        raise SystemExit(f"the peer left {len(missing)} linears unquantized, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, w in weights.items():
            lin = mods[name]
            if tuple(w.shape) != tuple(lin.weight.shape):
                raise SystemExit(f"{name}: dequantized shape {tuple(w.shape)} != {tuple(lin.weight.shape)}")
            lin.weight.copy_(w.float())
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(outp, safe_serialization=True)
    for f in TOKENIZER_FILES:
        if (Path(model_dir) / f).exists():
            shutil.copy(Path(model_dir) / f, outp / f)
    (outp / "peer_info.json").write_text(json.dumps(info, indent=1))
