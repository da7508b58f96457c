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


def storage_dtype(config) -> torch.dtype:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.float32


class CheckpointWriter:
    format_name = "fp"

    def __init__(self, out_dir: Path, sm: StreamingModel, spec=None, meta: dict | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.sm, self.spec, self.meta = sm, spec, meta or {}
        self.dtype = storage_dtype(sm.config)
        self.weight_map: dict[str, str] = {}
        self.qweights_written: list[str] = []

    # -- to override -------------------------------------------------------------------------------
    def linear_tensors(self, path: str, qw: QuantizedWeight, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Tensors for one quantized Linear at module ``path`` (no trailing dot)."""
        out = {f"{path}.weight": qw.dequantize().to(self.dtype)}
        if bias is not None:
            out[f"{path}.bias"] = bias.to(self.dtype)
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
            tensors[full] = p.data.to(self.dtype) if p.is_floating_point() else p.data
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
        keys = [k for k in sm.nonlayer_keys()]
        self.write_shard("nonlayer.safetensors", {k: sm.source.get(k).to(self.dtype) if sm.source.get(k).is_floating_point()
                                                  else sm.source.get(k) for k in keys})

    def finalize(self, extra_files: dict | None = None) -> None:
        cfg = self.sm.config
        qc = self.quantization_config()
        if qc is not None:
            cfg.quantization_config = qc
        elif hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.dtype = self.dtype
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

    def qweight(self, module_path: str) -> QuantizedWeight | None:
        if module_path not in self.qpaths:
            return None
        return self._unpack({part: self.src.get(f"{module_path}.{part}") for part in self.PARTS
                             if f"{module_path}.{part}" in self._all})

    def get(self, name):
        if name.endswith(".weight") and name[: -len(".weight")] in self.qpaths:
            return self.qweight(name[: -len(".weight")]).dequantize()
        return self.src.get(name)
