"""Importance-based mixed precision under a bit budget (``ptq compress --bits 3.5``).

**Score.** For each quantized linear ``W [N, K]`` of the model and each allowed width ``b`` (default 2/3/4/8)::

    cost(b) = tr(E_b H E_b^T) = sum((E_b @ H) * E_b),   E_b = W - RTN_b(W),   H = 2/T X^T X  [K, K]

the Hessian-weighted quantization error: twice the mean squared output error of the linear over the ``T``
calibration tokens ``X [T, K]`` it sees (the same quadratic form GPTQ minimises, Frantar et al. 2023, eq. 1;
HAWQ-style sensitivity). ``RTN_b`` uses the run's group size / symmetry / clipping at ``b`` bits.

**Where the Hessians come from (layer streaming).** The converter holds one decoder layer at a time, and a
global allocation must see every linear before the first one is quantized. `score_linears` therefore runs one
cheap first pass over the layers before the compression loop: each layer is loaded, its linears' input Hessians
are accumulated by forward hooks during the layer's ordinary forward (fp weights, fp inputs from the previous fp
layer), the costs at every width are computed, and the layer is freed. Peak memory is that of the compression
loop (one layer + the calibration activations + one Hessian per distinct linear input). Cost: one forward of
the calibration set plus the Hessian products, about a third of a GPTQ run. The scores use fp inputs, not the
already-compressed ones GPTQ later sees; the allocation is a ranking, and a greedy per-layer allocation with a
running budget would have to commit early layers before seeing the late ones, which is what this avoids.

**Allocation.** Linears that share an input (q/k/v, gate/up: one `LayerMap` group of one layer) form one unit
and get one width: they share the Hessian, and runtimes fuse them into one kernel (vLLM's qkv_proj /
gate_up_proj need one scheme per fused module). Minimise ``sum_i cost_i(b_i)`` over units subject to
``sum_i n_i b_i <= target * sum_i n_i`` (``n_i`` = weights of unit ``i``; group scales are not counted). Start every linear at the smallest width, then
upgrade greedily along each linear's lower convex hull of ``(bits, cost)`` by the best cost decrease per added
bit while the budget allows; then fill: any upgrade that still fits, best decrease per bit first, until none
fits. The average therefore never exceeds the target and falls short of it by less than the smallest single
upgrade left (one width step of one unit: < 0.01 bits on SmolLM2-135M).
"""
from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass

import torch

from ptq.quant.primitives import QuantSpec
from ptq.quant.qweight import QuantizedWeight

DEFAULT_WIDTHS = (2, 3, 4, 8)
MIN_TOKENS = 16  # a unit whose Hessian saw fewer tokens (a starved MoE expert) keeps the base width
SCORE = "rtn-hessian"  # what `cost` measures (recorded in the manifest)


class MixedPrecisionError(ValueError):
    pass


def parse_widths(text: str | None) -> tuple[int, ...]:
    """``"2,3,4,8"`` -> ``(2, 3, 4, 8)`` (None: the default); widths must lie in 2..8."""
    if text is None:
        return DEFAULT_WIDTHS
    try:
        ws = sorted({int(t) for t in str(text).replace(" ", "").split(",") if t})
    except ValueError as e:
        raise MixedPrecisionError(f"--bit-widths expects comma-separated integers, got {text!r}") from e
    if len(ws) < 2 or any(not 2 <= w <= 8 for w in ws):
        raise MixedPrecisionError(f"--bit-widths needs at least two widths in 2..8, got {text!r}")
    return tuple(ws)


def check_target(target: float, widths: tuple[int, ...]) -> None:
    if not min(widths) <= target <= max(widths):
        raise MixedPrecisionError(f"--bits {target:g} (average) must lie between the smallest and largest allowed "
                                  f"width {min(widths)}..{max(widths)}; change --bits or --bit-widths")


def base_width(target: float, widths: tuple[int, ...]) -> int:
    """The largest allowed width <= target (the run's nominal spec bits)."""
    return max(w for w in widths if w <= target)


@dataclass
class MixedPlan:
    """The chosen width per quantized linear (full module path -> bits) and how it was chosen."""

    target_bits: float
    widths: tuple[int, ...]
    bits: dict[str, int]  # per linear
    params: dict[str, int]  # per linear
    costs: dict[str, dict[int, float]]  # per linear
    units: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # unit -> its linears (one width)
    pinned: list[str] = dataclasses.field(default_factory=list)  # units kept at the base width (too few tokens)

    @property
    def average_bits(self) -> float:
        total = sum(self.params.values())
        return sum(self.bits[m] * self.params[m] for m in self.bits) / total

    def manifest(self) -> dict:
        """Deterministic record for manifest.json (bits per module; costs go to report.json)."""
        hist: dict[str, int] = {}
        for b in self.bits.values():
            hist[str(b)] = hist.get(str(b), 0) + 1
        return {"target_bits": self.target_bits, "average_bits": round(self.average_bits, 6),
                "widths": list(self.widths), "score": SCORE, "modules_per_width": hist, "pinned_units": self.pinned,
                "bits": dict(sorted(self.bits.items()))}

    def report(self) -> dict:
        return {**self.manifest(), "params": dict(sorted(self.params.items())), "units": self.units,
                "costs": {m: {str(b): c for b, c in cs.items()} for m, cs in sorted(self.costs.items())}}


def linear_costs(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, widths) -> dict[int, float]:
    """``{b: tr(E_b H E_b^T)}`` for ``w [N, K]`` and ``H [K, K]`` (module docstring)."""
    w = w.detach().float()
    out = {}
    for b in widths:
        e = w - QuantizedWeight.from_float(w, dataclasses.replace(spec, bits=b)).dequantize()
        out[b] = float(((e @ H) * e).sum())
    return out


def _hull(costs: dict[int, float]) -> list[int]:
    """Widths on the lower convex hull of ``(b, cost(b))`` with strictly decreasing cost (greedy steps)."""
    ws = sorted(costs)
    pts: list[int] = []
    for w in ws:
        if pts and costs[w] >= costs[pts[-1]]:
            continue  # more bits, no less error: never worth it
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # b lies on or above the segment a-w: drop it (slope a->b no steeper than a->w)
            if (costs[a] - costs[b]) / (b - a) <= (costs[a] - costs[w]) / (w - a):
                pts.pop()
            else:
                break
        pts.append(w)
    return pts


def allocate(costs: dict[str, dict[int, float]], params: dict[str, int], target: float,
             widths: tuple[int, ...]) -> dict[str, int]:
    """Bits per module minimising total cost with ``sum n_i b_i <= target * sum n_i`` (module docstring)."""
    check_target(target, widths)
    total = sum(params.values())
    budget = target * total + 1e-9 * total
    lo = min(widths)
    bits = {m: lo for m in costs}
    used = lo * total
    hulls = {m: _hull({b: costs[m][b] for b in widths}) for m in costs}
    heap = []

    def push(m):
        h = hulls[m]
        i = h.index(bits[m]) if bits[m] in h else None
        if i is not None and i + 1 < len(h):
            nb = h[i + 1]
            eff = (costs[m][bits[m]] - costs[m][nb]) / ((nb - bits[m]) * params[m])
            heapq.heappush(heap, (-eff, m, nb))

    for m in sorted(costs):
        push(m)
    while heap:
        _, m, nb = heapq.heappop(heap)
        extra = (nb - bits[m]) * params[m]
        if used + extra <= budget:
            bits[m], used = nb, used + extra
            push(m)
    while True:  # fill what the hull steps left: any upgrade that fits, best decrease per bit first
        best = None
        for m in sorted(costs):
            for b in widths:
                extra = (b - bits[m]) * params[m]
                if b <= bits[m] or used + extra > budget:
                    continue
                gain = (costs[m][bits[m]] - costs[m][b]) / extra
                if best is None or gain > best[0]:
                    best = (gain, m, b, extra)
        if best is None:
            break
        _, m, b, extra = best
        bits[m], used = b, used + extra
    return bits


class _HessianHooks:
    """Forward pre-hooks accumulating ``H = 2/T X^T X`` for each distinct input of a layer's linears."""

    def __init__(self, ctx, names: list[str]):
        from ptq.passes.gptq import HessianAccumulator

        self.owner = {}
        for n in names:
            self.owner[n] = next(m for m in ctx.lmap.group_of(n).linears if m in names)
        self.accs = {o: HessianAccumulator(ctx.module(o).in_features) for o in set(self.owner.values())}
        self.hooks = []
        for o, acc in self.accs.items():
            def hook(_m, args, _acc=acc):
                x = args[0]
                _acc.add(x.reshape(-1, x.shape[-1]).float())
            self.hooks.append(ctx.module(o).register_forward_pre_hook(hook))

    def H(self, name: str) -> torch.Tensor:
        return self.accs[self.owner[name]].H

    def remove(self):
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def score_linears(sm, calib_ids: torch.Tensor, spec: QuantSpec, widths, progress=None, tokens=None
                  ) -> tuple[dict[str, dict[int, float]], dict[str, int], dict[str, list[str]]]:
    """First pass over the layers (module docstring): ``costs {module path: {b: cost}}``,
    ``params {module path: N*K}`` for every linear the quantizing passes will see, and the allocation units
    ``{unit: [module paths]}`` (linears sharing an input). ``progress(i, n)`` after each layer; ``tokens`` (a dict)
    receives the number of calibration tokens each unit's Hessian saw (routed MoE experts see only theirs)."""
    from ptq.model_io import release
    from ptq.pipeline import LayerContext, capture_inputs, for_layer, run_layer

    batches = capture_inputs(sm, calib_ids)
    n = len(sm.layers)
    costs: dict[str, dict[int, float]] = {}
    params: dict[str, int] = {}
    units: dict[str, list[str]] = {}
    for i in range(n):
        batches = for_layer(batches, i)
        layer = sm.load_layer(i)
        ctx = LayerContext(i, layer, sm.layer_prefix(i), sm.lmap, sm.config, batches, spec)
        names = ctx.linears()
        hooks = _HessianHooks(ctx, names)
        try:
            batches = run_layer(layer, batches)
        finally:
            hooks.remove()
        for name in names:
            w = ctx.module(name).weight.data
            costs[ctx.prefix + name] = linear_costs(w, hooks.H(name), spec, widths)
            params[ctx.prefix + name] = w.numel()
            unit = ctx.prefix + hooks.owner[name]
            units.setdefault(unit, []).append(ctx.prefix + name)
            if tokens is not None:
                tokens[unit] = hooks.accs[hooks.owner[name]].n
        del hooks
        release(layer)
        if progress is not None:
            progress(i, n)
    return costs, params, units


def allocate_units(costs: dict[str, dict[int, float]], params: dict[str, int], units: dict[str, list[str]],
                   target: float, widths: tuple[int, ...]) -> dict[str, int]:
    """`allocate` over units (sums of their linears' costs and weights), expanded to bits per linear."""
    ucost = {u: {b: sum(costs[m][b] for m in ms) for b in widths} for u, ms in units.items()}
    uparams = {u: sum(params[m] for m in ms) for u, ms in units.items()}
    ubits = allocate(ucost, uparams, target, widths)
    return {m: ubits[u] for u, ms in units.items() for m in ms}


def plan_mixed(sm, calib_ids, spec: QuantSpec, target: float, widths, progress=None) -> MixedPlan:
    """Score, then allocate. Units whose Hessian saw fewer than ``MIN_TOKENS`` tokens (their cost says nothing)
    keep the base width `base_width`; the others share what is left of the budget."""
    tokens: dict[str, int] = {}
    costs, params, units = score_linears(sm, calib_ids, spec, widths, progress, tokens)
    widths = tuple(widths)
    return plan_from_scores(costs, params, units, tokens, target, widths)


def plan_from_scores(costs, params, units, tokens, target: float, widths: tuple[int, ...]) -> MixedPlan:
    pinned = sorted(u for u in units if tokens.get(u, MIN_TOKENS) < MIN_TOKENS)
    base = base_width(target, widths)
    bits = {m: base for u in pinned for m in units[u]}
    free = {u: ms for u, ms in units.items() if u not in pinned}
    if free:
        total = sum(params.values())
        rest = sum(params[m] for ms in free.values() for m in ms)
        t = (target * total - base * (total - rest)) / rest
        bits.update(allocate_units(costs, params, free, min(max(t, min(widths)), max(widths)), widths))
    return MixedPlan(target, widths, bits, params, costs, units, pinned)
