"""Activation fake-quantization of the decoder linears' inputs, kept as part of the exported model's semantics.

Every quantized linear gets an `ActQuantizer` forward-pre-hook computing its real input

    x_in = Q_a(x - shift)            x [..., K], shift [K] (optional, OS+ on RMSNorm), Q_a = fake quant

with ``Q_a`` asymmetric (or symmetric) ``bits``-bit min/max, either **per token** (dynamic range of each row) or
**per tensor static** (range ``clip = (lo, hi)`` calibrated here as the average over calibration samples of each
sample's min/max: the "AvgMinMax" observer of OS+).

The settings are exported twice: ``config.json`` key ``ptq_act_quant`` and ``act_quant.json``:

    {"bits": 8, "granularity": "token"|"tensor", "sym": false,
     "linears": {"model.layers.0.self_attn.q_proj": {"clip": [lo, hi] | null, "shift": "<tensor key>" | null}}}

Shift vectors are stored as extra tensors ``<linear>.input_shift`` in the layer shards. `install_act_quant`
re-installs the hooks on a loaded model (`load_act_quant` from a folder, `install_streaming` on a
`StreamingModel` skeleton so layer-streamed evaluation also sees them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ptq.pipeline import LayerContext, Pass
from ptq.quant.primitives import fake_quantize_activation

SPEC_KEY = "ptq_act_quant"


class ActQuantizer:
    """Forward-pre-hook state of one linear (``lin._ptq_act``)."""

    def __init__(self, bits: int | None = None, granularity: str = "token", sym: bool = False,
                 clip: tuple[float, float] | None = None, shift: torch.Tensor | None = None):
        self.bits, self.granularity, self.sym, self.clip, self.shift = bits, granularity, sym, clip, shift
        self.handle = None

    def __call__(self, _m, args):
        x = args[0]
        if self.shift is not None:
            x = x - self.shift.to(x.dtype)
        if self.bits is not None:
            x = fake_quantize_activation(x, self.bits, self.granularity, self.sym,
                                         self.clip if self.granularity == "tensor" else None)
        return (x, *args[1:])


def quantizer_of(lin: nn.Module, create: bool = True) -> ActQuantizer | None:
    q = getattr(lin, "_ptq_act", None)
    if q is None and create:
        q = ActQuantizer()
        q.handle = lin.register_forward_pre_hook(q)
        lin._ptq_act = q
    return q


def remove_act_quant(model: nn.Module) -> None:
    for m in model.modules():
        q = getattr(m, "_ptq_act", None)
        if q is not None:
            q.handle.remove()
            del m._ptq_act


def spec_from_model(model: nn.Module) -> dict | None:
    """The JSON spec of every installed quantizer (None when none is installed)."""
    out = {"bits": None, "granularity": "token", "sym": False, "linears": {}}
    for name, m in model.named_modules():
        q = getattr(m, "_ptq_act", None)
        if q is None:
            continue
        if q.bits is not None:
            out.update(bits=q.bits, granularity=q.granularity, sym=q.sym)
        out["linears"][name] = {"clip": None if q.clip is None else [float(q.clip[0]), float(q.clip[1])],
                                "shift": f"{name}.input_shift" if q.shift is not None else None,
                                "quant": q.bits is not None}
    return out if out["linears"] else None


def install_act_quant(model: nn.Module, spec: dict | str, tensors=None) -> int:
    """Install the hooks described by ``spec`` (dict or JSON text) on ``model``; ``tensors[key]`` gives shift
    vectors (any mapping with ``__getitem__``, e.g. a safetensors source). Returns the number of linears."""
    if isinstance(spec, str):
        spec = json.loads(spec)
    remove_act_quant(model)
    for name, ent in spec["linears"].items():
        lin = model.get_submodule(name)
        q = quantizer_of(lin)
        if ent.get("quant", True):
            q.bits, q.granularity, q.sym = spec["bits"], spec["granularity"], spec["sym"]
            q.clip = tuple(ent["clip"]) if ent.get("clip") is not None else None
        if ent.get("shift"):
            if tensors is None:
                raise ValueError(f"{name}: the spec has an input shift but no tensors were given")
            q.shift = tensors[ent["shift"]].float()
    return len(spec["linears"])


def load_act_quant(model: nn.Module, folder: str | Path) -> dict | None:
    """Install the activation quantizers recorded in ``folder/config.json`` (no-op when there are none)."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    spec = cfg.get(SPEC_KEY)
    if not spec:
        return None
    from ptq.model_io import SafetensorsSource

    src = SafetensorsSource(Path(folder))
    install_act_quant(model, spec, _Getter(src))
    return spec


class _Getter:
    def __init__(self, src):
        self.src = src

    def __getitem__(self, k):
        return self.src.get(k)


def install_streaming(sm) -> dict | None:
    """Install the quantizers of ``sm.config`` on a `StreamingModel` skeleton (hooks survive layer loading)."""
    spec = getattr(sm.config, SPEC_KEY, None)
    if not spec:
        return None
    install_act_quant(sm.model, spec, _Getter(sm.source))
    return spec


def export_spec(sm) -> dict:
    """Record the installed quantizers in ``sm.config`` (-> config.json) and return the act_quant.json files."""
    spec = spec_from_model(sm.model)
    if spec is None:
        return {}
    setattr(sm.config, SPEC_KEY, spec)
    return {"act_quant.json": spec}


class ActStateMixin:
    """Resume support (ptq.resume) for passes that install quantizers: the spec of the layers done so far and
    their shift vectors are saved after each layer and re-installed on the skeleton when a run resumes."""

    def setup(self, sm) -> None:
        self._sm = sm

    def resume_state(self) -> dict:
        spec = spec_from_model(self._sm.model)
        if spec is None:
            return {}
        st: dict = {"act_spec": spec}
        for name, ent in spec["linears"].items():
            if ent["shift"]:
                st["shift:" + ent["shift"]] = quantizer_of(self._sm.model.get_submodule(name)).shift
        return st

    def load_resume_state(self, st: dict) -> None:
        if st.get("act_spec"):
            tensors = {k[len("shift:"):]: v for k, v in st.items() if k.startswith("shift:")}
            install_act_quant(self._sm.model, st["act_spec"], tensors)


class ActQuantPass(ActStateMixin, Pass):
    """Install activation fake-quant on the layer's linears (bits/granularity from the recipe defaults
    ``act_bits`` / ``act_granularity``); static per-tensor clips are calibrated sub-block by sub-block, each on
    inputs produced with the earlier sub-blocks' quantizers already on."""

    name = "act-quant"
    needs_calibration = True
    quantizes_weights = False

    @dataclass
    class Options:
        sym: bool = False
        observer: str = "avgminmax"  # avgminmax | minmax (static per-tensor clips)
        skip: list = field(default_factory=list)  # linear names inside a layer left in full precision

    @torch.no_grad()
    def apply(self, ctx: LayerContext) -> None:
        d = getattr(self, "defaults", None)
        bits = getattr(d, "act_bits", None)
        gran = getattr(d, "act_granularity", "token")
        if bits is None:
            return
        if gran not in ("token", "tensor"):
            raise ValueError(f"act_granularity must be token or tensor, got {gran!r}")
        if self.opts.observer not in ("avgminmax", "minmax"):
            raise ValueError(f"observer must be avgminmax or minmax, got {self.opts.observer!r}")
        present = set(ctx.linears())
        for g in ctx.lmap.groups:
            names = [n for n in g.linears if n in present and n not in self.opts.skip]
            if not names:
                continue
            clip = None
            if gran == "tensor":
                if not ctx.batches:
                    raise ValueError("per-tensor static activation quantization needs calibration data")
                lo, hi = [], []
                ctx.collect_inputs(names[:1], lambda _n, x: (lo.append(float(x.min())), hi.append(float(x.max()))))
                if self.opts.observer == "minmax":
                    clip = (min(lo), max(hi))
                else:
                    clip = (sum(lo) / len(lo), sum(hi) / len(hi))
                ctx.stats[f"{g.name}.act_clip"] = list(clip)
            for n in names:
                q = quantizer_of(ctx.module(n))
                q.bits, q.granularity, q.sym, q.clip = bits, gran, self.opts.sym, clip

    def finalize(self, sm) -> dict:
        return export_spec(sm)
