"""The sequential layer loop: capture layer-0 inputs, then for each decoder layer load it, run the recipe's
passes on it, re-run the (now compressed) layer so the next layer calibrates on compressed outputs, hand it to
the exporter and free it. Peak memory is one layer + activations + embeddings, never the whole model.

Shapes: a `Batch` holds ``hidden [b, L, H]`` plus the keyword arguments the decoder layer is called with
(attention mask, position ids, rotary ``position_embeddings`` = (cos, sin) ``[b, L, d]``, cache positions).

Per-layer attention inputs: models with mixed attention types (sliding-window vs full layers, Gemma 3's
local/global rope base) call each decoder layer with the mask / rotary tables of its own type. `capture_inputs`
therefore records the keyword arguments the model's own forward hands to *every* layer (all layers are
replaced by recorders; nothing but the pre-layer modules runs) and keeps each distinct set once
(`AttnInputs`: ``variants`` + ``of_layer[i]``). `for_layer(batches, i)` binds layer ``i``'s set before the
layer runs; every loop (calibration, streamed eval/gate, resume) goes through it.
"""
from __future__ import annotations

import dataclasses
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


@dataclass(frozen=True)
class AttnInputs:
    """The distinct keyword-argument sets the model passes to its decoder layers for one batch:
    layer ``i`` is called with ``variants[of_layer[i]]`` (e.g. one set for full-attention layers, one for
    sliding-window layers)."""

    variants: tuple[dict, ...]
    of_layer: tuple[int, ...]

    def for_layer(self, i: int) -> dict:
        return self.variants[self.of_layer[i]]


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
    kwargs: dict  # keyword arguments of the layer this batch enters next (see `for_layer`)
    attn: AttnInputs | None = None  # every layer's keyword arguments


def for_layer(batches: list[Batch], i: int) -> list[Batch]:
    """``batches`` with the keyword arguments (mask, rotary tables) of decoder layer ``i`` bound."""
    return [Batch(b.hidden, b.attn.for_layer(i), b.attn) if b.attn is not None else b for b in batches]


class _Caught(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index`` during capture: records its keyword arguments and passes the
    hidden states through unchanged; the last layer's recorder stops the forward (the head is not loaded)."""

    def __init__(self, index: int, last: bool, calls: dict):
        super().__init__()
        self.index, self.last, self.calls = index, last, calls

    def forward(self, hidden_states, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "cache")}
        kwargs["use_cache"] = False
        self.calls[self.index] = (hidden_states.detach(), kwargs)
        if self.last:
            raise _Caught
        return hidden_states


def _same(a, b) -> bool:
    """Same keyword-argument set: identical keys and the very same objects (tensors, tuples of tensors)."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if x is y:
            continue
        if isinstance(x, tuple) and isinstance(y, tuple) and len(x) == len(y) and all(p is q for p, q in zip(x, y)):
            continue
        if not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor) and type(x) is type(y) and x == y:
            continue
        return False
    return True


def _dedupe(kwargs_per_layer: list[dict]) -> AttnInputs:
    variants: list[dict] = []
    of_layer = []
    for kw in kwargs_per_layer:
        j = next((j for j, v in enumerate(variants) if _same(v, kw)), None)
        if j is None:
            j = len(variants)
            variants.append(kw)
        of_layer.append(j)
    return AttnInputs(tuple(variants), tuple(of_layer))


@torch.no_grad()
def capture_inputs(sm: StreamingModel, input_ids: torch.Tensor, batch_size: int = 1) -> list[Batch]:
    """Run the pre-layer modules on ``input_ids [n, L]``; return layer 0's inputs, with every layer's keyword
    arguments (`AttnInputs`) attached and layer 0's bound."""
    layers = sm.layers
    n = len(layers)
    originals = list(layers)
    calls: dict[int, tuple] = {}
    for i in range(n):
        layers[i] = _Recorder(i, i == n - 1, calls)
    base = get_module(sm.model, sm.lmap.layers.rsplit(".", 1)[0])  # e.g. model.model / model.model.decoder
    store: list[Batch] = []
    try:
        for s in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[s:s + batch_size].to(sm.device)
            calls.clear()
            try:
                base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except _Caught:
                pass
            if len(calls) != n:
                raise RuntimeError(f"{sm.lmap.arch}: the model called {len(calls)} of its {n} decoder layers")
            attn = _dedupe([calls[i][1] for i in range(n)])
            store.append(Batch(calls[0][0], attn.for_layer(0), attn))
    finally:
        for i, m in enumerate(originals):
            layers[i] = m
    return store


def layer_forward(layer: nn.Module, b: Batch) -> torch.Tensor:
    out = layer(b.hidden, **b.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layer(layer: nn.Module, batches: list[Batch]) -> list[Batch]:
    """Outputs of ``layer`` (with the kwargs bound for it) as the next layer's `Batch` list (kwargs still
    those of ``layer``; bind the next layer's with `for_layer`)."""
    return [Batch(layer_forward(layer, b), b.kwargs, b.attn) for b in batches]


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
    module_bits: dict[str, int] = field(default_factory=dict)  # full module path -> bits (mixed precision)
    # the layer's outputs [b, L, H] per batch with its final weights, when the last pass already computed them
    # (the loop then skips its own forward); cleared before every pass, so only the last pass's can be used
    next_hidden: list[torch.Tensor] | None = None

    def spec_for(self, name: str, base: QuantSpec | None = None) -> QuantSpec:
        """The weight spec of linear ``name`` (relative to the layer): ``base`` (default: the run's spec) with
        the bits mixed precision chose for it (ptq.mixed_precision), if any."""
        base = base if base is not None else self.spec
        b = self.module_bits.get(self.prefix + name)
        return base if b is None or b == base.bits else dataclasses.replace(base, bits=b)

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
    mixed_bits = False  # True for weight passes that quantize each linear at `LayerContext.spec_for` (mixed precision)

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
                  clock: StageClock | None = None, module_bits: dict[str, int] | None = None) -> LoopResult:
    """Compress ``sm`` in place layer by layer. ``writer.write_layer(prefix, layer, ctx)`` receives each
    finished layer before it is freed. ``start_layer``/``batches`` resume an interrupted run;
    ``layer_stats`` (stats of the layers already done) is extended in place, so ``on_layer_done`` can read
    the finished layer's stats as ``layer_stats[-1]``. ``restore_batches`` maps the freshly captured layer-0
    inputs (after the passes' setup) to the saved inputs of ``start_layer`` (see ptq.resume). ``clock`` sums
    the time of each stage (setup, calibration capture, layer load, each pass, layer forward, write, ...).
    ``module_bits`` (full module path -> bits) overrides the spec's bits per linear (mixed precision; passes
    read it through `LayerContext.spec_for`)."""
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
        batches = for_layer(batches, i)
        with clock("layer load"):
            layer = sm.load_layer(i)
        ctx = LayerContext(i, layer, sm.layer_prefix(i), sm.lmap, sm.config, batches, spec,
                           module_bits=module_bits or {})
        for p in passes:
            if progress:
                progress(i, n, p.name)
            ctx.next_hidden = None
            with clock(f"pass {p.name}"):
                p.apply(ctx)
        with clock("layer forward"):
            if batches and ctx.next_hidden is not None:
                batches = [Batch(h, b.kwargs, b.attn) for h, b in zip(ctx.next_hidden, batches)]
            elif batches:
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
