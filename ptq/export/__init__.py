"""Export formats: writer classes (streaming, layer by layer) and readers that turn a written checkpoint back
into dense weights (`WeightSource`) for evaluation, `ptq export` and ONNX.

FORMATS: ``--format`` name -> "module:WriterClass".  READERS: config.json ``quantization_config.quant_method``
-> "module:ReaderClass" (a `ptq.model_io.WeightSource` that dequantizes on the fly).
"""
from __future__ import annotations

import importlib

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


def reader_class(quant_method: str):
    if quant_method not in READERS:
        raise ValueError(f"cannot read checkpoints quantized with {quant_method!r}; known: {', '.join(READERS)}")
    return _load(READERS[quant_method])
