"""Export formats: writer classes (streaming, layer by layer) and readers that turn a written checkpoint back
into dense weights (`WeightSource`) for evaluation, `ptq export` and ONNX.

FORMATS: ``--format`` name -> "module:WriterClass".  READERS: config.json ``quantization_config.quant_method``
-> "module:ReaderClass" (a `ptq.model_io.WeightSource` that dequantizes on the fly), registered with
`ptq.model_io.register_reader` when this package is imported (ptq/__init__.py imports it), so the loader finds
them without importing the exporters. Modules load on first use.
"""
from __future__ import annotations

import functools
import importlib

from ptq.model_io import register_reader

FORMATS: dict[str, str] = {
    "fp": "ptq.export.base:DenseWriter",
    "gptq": "ptq.export.gptq_format:GPTQWriter",
    "compressed-tensors": "ptq.export.compressed_tensors:CTWriter",
    "nupes": "ptq.export.nupes_format:NUPESWriter",
}

READERS: dict[str, str] = {
    "gptq": "ptq.export.gptq_format:GPTQSource",
    "compressed-tensors": "ptq.export.compressed_tensors:CTSource",
    "nupes": "ptq.export.nupes_format:NUPESSource",
}


def _load(ref: str):
    mod, cls = ref.split(":")
    return getattr(importlib.import_module(mod), cls)


def writer_class(fmt: str):
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)} (or onnx via `ptq export`)")
    return _load(FORMATS[fmt])


for _method, _ref in READERS.items():
    register_reader(_method, functools.partial(_load, _ref))
