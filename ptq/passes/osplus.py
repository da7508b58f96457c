"""Outlier Suppression+ (Wei et al., EMNLP 2023, arXiv 2304.09145): channel-wise shift and scale of the
activations feeding each norm-fed group of linears (q/k/v, gate/up or fc1) and, for gated MLPs, of down_proj's
input (scale folded into up_proj's output rows), folded exactly into the producer and the linears
(ptq.passes.migration).

For the group input ``X [T, C]`` (all tokens of ``search_samples`` calibration samples):

* shift  ``z_j = (max_t X_tj + min_t X_tj) / 2``;  ``X' = X - z``,  ``b_k <- b_k + W_k z``
* scale  ``s_j = max(1, max_t |X'_tj| / t)``;  ``X'' = X' / s``,  ``W_k <- W_k diag(s)``
* ``t`` is chosen on the official grid from ``T = max_j max_t |X'_tj|`` down to ``lower_bound`` (1.0 with
  LayerNorm, 0.1 with RMSNorm) in ``num = min(max(grid, T / 0.5), max_steps)`` steps, minimizing
  ``L(t) = mean_tokens sum_features (f(Q_a(X''); Q_w(W diag s)) - f(X; W))^2`` where f is the sub-module
  function (attention output before o_proj for q/k/v; ``act(gate) * up`` for gated MLPs; the linear output for
  OPT fc1 and down_proj), ``Q_w`` RTN at the recipe's weight spec and ``Q_a`` the recipe's activation quantizer
  (per-token dynamic, or per-tensor static with clip ``(-t, t)``).

Search cost (what makes 7B widths tractable; each is an option, see `OSPlusPass.Options`):

* statistics (``T``, ``amax``, ``z``) use every token; the loss ``L(t)`` is evaluated on a token subset
  (``loss_tokens``: the ``loss_tokens // 8`` tokens with the largest ``max_j |X_tj|`` — the outliers that
  decide ``t`` — plus a seeded random sample of the rest, weighted ``(N - k) / m`` so that ``L`` stays an
  unbiased estimate of the all-token mean; attention: whole samples, up to ``loss_tokens``) and,
  for linear / gated sub-modules, a seeded random subset of ``loss_rows`` output features (the loss is a sum
  over features);
* candidates are evaluated in chunks as one batched matmul (``[c, T_s, C] x [c, C, N_s]``);
* gate/up and down_proj inputs are captured in one partial layer forward (folding gate/up's scale is exact);
* coarse-to-fine: ``coarse`` evenly spaced grid points first (stopping once ``patience`` consecutive points
  were worse than the best), then every grid point between the best coarse point's neighbours. The chosen
  ``t`` is always a point of the official grid; ``coarse: 0`` evaluates the whole grid.

``down_loss: normed`` divides each token's down_proj output error by the mean square of the residual stream it
is added to (``h = residual + y``, the input of the next RMSNorm): the error as the next layer sees it, so the few
massive-activation tokens (``|y|`` in the hundreds) do not decide the scale for all other tokens.

Shift on RMSNorm (no bias, option ``shift: on``, Llama only): the linears get explicit biases ``W z``
(``config.attention_bias = mlp_bias = True``, zero biases for o_proj / down_proj) and their inputs an explicit
``input_shift = z / s`` (exported with the activation quantizers, see ptq.passes.act_quant). ``shift: auto``
shifts only where the norm has a bias (OPT), like the reference code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ptq.passes.act_quant import ActStateMixin, export_spec, quantizer_of
from ptq.passes.migration import SubModule, add_bias, fold_scale, fold_shift, make_act_quant, swapped_weights
from ptq.pipeline import LayerContext, Pass
from ptq.quant.primitives import fake_quantize


class LossProbe:
    """``L(t)`` for a batch of candidate scales on a fixed data subset (module doc).

    kinds ``gated`` / ``linear``: tokens ``X [T_s, C]`` and weight rows ``W_k[rows] [N_s, C]`` are gathered
    once; `losses` evaluates ``c`` candidates with batched matmuls. kind ``attn``: the real attention module
    per candidate on the captured calls ``idx``.
    """

    unbiased = True  # weight the random tokens up to the population they stand for (False: plain mean)

    @torch.no_grad()
    def __init__(self, sub: SubModule, xs: list[torch.Tensor], wspec, act_q, loss_tokens: int, loss_rows: int,
                 seed: int = 0, chunk: int = 8, residual: list[torch.Tensor] | None = None):
        """``residual`` (kind ``linear``, ``[b, L, C_out]`` per call): the residual stream the output is added
        to; each token's error is then divided by the mean square of ``residual + f(X)`` (the error as the next
        RMSNorm sees it), so a few massive-activation tokens do not decide the scale for all others."""
        self.sub, self.wspec, self.act_q, self.chunk = sub, wspec, act_q, chunk
        g = torch.Generator().manual_seed(seed)
        if sub.kind == "attn":
            n, self.idx = 0, []
            for i, x in enumerate(xs):
                self.idx.append(i)
                n += x.shape[0] * x.shape[1]
                if loss_tokens > 0 and n >= loss_tokens:
                    break
            self.xs = [xs[i] for i in self.idx]
            self.ref = [sub.run(x, i).float() for x, i in zip(self.xs, self.idx)]
            return
        X = torch.cat([x.reshape(-1, x.shape[-1]).float() for x in xs])
        R = None if residual is None else torch.cat([r.reshape(-1, r.shape[-1]).float() for r in residual])
        if 0 < loss_tokens < X.shape[0]:
            k_top = max(1, loss_tokens // 8)
            top = X.abs().amax(1).topk(k_top).indices
            rest = torch.ones(X.shape[0], dtype=torch.bool)
            rest[top] = False
            others = rest.nonzero().squeeze(1)
            others = others[torch.randperm(others.numel(), generator=g)[: loss_tokens - k_top]]
            # the random tokens stand for all non-top ones: weight (N - k) / m keeps L(t) an unbiased
            # estimate of the full-data mean (unweighted, the outlier tokens would count ~N / loss_tokens x)
            wt = torch.ones(k_top + others.numel())
            wt[k_top:] = (X.shape[0] - k_top) / max(others.numel(), 1) if self.unbiased else 1.0
            self.wt = wt / wt.sum()
            pick = torch.cat([top, others])
            X, R = X[pick], (None if R is None else R[pick])
        else:
            self.wt = torch.full((X.shape[0],), 1.0 / X.shape[0])
        if R is not None:
            lin = sub.lins[0]
            h = R + X @ lin.weight.float().t() + (0 if lin.bias is None else lin.bias.float())
            self.wt = self.wt / h.pow(2).mean(1).clamp_min(1e-12)
            self.wt = self.wt / self.wt.sum()
        self.X = X
        n_out = sub.lins[0].out_features
        rows = None
        if 0 < loss_rows < n_out:
            rows = torch.randperm(n_out, generator=g)[:loss_rows].sort().values
        self.W = [lin.weight.float() if rows is None else lin.weight.float()[rows] for lin in sub.lins]
        self.b = [None if lin.bias is None else (lin.bias.float() if rows is None else lin.bias.float()[rows])
                  for lin in sub.lins]
        self.ref = self._f([X @ w.t() + (0 if b is None else b) for w, b in zip(self.W, self.b)])

    def _f(self, ys: list[torch.Tensor]) -> torch.Tensor:
        if self.sub.kind == "gated":
            return self.sub.target.act_fn(ys[0]) * ys[1]
        return ys[0]

    def _qa(self, x: torch.Tensor, clips: list) -> torch.Tensor:
        """Activation fake-quant of ``x [c, T, C]``, candidate ``i`` with clip ``clips[i]``."""
        if clips[0] is None or getattr(self.act_q, "granularity", "token") == "token":
            return self.act_q(x, None)
        return torch.stack([self.act_q(x[i], clips[i]) for i in range(x.shape[0])])

    @torch.no_grad()
    def losses(self, scales: torch.Tensor, clips: list) -> list[float]:
        """``scales [c, C]`` candidates (clips: per-tensor static ranges or None) -> ``L`` per candidate."""
        out: list[float] = []
        for a in range(0, scales.shape[0], self.chunk):
            s, cl = scales[a:a + self.chunk], clips[a:a + self.chunk]
            out += self._attn(s, cl) if self.sub.kind == "attn" else self._batched(s, cl)
        return out

    def _batched(self, s: torch.Tensor, clips: list) -> list[float]:
        c = s.shape[0]
        xq = self._qa(self.X[None] / s[:, None, :], clips)  # [c, T, C]
        ys = []
        for w, b in zip(self.W, self.b):
            ws = (w[None] * s[:, None, :]).reshape(c * w.shape[0], -1)
            if self.wspec is not None:
                ws = fake_quantize(ws, self.wspec)
            y = torch.bmm(xq, ws.reshape(c, w.shape[0], -1).transpose(1, 2))  # [c, T, N]
            ys.append(y if b is None else y + b)
        err = (self._f(ys) - self.ref[None]).pow(2).sum(-1) @ self.wt  # [c]: weighted mean over tokens
        return [float(v) for v in err]

    def _attn(self, s: torch.Tensor, clips: list) -> list[float]:
        out = []
        for j in range(s.shape[0]):
            sj = s[j]
            ws = [lin.weight.float() * sj[None, :] for lin in self.sub.lins]
            if self.wspec is not None:
                ws = [fake_quantize(w, self.wspec) for w in ws]
            tot, n = 0.0, 0
            with swapped_weights(self.sub.lins, ws):
                for x, i, r in zip(self.xs, self.idx, self.ref):
                    y = self.sub.run(self.act_q(x / sj.to(x.dtype), clips[j]), i).float()
                    tot += float((y - r).pow(2).sum())
                    n += y.numel() // y.shape[-1]
            out.append(tot / max(n, 1))
        return out


def search_scale(probe: LossProbe, amax: torch.Tensor, lower_bound: float, grid: int, max_steps: int,
                 coarse: int = 16, patience: int = 4) -> tuple[torch.Tensor, float, dict]:
    """Pick ``t`` on the official grid (module doc) for channel absmax ``amax [C]`` of the (shifted) input.
    Returns ``(s [C], t, info)``; ``info``: losses without scaling / at the choice, ``T``, evaluations."""
    amax = amax.float()
    T = float(amax.max())
    num = min(max(grid, int(T / 0.5)), max_steps) if T > lower_bound else 0
    step = (T - lower_bound) / num if num else 0.0
    granular = getattr(probe.act_q, "granularity", "token")

    def cand(i):
        t = T - i * step
        return torch.clamp(amax / t, min=1.0), t

    seen: dict[int, float] = {}

    def evaluate(ids: list[int]) -> None:
        ids = [i for i in ids if i not in seen]
        if not ids:
            return
        cs = [cand(i) for i in ids]
        clips = [(-t, t) if granular == "tensor" else None for _, t in cs]
        for i, v in zip(ids, probe.losses(torch.stack([c[0] for c in cs]), clips)):
            seen[i] = v

    evaluate([0])
    if num:
        if coarse <= 0 or coarse >= num:
            evaluate(list(range(1, num + 1)))
        else:
            pts = sorted({round(num * k / coarse) for k in range(1, coarse + 1)})
            for a in range(0, len(pts), max(1, probe.chunk)):
                evaluate(pts[a:a + max(1, probe.chunk)])
                done = [p for p in pts if p in seen]
                best = min(done, key=lambda p: seen[p])
                if sum(1 for p in done if p > best) >= patience:  # the loss has turned up: stop early
                    break
            best = min(seen, key=lambda p: seen[p])
            lo = max([p for p in pts if p < best and p in seen] + [0])
            hi = min([p for p in pts if p > best and p in seen] + [min(num, best + max(1, num // coarse))])
            evaluate(list(range(lo + 1, hi)))
    best = min(seen, key=lambda p: (seen[p], p))
    s, t = cand(best)
    return s, t, {"loss_noscale": seen[0], "loss": seen[best], "T": T, "evals": len(seen), "steps": num}


class OSPlusPass(ActStateMixin, Pass):
    name = "os+"
    needs_calibration = True

    @dataclass
    class Options:
        shift: str = "auto"  # auto: where the norm has a bias | on: also RMSNorm (explicit biases) | off
        lower_bound: float | None = None  # None: 1.0 with LayerNorm, 0.1 with RMSNorm
        grid: int = 100
        max_steps: int = 400
        search_samples: int = 64  # calibration samples for the statistics (official: 16 x 2048 tokens)
        down_proj: bool = True  # also migrate up_proj -> down_proj (scale only; gated MLPs)
        act_sym: bool = False
        weight_quant: bool = True  # RTN fake-quant of the weights inside the search
        loss_tokens: int = 1024  # tokens the loss is evaluated on (0 = all)
        loss_rows: int = 1024  # output features the loss is evaluated on, linear/gated (0 = all)
        down_loss: str = "mse"  # mse | normed: down_proj's token errors over the residual's mean square
        coarse: int = 16  # coarse grid points before the fine pass (0 = every grid point)
        patience: int = 4  # coarse points worse than the best before stopping early
        seed: int = 0

    def setup(self, sm) -> None:
        super().setup(sm)
        o = self.opts
        if o.down_loss not in ("mse", "normed"):
            raise ValueError(f"os+: down_loss must be mse or normed, got {o.down_loss!r}")
        if o.shift not in ("auto", "on", "off"):
            raise ValueError(f"os+: shift must be auto, on or off, got {o.shift!r}")
        if min(o.loss_tokens, o.loss_rows, o.coarse, o.patience) < 0 or o.search_samples < 1:
            raise ValueError("os+: loss_tokens, loss_rows, coarse, patience must be >= 0, search_samples >= 1")
        self.rms_shift = o.shift == "on" and not sm.lmap.norm_has_bias
        if self.rms_shift:
            if sm.lmap.arch != "llama":
                raise ValueError("os+: shift on RMSNorm needs explicit linear biases; supported for llama "
                                 "(config.attention_bias / mlp_bias) only")
            sm.config.attention_bias = True
            sm.config.mlp_bias = True

    def _groups(self, ctx: LayerContext):
        gs = [g for g in ctx.lmap.groups if g.prev_is_norm]
        if self.opts.down_proj and ctx.lmap.mlp_kind == "gated":
            gs += [g for g in ctx.lmap.groups if g.name == "mlp_out"]
        present = set(ctx.linears())
        return [g for g in gs if all(n in present for n in g.linears)]

    @torch.no_grad()
    def apply(self, ctx: LayerContext) -> None:
        if not ctx.batches:
            raise ValueError("os+ needs calibration data")
        o = self.opts
        d = getattr(self, "defaults", None)
        gran = getattr(d, "act_granularity", "token")
        act_q = make_act_quant(getattr(d, "act_bits", None), gran, o.act_sym)
        act_q.granularity = gran
        wspec = self.spec if o.weight_quant else None
        lb = o.lower_bound if o.lower_bound is not None else (1.0 if ctx.lmap.norm_has_bias else 0.1)
        batches = ctx.batches[:o.search_samples]
        groups = self._groups(ctx)
        subs: dict[str, SubModule] = {}
        resid = None
        for g in groups:
            if g.name not in subs:  # q/k/v alone; the MLP groups (gate/up, down_proj) with one partial forward
                later = [h for h in groups if h.name in ("mlp_in", "mlp_out")] if g.name == "mlp_in" else [g]
                new = [SubModule(ctx, h, None) for h in later]
                hk = None
                if g.name == "mlp_in" and o.down_loss == "normed":  # the residual stream down_proj writes to
                    resid = []
                    hk = ctx.module(g.prev).register_forward_pre_hook(lambda _m, a: resid.append(a[0].detach()))
                try:
                    SubModule.capture(new, batches)
                finally:
                    if hk is not None:
                        hk.remove()
                subs.update({h.name: sm for h, sm in zip(later, new)})
            sub = subs.pop(g.name)
            prev = ctx.module(g.prev)
            xs = [x.float() for x in sub.xs]
            lo = torch.stack([x.reshape(-1, x.shape[-1]).amin(0) for x in xs]).amin(0)
            hi = torch.stack([x.reshape(-1, x.shape[-1]).amax(0) for x in xs]).amax(0)
            z = None
            if g.prev_is_norm and o.shift != "off" and (ctx.lmap.norm_has_bias or self.rms_shift):
                zc = (hi + lo) / 2
                absorbed = fold_shift(prev, sub.lins, zc)
                assert absorbed or self.rms_shift
                z = None if absorbed else zc  # RMSNorm: applied on the inputs explicitly
                xs = [x - zc for x in xs]
                lo, hi = lo - zc, hi - zc
            res = resid if g.name == "mlp_out" else None
            probe = LossProbe(sub, xs, wspec, act_q, o.loss_tokens, o.loss_rows, seed=o.seed + ctx.index,
                              residual=res)
            s, t, info = search_scale(probe, torch.maximum(hi.abs(), lo.abs()), lb, o.grid, o.max_steps,
                                      o.coarse, o.patience)
            del probe, sub.xs
            fold_scale(prev, sub.lins, s, ctx.lmap.norm_offset if g.prev_is_norm else 0.0)
            if z is not None:  # RMSNorm: the linears' inputs are (X - z) / s = X / s - z / s
                shift = (z / s).float()
                for n, lin in zip(g.linears, sub.lins):
                    quantizer_of(lin).shift = shift
                    ctx.extra[f"{ctx.prefix}{n}.input_shift"] = shift.clone()
            ctx.stats[f"{g.name}.os_t"] = t
            ctx.stats[f"{g.name}.os_smax"] = float(s.max())
            ctx.stats[f"{g.name}.os_loss"] = info["loss"]
            ctx.stats[f"{g.name}.os_loss_noscale"] = info["loss_noscale"]
            ctx.stats[f"{g.name}.os_evals"] = info["evals"]
        if self.rms_shift:  # config says every attention / MLP linear has a bias
            for n in ctx.linears():
                if ctx.module(n).bias is None:
                    add_bias(ctx.module(n))

    def finalize(self, sm) -> dict:
        return export_spec(sm)
