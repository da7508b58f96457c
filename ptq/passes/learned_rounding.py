"""Learned rounding and clipping, block by block (gradient-based PTQ; methods.md §2.2, *not* Frantar's GPTQ).

For every linear ``W [N, K]`` of a decoder layer, with per-group scale ``s`` and zero ``z`` (expanded to ``[N, K]``
by ``g_idx``), the quantized weight is (sign-gradient rounding offsets, as in AutoRound, Cheng et al. 2023)

    W_hat = s * (clamp(round(W / s + v) + z, 0, 2^b - 1) - z),     v [N, K] in [v0 - 1/2, v0 + 1/2]

and the clipping range of each group is learned as multipliers ``m_hi, m_lo [N, G]`` in ``[0.5, 1.5]`` of the
start grid's end points ``x_hi = (2^b - 1 - z0) s0`` and ``x_lo = -z0 s0``:
``s = (m_hi x_hi - m_lo x_lo) / (2^b - 1)``, ``z = round(-m_lo x_lo / s)`` (symmetric grids: ``s = m_hi s0``).
``round`` has a straight-through gradient. The loss is the layer's output error

    L = mean || layer_fp(X) - layer_q(X) ||^2

on the calibration inputs ``X`` of this layer, which come from the already-compressed previous layers. The
target ``layer_fp(.)`` is, by default (``target: fp``, AutoRound's objective), the fp layer run on the fp model's
own hidden states ``X_fp``: ``L = mean || layer_fp(X_fp) - layer_q(X) ||^2``, so each layer also learns to undo
the error its inputs carry from the layers before it. The pass carries that second stream of activations from
layer to layer (one more ``[n, L, H]`` tensor in memory; after a resume it restarts from the compressed inputs).
``target: chain`` uses the fp layer on ``X`` itself: the objective GPTQ minimises per linear, extended to the
whole block. ``v`` and ``m`` take signed-gradient steps with a learning rate decaying linearly from ``lr`` to 0
(AutoRound's optimiser).

Initialisation: RTN (default, ``v0 = 0``) or GPTQ codes (``init``). From GPTQ, ``v0`` places each weight at
GPTQ's error-updated value, clamped to ``margin`` inside the interval of the code GPTQ chose, so step 0
reproduces GPTQ's codes. Each step runs ``batch`` calibration sequences as one stacked forward under bfloat16
autocast (``amp``); the losses that decide what is kept are fp32. At the end the full calibration loss of the
learned weights is compared with the initialisation's, and the better one is kept: the pass never ends above its
initialisation's layer error on the calibration inputs.
The result is an ordinary `QuantizedWeight` (same grid kinds as RTN/GPTQ), so every exporter takes it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from ptq.pipeline import Batch, LayerContext, Pass, layer_forward
from ptq.quant.primitives import expand_groups
from ptq.quant.qweight import QuantizedWeight


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class LearnedLinear:
    """Learnable rounding offsets and clip multipliers of one linear, initialised from a `QuantizedWeight`."""

    def __init__(self, w: torch.Tensor, qw: QuantizedWeight, learn_clip: bool, start: torch.Tensor | None = None,
                 margin: float = 0.15):
        self.w = w.detach().float()  # [N, K] fp weights
        self.qw0 = qw
        self.bits, self.sym, self.g_idx = qw.bits, qw.sym, qw.g_idx
        self.maxq = 2**qw.bits - 1
        self.s0 = qw.scale.float()
        self.z0 = qw.zeros().float()
        S, Z = expand_groups(self.s0, self.g_idx), expand_groups(self.z0, self.g_idx)
        t = self.w / S
        target = qw.codes.float() - Z  # integer level the init chose
        # start where the init rounded from (GPTQ: its error-updated weight), kept inside the init code's interval
        v0 = torch.zeros_like(t) if start is None else start.float() / S - t
        # (codes at the grid's ends too: GPTQ may clamp a weight whose original value lies inside the range)
        v0 = torch.clamp(v0, target - 0.5 + margin - t, target + 0.5 - margin - t)
        self.v_lo, self.v_hi = v0 - 0.5, v0 + 0.5
        self.v = v0.clone().requires_grad_(True)
        self.m_hi = torch.ones_like(self.s0, requires_grad=learn_clip)
        self.m_lo = torch.ones_like(self.s0, requires_grad=learn_clip and not self.sym)
        self.learn_clip = learn_clip

    def params(self) -> list[torch.Tensor]:
        ps = [self.v]
        if self.learn_clip:
            ps.append(self.m_hi)
            if not self.sym:
                ps.append(self.m_lo)
        return ps

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Learned ``scale, zero [N, G]`` (differentiable, zero rounded straight-through)."""
        if not self.learn_clip:
            return self.s0, self.z0
        if self.sym:
            return self.s0 * self.m_hi, self.z0
        # s = (m_hi x_hi - m_lo x_lo) / (2^b - 1), z = round(-m_lo x_lo / s); written so that m = 1 gives s0, z0
        # exactly (x_hi = (2^b - 1 - z0) s0, x_lo = -z0 s0)
        s = (self.s0 * (self.m_hi * (self.maxq - self.z0) + self.m_lo * self.z0) / self.maxq).clamp(min=1e-10)
        z = torch.clamp(_round_ste(self.m_lo * self.z0 * self.s0 / s), 0, self.maxq)
        return s, z

    def weight(self) -> torch.Tensor:
        """Fake-quantized ``W_hat [N, K]`` (differentiable in ``v`` and the clip multipliers)."""
        s, z = self.qparams()
        S, Z = expand_groups(s, self.g_idx), expand_groups(z, self.g_idx)
        q = torch.clamp(_round_ste(self.w / S + self.v) + Z, 0, self.maxq)
        return S * (q - Z)

    @torch.no_grad()
    def step(self, lr: float, clip_lr: float) -> None:
        """Signed-gradient step, then project onto the boxes."""
        for p in self.params():
            if p.grad is not None:
                p -= (lr if p is self.v else clip_lr) * torch.sign(p.grad)
                p.grad = None
        self.v.copy_(torch.minimum(torch.maximum(self.v, self.v_lo), self.v_hi))
        self.m_hi.clamp_(0.5, 1.5)
        self.m_lo.clamp_(0.5, 1.5)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in (self.v, self.m_hi, self.m_lo)]

    @torch.no_grad()
    def restore(self, snap: list[torch.Tensor]) -> None:
        for p, q in zip((self.v, self.m_hi, self.m_lo), snap):
            p.copy_(q)

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        s, z = self.qparams()
        S, Z = expand_groups(s, self.g_idx), expand_groups(z, self.g_idx)
        codes = torch.clamp(torch.round(self.w / S + self.v) + Z, 0, self.maxq).to(torch.uint8)
        return QuantizedWeight(codes, s.clone(), None if self.sym else z.clone(), self.bits, self.qw0.group_size,
                               self.g_idx.clone(), meta=dict(self.qw0.meta))


class LearnedRoundingPass(Pass):
    name = "learned-rounding"
    needs_calibration = True
    quantizes_weights = True
    mixed_bits = True  # the init (RTN / GPTQ) reads per-linear widths; learning keeps each init's grid and bits

    @dataclass
    class Options:
        init: str = "rtn"  # rtn | gptq: the codes learning starts from
        target: str = "fp"  # fp: fp layer on the fp model's inputs (AutoRound's); chain: on this layer's inputs
        iters: int = 64  # signed-gradient steps per decoder layer (AutoRound: 200 steps of 8 sequences)
        lr: float = 0.02  # rounding-offset step (0 = 1 / iters, AutoRound's default); decays linearly to 0
        batch: int = 2  # calibration sequences per step, run as one stacked forward
        learn_clip: bool = True  # learn per-group clip multipliers as well as the rounding
        clip_lr: float = 0.0  # 0 = lr (AutoRound's min-max step)
        keep_best: bool = False  # end at the step with the lowest batch loss (AutoRound's best-iteration rule)
        margin: float = 0.15  # GPTQ init: how far inside its code's interval each weight starts (0 < m <= 0.5)
        amp: bool = True  # learning steps' matmuls in bfloat16 autocast (AutoRound's default); losses kept fp32
        seed: int = 0
        # GPTQ initialisation (see ptq.passes.gptq)
        act_order: bool = True
        static_groups: bool = True
        damp: float = 0.01

        def __post_init__(self):
            if self.init not in ("rtn", "gptq"):
                raise ValueError(f"init must be rtn or gptq, got {self.init!r}")
            if self.target not in ("fp", "chain"):
                raise ValueError(f"target must be fp or chain, got {self.target!r}")
            if not 0 < self.margin <= 0.5:
                raise ValueError(f"margin must be in (0, 0.5], got {self.margin}")
            if self.iters < 0 or self.batch < 1 or self.lr < 0 or self.clip_lr < 0:
                raise ValueError("iters >= 0, batch >= 1, lr >= 0 and clip_lr >= 0 are required")

    def _init(self, ctx: LayerContext) -> dict:
        """Quantize with the init method; returns {linear: weights the init rounded from} (GPTQ only)."""
        o = self.opts
        if o.init == "gptq":
            from ptq.passes.gptq import GPTQPass

            gp = GPTQPass(GPTQPass.Options(act_order=o.act_order, static_groups=o.static_groups, damp=o.damp),
                          self.spec)
            gp.keep_updated = True
            gp.apply(ctx)
            return getattr(gp, "updated", {})
        from ptq.passes.rtn import RTNPass

        RTNPass(None, self.spec).apply(ctx)
        return {}

    _fp_stream: list | None = None  # the fp model's hidden states entering layer `_fp_index`
    _fp_index: int = -1

    @torch.no_grad()
    def _targets(self, ctx: LayerContext) -> list[torch.Tensor]:
        """The fp layer's outputs ``[b, L, H]`` per batch: on the fp model's own inputs (``target: fp``; the pass
        carries that second stream from layer to layer, starting from the calibration inputs of the first layer it
        sees) or on this layer's compressed-chain inputs (``target: chain``)."""
        if self.opts.target == "chain":
            return [y.float() for y in ctx.outputs()]
        fp_in = self._fp_stream if self._fp_index == ctx.index else [b.hidden for b in ctx.batches]
        outs = [layer_forward(ctx.layer, Batch(h, b.kwargs, b.attn)) for h, b in zip(fp_in, ctx.batches)]
        self._fp_stream, self._fp_index = outs, ctx.index + 1
        return [y.float() for y in outs]

    @torch.no_grad()
    def _loss(self, ctx: LayerContext, targets: list[torch.Tensor], stacker: "_Stacker",
              weights: dict | None = None) -> tuple[float, list[torch.Tensor]]:
        """Mean squared layer-output error over all calibration batches, and the outputs ``[b, L, H]``."""
        tot, outs = 0.0, []
        for idx in stacker.chunks():
            out = stacker.forward(ctx.layer, idx, weights)
            y = stacker.cat(targets, idx)
            tot += float((out.float() - y).pow(2).mean()) * len(idx)
            outs.extend(stacker.split(out, idx))
        return tot / max(1, len(targets)), outs

    def apply(self, ctx: LayerContext) -> None:
        if not ctx.batches:
            raise ValueError("learned rounding needs calibration data")
        o = self.opts
        names = ctx.linears()
        fp = {n: ctx.module(n).weight.data.clone() for n in names}
        targets = self._targets(ctx)
        start = self._init(ctx)  # sets ctx.qweights and the layer's weights to the init's dequantized values
        init_q = {n: ctx.qweights[ctx.prefix + n] for n in names}
        stacker = _Stacker(ctx.layer, ctx.batches, o.batch)
        loss0, out0 = self._loss(ctx, targets, stacker)
        learners = {n: LearnedLinear(fp[n], init_q[n], o.learn_clip, start.get(n), o.margin) for n in names}
        for p in ctx.layer.parameters():
            p.requires_grad_(False)
        lr0 = o.lr or 1.0 / max(1, o.iters)
        clip_lr0 = o.clip_lr or lr0
        g = torch.Generator().manual_seed(o.seed + ctx.index)
        dev = ctx.batches[0].hidden.device.type
        order: list[int] = []
        best, best_loss = None, float("inf")
        with torch.enable_grad():
            for it in range(o.iters):
                if len(order) < o.batch:  # shuffled passes over the calibration set, as AutoRound's sampler
                    order = torch.randperm(len(ctx.batches), generator=g).tolist()
                idx, order = order[:o.batch], order[o.batch:]
                ws = {f"{n}.weight": lr_.weight() for n, lr_ in learners.items()}
                step_loss, parts = 0.0, stacker.group(idx)
                for j, part in enumerate(parts):
                    with torch.autocast(dev, dtype=torch.bfloat16, enabled=o.amp):
                        out = stacker.forward(ctx.layer, part, ws)
                    loss = (out.float() - stacker.cat(targets, part)).pow(2).mean() * (len(part) / len(idx))
                    loss.backward(retain_graph=j < len(parts) - 1)  # the fake-quant graph is shared by the parts
                    step_loss += float(loss.detach())
                if o.keep_best and step_loss < best_loss:  # the loss of the parameters before this step
                    best, best_loss = {n: lr_.snapshot() for n, lr_ in learners.items()}, step_loss
                decay = 1 - it / max(1, o.iters)
                for lr_ in learners.values():
                    lr_.step(lr0 * decay, clip_lr0 * decay)
        with torch.no_grad():
            if best is not None:
                for n, lr_ in learners.items():
                    lr_.restore(best[n])
            final = {n: lr_.export() for n, lr_ in learners.items()}
            wq = {f"{n}.weight": final[n].dequantize().to(fp[n].dtype) for n in names}
            loss1, out1 = self._loss(ctx, targets, stacker, wq)
        keep = loss1 < loss0
        chosen = final if keep else init_q
        for n in names:
            lin = ctx.module(n)
            lin.weight.data = chosen[n].dequantize().to(fp[n].dtype)
            ctx.qweights[ctx.prefix + n] = chosen[n]
            ctx.stats[f"{n}.wmse"] = float((lin.weight.data.float() - fp[n].float()).pow(2).mean())
        ctx.next_hidden = out1 if keep else out0  # the layer's outputs with the chosen weights: no second forward
        ctx.stats["lr_loss_init"] = loss0
        ctx.stats["lr_loss_final"] = loss1
        ctx.stats["lr_kept"] = bool(keep)
        ctx.stats["lr_stacked"] = stacker.stacked


def _forward(layer, weights: dict, b) -> torch.Tensor:
    out = functional_call(layer, weights, (b.hidden,), b.kwargs, strict=False)
    return out[0] if isinstance(out, tuple) else out


def _same(a, b) -> bool:
    """Equal keyword arguments whose tensors have a leading dimension of 1 (so they broadcast over a stack)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and (a.dim() == 0 or a.shape[0] == 1) and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


class _Stacker:
    """Runs several calibration batches as one forward (hidden states ``[b1 + b2 + ..., L, H]``) when their
    keyword arguments (mask, rotary tables) are equal and broadcast over a stack, which is checked once per layer
    against per-batch forwards; otherwise one batch at a time. Stacking changes speed only, not the loss."""

    def __init__(self, layer, batches: list[Batch], batch: int):
        self.batches = batches
        self.stacked = False
        first = batches[0]
        if len(batches) > 1 and all(b.hidden.shape == first.hidden.shape and _same(b.kwargs, first.kwargs)
                                    for b in batches[1:]):
            idx = list(range(min(len(batches), max(2, batch))))
            try:
                with torch.no_grad():
                    got = self.forward(layer, idx, None)
                    ref = torch.cat([layer_forward(layer, batches[i]) for i in idx])
                scale = float(ref.float().abs().max()) + 1e-6
                self.stacked = bool(float((got.float() - ref.float()).abs().max()) <= 1e-4 * scale)
            except (RuntimeError, ValueError):
                self.stacked = False
        self.chunk = max(batch, 8) if self.stacked else 1

    def chunks(self) -> list[list[int]]:
        n = len(self.batches)
        return [list(range(i, min(n, i + self.chunk))) for i in range(0, n, self.chunk)]

    def group(self, idx: list[int]) -> list[list[int]]:
        return [idx] if self.stacked else [[i] for i in idx]

    def cat(self, tensors: list[torch.Tensor], idx: list[int]) -> torch.Tensor:
        return tensors[idx[0]] if len(idx) == 1 else torch.cat([tensors[i] for i in idx])

    def split(self, out: torch.Tensor, idx: list[int]) -> list[torch.Tensor]:
        return list(out.split([self.batches[i].hidden.shape[0] for i in idx]))

    def forward(self, layer, idx: list[int], weights: dict | None) -> torch.Tensor:
        """The layer on the batches ``idx`` stacked (callers take ``idx`` from `group` / `chunks`)."""
        b0 = self.batches[idx[0]]
        b = Batch(self.cat([x.hidden for x in self.batches], idx), b0.kwargs, b0.attn)
        return layer_forward(layer, b) if weights is None else _forward(layer, weights, b)
