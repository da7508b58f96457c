"""The sequential layer loop: capture layer-0 inputs, then for each decoder layer load it, run the recipe's
passes on it, re-run the (now compressed) layer so the next layer calibrates on compressed outputs, hand it to
the exporter and free it. Peak memory is one layer + activations + embeddings, never the whole model.

Shapes: a `Batch` holds ``hidden [b, L, H]`` plus the keyword arguments the decoder layer was called with
(attention mask, position ids, rotary ``position_embeddings`` = (cos, sin) ``[b, L, d]``, cache positions).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ptq.layermap import LayerMap, get_module
from ptq.model_io import StreamingModel, release
from ptq.quant.primitives import QuantSpec
from ptq.quant.qweight import QuantizedWeight


class StageClock:
    """Wall and CPU seconds (this process, all threads) per named stage, summed over repeats; report.json's
    ``stages``. Use as ``with clock("write"): ...``."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c

    def to_dict(self) -> dict:
        return {k: {"wall_s": round(self.wall[k], 2), "cpu_s": round(self.cpu[k], 2)} for k in self.wall}


@dataclass
class Batch:
    hidden: torch.Tensor
    kwargs: dict


class _Caught(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, store: list):
        super().__init__()
        self.store = store

    def forward(self, hidden_states, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        self.store.append(Batch(hidden_states.detach(), kwargs))
        raise _Caught


@torch.no_grad()
def capture_inputs(sm: StreamingModel, input_ids: torch.Tensor, batch_size: int = 1) -> list[Batch]:
    """Run the pre-layer modules on ``input_ids [n, L]`` and return the first decoder layer's inputs."""
    layers = sm.layers
    first = layers[0]
    store: list[Batch] = []
    layers[0] = _Catcher(store)
    base = get_module(sm.model, sm.lmap.layers.rsplit(".", 1)[0])  # e.g. model.model / model.model.decoder
    try:
        for s in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[s:s + batch_size].to(sm.device)
            try:
                base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except _Caught:
                pass
    finally:
        layers[0] = first
    return store


def layer_forward(layer: nn.Module, b: Batch) -> torch.Tensor:
    out = layer(b.hidden, **b.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layer(layer: nn.Module, batches: list[Batch]) -> list[Batch]:
    return [Batch(layer_forward(layer, b), b.kwargs) for b in batches]


@dataclass
class LayerContext:
    """What a pass sees for one decoder layer."""

    index: int
    layer: nn.Module
    prefix: str  # "model.layers.3."
    lmap: LayerMap
    config: object
    batches: list[Batch]  # inputs of this layer (empty for data-free runs)
    spec: QuantSpec
    qweights: dict[str, QuantizedWeight] = field(default_factory=dict)  # full module path -> codes
    stats: dict = field(default_factory=dict)  # per-layer numbers for the report
    extra: dict = field(default_factory=dict)  # full tensor name -> fp tensor to export as-is

    def module(self, name: str) -> nn.Module:
        return get_module(self.layer, name)

    def linears(self) -> list[str]:
        """Linear modules of the map that exist (as nn.Linear) in this layer."""
        out = []
        for n in self.lmap.linears():
            try:
                m = self.module(n)
            except AttributeError:
                continue
            if isinstance(m, nn.Linear):
                out.append(n)
        return out

    @torch.no_grad()
    def collect_inputs(self, names: list[str], fn: Callable[[str, torch.Tensor], None]) -> None:
        """Run every batch through the layer, calling ``fn(name, x)`` with each named linear's input
        ``x [tokens, K]`` (fp32)."""
        hooks = []
        seen: set[str] = set()
        for n in names:
            def hook(_m, args, _n=n):
                fn(_n, args[0].reshape(-1, args[0].shape[-1]).float())
                seen.add(_n)
                if len(seen) == len(names):  # nothing later in the layer is needed
                    raise _Caught
            hooks.append(self.module(n).register_forward_pre_hook(hook))
        try:
            for b in self.batches:
                seen.clear()
                try:
                    layer_forward(self.layer, b)
                except _Caught:
                    pass
        finally:
            for h in hooks:
                h.remove()

    def outputs(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [layer_forward(self.layer, b) for b in self.batches]


class Pass:
    """A compression step applied layer by layer. Subclasses set ``name``, an ``Options`` dataclass
    (strict: unknown recipe keys fail) and implement `apply`."""

    name = "pass"
    needs_calibration = True
    quantizes_weights = False  # True for passes that produce QuantizedWeight codes

    @dataclass
    class Options:
        pass

    def __init__(self, options=None, spec: QuantSpec | None = None):
        self.opts = options if options is not None else self.Options()
        self.spec = spec

    def setup(self, sm: StreamingModel) -> None:
        """Called once before the loop (whole-model preparation, config edits)."""

    def apply(self, ctx: LayerContext) -> None:
        raise NotImplementedError

    def finalize(self, sm: StreamingModel) -> dict:
        """Called after the loop; returns {relative file name: bytes or dict (json)} to write beside the model."""
        return {}


@dataclass
class LoopResult:
    layer_stats: list[dict]
    artifacts: dict
    final: list[Batch]  # outputs of the last layer (before the final norm)


def compress_loop(sm: StreamingModel, passes: list[Pass], calib_ids: torch.Tensor | None, spec: QuantSpec,
                  writer=None, progress: Callable[[int, int, str], None] | None = None,
                  start_layer: int = 0, batches: list[Batch] | None = None,
                  on_layer_done: Callable[[int, list[Batch]], None] | None = None,
                  batch_size: int = 1, layer_stats: list[dict] | None = None,
                  restore_batches: Callable[[list[Batch]], list[Batch]] | None = None,
                  clock: StageClock | None = None) -> LoopResult:
    """Compress ``sm`` in place layer by layer. ``writer.write_layer(prefix, layer, ctx)`` receives each
    finished layer before it is freed. ``start_layer``/``batches`` resume an interrupted run;
    ``layer_stats`` (stats of the layers already done) is extended in place, so ``on_layer_done`` can read
    the finished layer's stats as ``layer_stats[-1]``. ``restore_batches`` maps the freshly captured layer-0
    inputs (after the passes' setup) to the saved inputs of ``start_layer`` (see ptq.resume). ``clock`` sums
    the time of each stage (setup, calibration capture, layer load, each pass, layer forward, write, ...)."""
    clock = clock if clock is not None else StageClock()
    with clock("setup"):
        for p in passes:
            p.setup(sm)
    with clock("calibration capture"):
        if batches is None:
            batches = capture_inputs(sm, calib_ids, batch_size) if calib_ids is not None else []
        if restore_batches is not None:
            batches = restore_batches(batches)
    n = len(sm.layers)
    stats = layer_stats if layer_stats is not None else []
    for i in range(start_layer, n):
        with clock("layer load"):
            layer = sm.load_layer(i)
        ctx = LayerContext(i, layer, sm.layer_prefix(i), sm.lmap, sm.config, batches, spec)
        for p in passes:
            if progress:
                progress(i, n, p.name)
            with clock(f"pass {p.name}"):
                p.apply(ctx)
        with clock("layer forward"):
            if batches:
                batches = run_layer(layer, batches)
        with clock("write"):
            if writer is not None:
                writer.write_layer(ctx)
        stats.append({"layer": i, **ctx.stats})
        with clock("layer release"):
            release(layer)
        if on_layer_done:
            with clock("resume checkpoint"):
                on_layer_done(i, batches)
    with clock("finalize passes"):
        artifacts = {}
        for p in passes:
            artifacts.update(p.finalize(sm))
    return LoopResult(stats, artifacts, batches)
