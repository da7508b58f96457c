"""The one explicit registry of passes: recipe name -> "module:Class" (imported on first use, so a pass with
heavy imports costs nothing until a recipe names it)."""
from __future__ import annotations

import importlib

PASSES: dict[str, str] = {
    "rtn": "ptq.passes.rtn:RTNPass",
    "gptq": "ptq.passes.gptq:GPTQPass",
    "learned-rounding": "ptq.passes.learned_rounding:LearnedRoundingPass",
    "smoothquant": "ptq.passes.smoothquant:SmoothQuantPass",
    "os+": "ptq.passes.osplus:OSPlusPass",
    "act-quant": "ptq.passes.act_quant:ActQuantPass",
    "nupes": "ptq.passes.nupes:NUPESPass",
    "nupes-df": "ptq.passes.nupes:NUPESDataFreePass",
    "udfc": "ptq.passes.udfc:UDFCPass",
    "cskv": "ptq.passes.cskv:CSKVPass",
    "double-sparsity": "ptq.passes.double_sparsity:DoubleSparsityPass",
}


def get_pass_class(name: str):
    if name not in PASSES:
        raise KeyError(f"unknown pass {name!r}; known: {', '.join(PASSES)}")
    mod, cls = PASSES[name].split(":")
    return getattr(importlib.import_module(mod), cls)
