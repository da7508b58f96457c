"""Streaming checkpoint writers: each finished decoder layer becomes one safetensors shard the moment it is done
(so a 7B model never sits in memory), then `finalize` writes the index, config.json (with the format's
``quantization_config``) and the tokenizer files.

Subclasses only decide how a `QuantizedWeight` becomes tensors (`linear_tensors`) and what
``quantization_config`` says; they never re-quantize. `DenseWriter` ("fp") writes the dequantized weights
(fake-quant model), loadable by anything that reads a plain transformers checkpoint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ptq.model_io import StreamingModel
from ptq.quant.qweight import QuantizedWeight

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def checkpoint_dtype(sm: StreamingModel) -> torch.dtype:
    """The dtype the source checkpoint stores its floating tensors in: the most common one in the safetensors
    headers, else config.json's ``dtype`` / ``torch_dtype`` as written on disk, else float32. (The in-memory
    config cannot be asked: building the compute skeleton overwrites its dtype with the compute dtype.)"""
    src = sm.source
    stored = getattr(src, "stored_dtype", None)
    if stored is not None:
        counts: dict[torch.dtype, int] = {}
        for k in src.keys():
            d = stored(k)
            if d is not None:
                counts[d] = counts.get(d, 0) + 1
        if counts:
            return max(counts, key=counts.get)
    if sm.folder is not None and (Path(sm.folder) / "config.json").exists():
        try:
            raw = json.loads((Path(sm.folder) / "config.json").read_text())
            d = STORE_DTYPES.get(str(raw.get("dtype") or raw.get("torch_dtype")))
            if d is not None:
                return d
        except (OSError, json.JSONDecodeError):
            pass
    return torch.float32


class CheckpointWriter:
    format_name = "fp"

    def __init__(self, out_dir: Path, sm: StreamingModel, spec=None, meta: dict | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.sm, self.spec, self.meta = sm, spec, meta or {}
        # unquantized tensors keep the checkpoint's dtype (per tensor) unless meta["store_dtype"] overrides it;
        # the compute dtype (--dtype) never leaks into the files
        override = self.meta.get("store_dtype")
        self.store_override = STORE_DTYPES[override] if override not in (None, "auto") else None
        self.dtype = self.store_override or checkpoint_dtype(sm)
        self.weight_map: dict[str, str] = {}
        self.qweights_written: list[str] = []

    def tensor_dtype(self, name: str) -> torch.dtype:
        """Storage dtype of the unquantized floating tensor ``name``: the override, else the dtype the source
        stored it in, else the checkpoint dtype (tensors a pass created)."""
        if self.store_override is not None:
            return self.store_override
        stored = getattr(self.sm.source, "stored_dtype", None)
        d = stored(name) if stored is not None else None
        return d or self.dtype

    def cast(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.tensor_dtype(name)) if t.is_floating_point() else t

    # -- to override -------------------------------------------------------------------------------
    def linear_tensors(self, path: str, qw: QuantizedWeight, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Tensors for one quantized Linear at module ``path`` (no trailing dot)."""
        out = {f"{path}.weight": qw.dequantize().to(self.tensor_dtype(f"{path}.weight"))}
        if bias is not None:
            out[f"{path}.bias"] = self.cast(f"{path}.bias", bias)
        return out

    def quantization_config(self) -> dict | None:
        return None

    # -- streaming ---------------------------------------------------------------------------------
    def write_shard(self, shard: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(self.out / shard), metadata={"format": "pt"})
        for k in tensors:
            self.weight_map[k] = shard

    def layer_tensors(self, ctx) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        qpaths = {p for p in ctx.qweights if p.startswith(ctx.prefix)}
        for name, p in ctx.layer.named_parameters():
            full = ctx.prefix + name
            mod = full.rsplit(".", 1)[0]
            if mod in qpaths:
                continue
            tensors[full] = self.cast(full, p.data)
        for mod in sorted(qpaths):
            local = mod[len(ctx.prefix):]
            bias = getattr(ctx.module(local), "bias", None)
            tensors.update(self.linear_tensors(mod, ctx.qweights[mod], None if bias is None else bias.data))
            self.qweights_written.append(mod)
        tensors.update(ctx.extra)
        return tensors

    def write_layer(self, ctx) -> None:
        self.write_shard(f"layer-{ctx.index:05d}.safetensors", self.layer_tensors(ctx))

    def write_nonlayer(self) -> None:
        """Embeddings, final norm and (untied) lm_head, unquantized, in the checkpoint dtype."""
        sm = self.sm
        self.write_shard("nonlayer.safetensors", {k: self.cast(k, sm.source.get(k)) for k in sm.nonlayer_keys()})

    def finalize(self, extra_files: dict | None = None) -> None:
        cfg = self.sm.config
        qc = self.quantization_config()
        if qc is not None:
            cfg.quantization_config = qc
        elif hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.dtype = self.dtype
        if not getattr(cfg, "architectures", None):  # runtimes (ORT-GenAI builder, vLLM) dispatch on it
            cfg.architectures = [type(self.sm.model).__name__]
        cfg.save_pretrained(self.out)
        (self.out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"format": self.format_name}, "weight_map": dict(sorted(self.weight_map.items()))},
            indent=2))
        src = self.sm.folder
        if src is not None:
            from ptq.validate import side_file

            for f in TOKENIZER_FILES:
                p = side_file(Path(src), f)  # never through a link that leaves the model folder
                if p is not None:
                    shutil.copyfile(p, self.out / f)
        for name, content in (extra_files or {}).items():
            path = self.out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, (bytes, bytearray)):
                path.write_bytes(content)
            elif isinstance(content, str):
                path.write_text(content)
            else:
                path.write_text(json.dumps(content, indent=2))


class DenseWriter(CheckpointWriter):
    """Dequantized (fake-quant) weights in the checkpoint dtype."""

    format_name = "fp"


class QuantizedSource:
    """Dense `WeightSource` view of a quantized checkpoint: ``<path>.weight`` is dequantized on demand (fp32);
    `qweight(path)` returns the exact stored `QuantizedWeight`. Subclasses name their per-linear tensor parts
    (``PARTS``; the first one marks a quantized linear) and implement `_unpack(parts) -> QuantizedWeight`."""

    PARTS: tuple[str, ...] = ()

    def _index(self, source) -> None:
        self.src = source
        keys = source.keys()
        marker = "." + self.PARTS[0]
        self.qpaths = {k[: -len(marker)] for k in keys if k.endswith(marker)}
        hidden = {f"{p}.{part}" for p in self.qpaths for part in self.PARTS}
        self._keys = [k for k in keys if k not in hidden] + [f"{p}.weight" for p in sorted(self.qpaths)]
        self._keyset = set(self._keys)
        self._all = set(keys)

    def keys(self):
        return list(self._keys)

    def __contains__(self, name):
        return name in self._keyset

    def _unpack(self, parts: dict[str, torch.Tensor]) -> QuantizedWeight:
        raise NotImplementedError

    def _unpack_module(self, module_path: str, parts: dict[str, torch.Tensor]) -> QuantizedWeight:
        """`_unpack` for module ``module_path`` (formats whose scheme varies per module override this)."""
        return self._unpack(parts)

    def qweight(self, module_path: str) -> QuantizedWeight | None:
        if module_path not in self.qpaths:
            return None
        parts = {part: self.src.get(f"{module_path}.{part}") for part in self.PARTS
                 if f"{module_path}.{part}" in self._all}
        return self._unpack_module(module_path, parts)

    def get(self, name):
        if name.endswith(".weight") and name[: -len(".weight")] in self.qpaths:
            return self.qweight(name[: -len(".weight")]).dequantize()
        return self.src.get(name)
