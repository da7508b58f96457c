"""Shared machinery of the outlier-migration passes (OS+, SmoothQuant): exact folding of a per-channel shift
``z`` and scale ``s`` into the op before a group of linears and into the linears themselves, and the
"sub-module" losses that the OS+ search minimizes.

For an activation ``X [T, C]`` feeding linears ``W_k [O_k, C]`` (biases ``b_k``), OS+ (Wei et al. 2023, Eq. 3-4):

    W_k X + b_k = (W_k diag(s)) ((X - z) / s) + (b_k + W_k z)

* shift: ``b_k <- b_k + W_k z`` (a bias is created when the linear has none); the producer of X absorbs ``-z``:
  a LayerNorm's bias (``beta -= z``), or, for a bias-free RMSNorm, an explicit *input shift* applied to the
  linear input (see ptq.passes.act_quant.ActQuantizer).
* scale: the producer's output is divided by ``s`` (norm ``gamma /= s, beta /= s``, with Gemma's ``(1 + w)``
  norm on the effective scale: ``w <- (1 + w) / s - 1``; a producing linear's output rows ``W_prev[j, :] /= s_j``)
  and ``W_k <- W_k diag(s)`` (input columns).

Shapes: ``z, s [C]``; captured inputs ``x [b, L, C]``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ptq.pipeline import Batch, LayerContext, _Caught, layer_forward
from ptq.quant.primitives import QuantSpec, fake_quantize, fake_quantize_activation


def has_bias(m: nn.Module) -> bool:
    return getattr(m, "bias", None) is not None


@torch.no_grad()
def add_bias(lin: nn.Linear, delta: torch.Tensor | None = None) -> None:
    """``b <- b + delta`` (``delta [O]``), creating a zero bias on a bias-free linear."""
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device),
                                requires_grad=False)
    if delta is not None:
        lin.bias.data = (lin.bias.double() + delta.double()).to(lin.bias.dtype)


@torch.no_grad()
def fold_shift(prev: nn.Module, lins: list[nn.Linear], z: torch.Tensor) -> bool:
    """Fold the shift ``X' = X - z``: ``b_k += W_k z`` for every linear; the producer absorbs ``-z`` when it
    has a bias (LayerNorm ``beta -= z``). Returns False when it cannot (RMSNorm): the caller must then subtract
    the shift from the linears' inputs explicitly."""
    for lin in lins:
        add_bias(lin, lin.weight.double() @ z.double())
    if isinstance(prev, nn.Linear) or not has_bias(prev):
        return False
    prev.bias.data = (prev.bias.double() - z.double()).to(prev.bias.dtype)
    return True


@torch.no_grad()
def fold_scale(prev: nn.Module, lins: list[nn.Linear], s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Fold ``X'' = X' / s``: producer output divided by ``s`` (norm weight/bias, or a linear's output rows),
    ``W_k <- W_k diag(s)``.

    A norm computing ``x_hat * (norm_offset + w)`` (Gemma: offset 1) is scaled through its effective scale:
    ``w' = (norm_offset + w) / s - norm_offset``, so ``norm_offset + w' = (norm_offset + w) / s``."""
    s = s.double()
    if isinstance(prev, nn.Linear):
        prev.weight.data = (prev.weight.double() / s[:, None]).to(prev.weight.dtype)
    else:
        w = prev.weight.double() + norm_offset
        prev.weight.data = (w / s - norm_offset).to(prev.weight.dtype)
    if has_bias(prev):
        prev.bias.data = (prev.bias.double() / s).to(prev.bias.dtype)
    for lin in lins:
        lin.weight.data = (lin.weight.double() * s[None, :]).to(lin.weight.dtype)


# ----------------------------------------------------------------------------------------------------------
# sub-module capture and losses


class SubModule:
    """One group's "sub-module function" f(X) and its captured calls.

    kinds: ``attn`` = attention output before o_proj (RoPE, GQA, causal mask, q/k/v biases, q/k norms: the real
    HF module with o_proj replaced by identity); ``gated`` = ``act(gate(X)) * up(X)``; ``linear`` = the single
    linear's output (OPT fc1, Phi-3's fused gate_up_proj, down_proj). ``calls[i] = (args, kwargs)`` of the captured module, ``xs[i] [b, L, C]``.
    """

    def __init__(self, ctx: LayerContext, group, batches: list[Batch] | None):
        """Captures the group's calls on ``batches`` (None: not yet, see `capture`)."""
        self.ctx, self.group = ctx, group
        lm = ctx.lmap
        self.lins = [ctx.module(n) for n in group.linears]
        if group.name == "attn_in":
            self.kind, target = "attn", ctx.module(lm.attn)
        elif group.name == "mlp_in" and lm.mlp_kind == "gated":
            self.kind, target = "gated", ctx.module(group.linears[0].rsplit(".", 1)[0])
        elif len(group.linears) == 1:
            self.kind, target = "linear", self.lins[0]
        else:
            raise ValueError(f"no sub-module loss for group {group.name} of {lm.arch}")
        self.target = target
        self.calls: list[tuple[tuple, dict]] = []
        self.xs: list[torch.Tensor] = []
        if batches is not None:
            SubModule.capture([self], batches)

    @staticmethod
    def capture(subs: list["SubModule"], batches: list[Batch]) -> None:
        """Record the calls of every sub-module in ``subs`` (same layer) with one partial layer forward per
        batch, stopped once each of them has been called. Used for groups whose inputs do not change when an
        earlier group's migration is folded (an exact transform): gate/up and down_proj of one MLP."""
        ctx = subs[0].ctx

        def make_hook(sub):
            def hook(_m, args, kwargs):
                if args:
                    x, args = args[0], args[1:]
                else:
                    kwargs = dict(kwargs)
                    x = kwargs.pop("hidden_states")
                sub.calls.append((args, kwargs))
                sub.xs.append(x.detach())
                if all(len(o.calls) == len(sub.calls) for o in subs):
                    raise _Caught
            return hook

        hs = [sub.target.register_forward_pre_hook(make_hook(sub), with_kwargs=True) for sub in subs]
        try:
            for b in batches:
                try:
                    layer_forward(ctx.layer, b)
                except _Caught:
                    pass
        finally:
            for h in hs:
                h.remove()

    def tokens(self) -> torch.Tensor:
        """All captured inputs as ``[T, C]`` fp32."""
        return torch.cat([x.reshape(-1, x.shape[-1]).float() for x in self.xs])

    @torch.no_grad()
    def run(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """f(x) for captured call ``i`` with the linears' current weights."""
        args, kwargs = self.calls[i]
        if self.kind == "attn":
            attn = self.target
            o_name = next(n for n in ("o_proj", "out_proj", "dense") if hasattr(attn, n))
            o = getattr(attn, o_name)
            setattr(attn, o_name, nn.Identity())
            try:
                out = attn(x, *args, **kwargs) if args else attn(hidden_states=x, **kwargs)
            finally:
                setattr(attn, o_name, o)
            return out[0] if isinstance(out, tuple) else out
        if self.kind == "gated":
            gate, up = self.lins
            return self.target.act_fn(gate(x)) * up(x)
        return self.lins[0](x)

    def reference(self) -> list[torch.Tensor]:
        return [self.run(x, i).float() for i, x in enumerate(self.xs)]


@contextmanager
def swapped_weights(lins: list[nn.Linear], weights: list[torch.Tensor]):
    """Temporarily replace the linears' weights (biases unchanged)."""
    old = [lin.weight.data for lin in lins]
    try:
        for lin, w in zip(lins, weights):
            lin.weight.data = w.to(lin.weight.dtype)
        yield
    finally:
        for lin, w in zip(lins, old):
            lin.weight.data = w


def make_act_quant(bits: int | None, granularity: str, sym: bool) -> Callable:
    """``q(x, clip) -> x_hat``: activation fake-quant (identity when ``bits`` is None)."""
    def q(x, clip=None):
        if bits is None:
            return x
        return fake_quantize_activation(x, bits, granularity, sym, clip if granularity == "tensor" else None)
    return q


@torch.no_grad()
def quantized_loss(sub: SubModule, ref: list[torch.Tensor], xs: list[torch.Tensor], s: torch.Tensor,
                   wspec: QuantSpec | None, act_q: Callable, clip=None) -> float:
    """OS+ loss ``mean_tokens sum_features (f(Q_a(X/s); Q_w(W diag s)) - y)^2`` over the captured inputs ``xs``
    (already shifted) with scale ``s [C]``; ``ref`` = FP outputs y."""
    ws = [lin.weight.float() * s[None, :] for lin in sub.lins]
    if wspec is not None:
        ws = [fake_quantize(w, wspec) for w in ws]
    tot, n = 0.0, 0
    with swapped_weights(sub.lins, ws):
        for i, x in enumerate(xs):
            y = sub.run(act_q(x / s.to(x.dtype), clip), i).float()
            tot += float((y - ref[i]).pow(2).sum())
            n += y.numel() // y.shape[-1]
    return tot / max(n, 1)
