"""UDFC: unified data-free structured pruning + quantization with closed-form channel reconstruction
(Bai et al., ICCV 2023, arXiv 2308.07209), derived for transformer MLPs.  Reads no calibration data.

Per decoder layer (same channel count in every layer, so ``intermediate_size`` stays one number):

1. Fold the norm feeding the MLP into its input rows and describe every hidden channel ``h_k`` by weight
   statistics only (`ptq.passes.udfc_math`: Gaussian input model ``xhat ~ N(0, I_H)``, Stein linearization of the
   activation, Isserlis for ``act(g) * u``).
2. Score channels by expected output energy ``e_j = ||D_j||^2 E[h_j^2]`` and keep the top ``I - round(r I)``.
3. Quantize the kept gate/up (fc1) rows with RTN (``self.spec``), giving ``hhat``.
4. Reconstruct the next linear ``D = down_proj / fc2 [H, I]`` in closed form (paper Eq. 7-9, 17-18):
   ``D'_i = s'_i D_i + sum_{j -> i} s_j D_j`` with
   ``s'_i = K_a2(h_i, hhat_i) / K_a2(hhat_i, hhat_i)``, ``s_j = K_a1(h_j, hhat_i) / K_a1(hhat_i, hhat_i)``
   (``reconstruct=False``: just drop the columns).  A bias on D absorbs the mean shift exactly.
5. Replace gate/up/down (fc1/fc2) by smaller ``nn.Linear`` modules: ``[I', H]`` and ``[H, I']``; quantize D'.
6. Attention: RTN on q/k/v/o; the quantized v_proj channels get the linear-channel quantization term
   ``s'_k = W~_k.W~hat_k / ||W~hat_k||^2`` folded into the o_proj columns that read them (``attn_comp``).

The skeleton is built from the original config, so `StreamingModel.load_layer` materializes the original shapes;
`apply` then swaps in the smaller modules, and `setup` writes the pruned ``intermediate_size`` (``ffn_dim``
for OPT) into ``sm.config`` so the exported config.json matches.  ``quantize=False`` (the CLI's ``--bits 16``)
skips steps 3 and 6 (``s' = 1``); with ``prune_ratio=0`` too the pass is the identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ptq.layermap import get_module
from ptq.model_io import release
from ptq.pipeline import LayerContext, Pass
from ptq.quant.qweight import QuantizedWeight
from ptq.passes.udfc_math import (attn_moment, channels_from_mlp, energy_scores, kernel, linear_rescale,
                                  merge_by_cosine, normalized_moment, psd_sqrt, reconstruct, select_keep)

_INTER_ATTR = {"gated": "intermediate_size", "fc": "ffn_dim"}


def n_keep_for(total: int, ratio: float, round_to: int = 1) -> int:
    """Channels kept per layer: ``total - round(ratio * total)``, rounded up to a multiple of ``round_to``."""
    keep = total - int(round(ratio * total))
    keep = min(total, -(-keep // round_to) * round_to)
    return max(keep, 1)


class UDFCPass(Pass):
    name = "udfc"
    needs_calibration = False
    quantizes_weights = True

    @dataclass
    class Options:
        prune_ratio: float = 0.0  # fraction of MLP intermediate channels removed in every layer
        alpha1: float = 1.0  # weight of the mean term in the pruning loss (1 = exact under the Gaussian model)
        alpha2: float = 1.0  # weight of the mean term in the quantization loss
        reconstruct: bool = True  # closed-form compensation in the next layer (False = plain prune + RTN)
        prune_heads: bool = False  # attention-head pruning: not implemented (raises)
        quantize: bool = True  # False = keep fp weights (CLI --bits 16)
        # pair: one partner per pruned channel (the paper's form); lstsq: all remaining channels at once;
        # auto: pair for gated MLPs (Llama family), lstsq for fc MLPs (OPT/BERT), the family defaults that the
        # held-in (Jane Austen) choice of bench/udfc_smollm2.py supports (docs/udfc.md);
        # merge: baseline without the closed form (Neuron Merging: cosine partner, norm-ratio scale, no s')
        mode: str = "auto"
        merge_threshold: float = 0.3  # merge only: pruned channels whose best cosine is below this are dropped
        ridge: float = 1e-3  # lstsq only: ridge, relative to the mean diagonal of K
        attn_comp: bool = True  # quantization term for v_proj channels folded into o_proj columns
        round_to: int = 1  # kept channel count rounded up to a multiple of this (kernel-friendly shapes)
        input_model: str = "propagate"  # propagate: weight-only second-moment propagation | isotropic: xhat ~ N(0, I)

        def __post_init__(self):
            self.validate()

        def validate(self):
            if not 0.0 <= float(self.prune_ratio) < 1.0:
                raise ValueError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}")
            if self.mode not in ("auto", "pair", "lstsq", "merge"):
                raise ValueError(f"mode must be 'auto', 'pair', 'lstsq' or 'merge', got {self.mode!r}")
            if self.alpha1 < 0 or self.alpha2 < 0 or self.ridge < 0:
                raise ValueError("alpha1, alpha2 and ridge must be >= 0")
            if self.input_model not in ("propagate", "isotropic"):
                raise ValueError(f"input_model must be 'propagate' or 'isotropic', got {self.input_model!r}")
            if self.round_to < 1:
                raise ValueError("round_to must be >= 1")
            if self.prune_heads:
                raise ValueError("udfc: prune_heads is not implemented yet (only MLP channels are pruned)")

    def setup(self, sm) -> None:
        self.opts.validate()  # CLI --set overrides bypass __post_init__
        kind = sm.lmap.mlp_kind
        attr = _INTER_ATTR[kind]
        self.total = int(getattr(sm.config, attr))
        self.n_keep = n_keep_for(self.total, self.opts.prune_ratio, self.opts.round_to)
        setattr(sm.config, attr, self.n_keep)  # exported config.json describes the pruned model
        self.M, self.sm, self._next = None, sm, 0
        if self.opts.input_model == "propagate":
            self.M = self._embedding_moment(sm)

    @staticmethod
    def _embedding_moment(sm) -> torch.Tensor | None:
        """``M_0 = mean_v e_v e_v^T [H, H]`` over the (already materialized) embedding tables."""
        H = sm.config.hidden_size
        M = None
        for path in sm.lmap.embed:
            w = getattr(get_module(sm.model, path), "weight", None)
            if w is None or w.dim() != 2 or w.shape[1] != H or w.is_meta:
                continue
            m = w.data.double().T @ w.data.double() / w.shape[0]
            M = m if M is None else M + m
        return M

    # ------------------------------------------------------------------------------------------------------
    def _quant(self, ctx: LayerContext, path: str, w: torch.Tensor) -> torch.Tensor:
        """RTN-quantize ``w [N, K]`` for module ``path``; records the QuantizedWeight; returns the dequantized."""
        if not self.opts.quantize or self.spec is None:
            return w
        qw = QuantizedWeight.from_float(w, self.spec)
        qw.meta["udfc"] = True
        ctx.qweights[ctx.prefix + path] = qw
        return qw.dequantize().to(w.dtype)

    @torch.no_grad()
    def apply(self, ctx: LayerContext) -> None:
        if not hasattr(self, "n_keep"):
            raise RuntimeError("UDFCPass.setup(sm) must run before apply")
        L_attn = L_mlp = None
        cache = getattr(self, "moment_cache", None)  # {layer: (L_attn, L_mlp)}: they depend on the original weights only
        if self.M is not None and cache is not None and ctx.index in cache:
            L_attn, L_mlp = cache[ctx.index]
        elif self.M is not None:  # weight-only second-moment propagation (udfc_math), from the original weights
            while self._next < ctx.index:  # resumed run: replay the skipped layers' moments (original weights)
                j = self._next
                self._moment_step(self.sm.load_layer(j), ctx.lmap, ctx.config)
                release(self.sm.layers[j])
            L_attn, L_mlp = self._moment_step(ctx.layer, ctx.lmap, ctx.config)
            if cache is not None:
                cache[ctx.index] = (L_attn, L_mlp)
        self._attention(ctx, L_attn)
        self._mlp(ctx, L_mlp)

    def _moment_step(self, layer, lmap, config):
        """Advance ``self.M`` over one original layer; returns the whitening ``L`` before attention and MLP."""
        center = lmap.norm_has_bias  # LayerNorm subtracts the mean, RMSNorm does not
        mod = lambda n: get_module(layer, n)  # noqa: E731
        g = {gr.name: gr for gr in lmap.groups}
        Mh = normalized_moment(self.M, center)
        L_attn = psd_sqrt(Mh)
        v, o = mod(g["attn_in"].linears[2]), mod(g["attn_out"].linears[0])
        gamma = getattr(mod(g["attn_in"].prev), "weight", None)
        self.M = self.M + attn_moment(v.weight.data, o.weight.data, gamma, Mh, config.num_attention_heads)
        L_mlp = psd_sqrt(normalized_moment(self.M, center))
        ins = [mod(n) for n in g["mlp_in"].linears]
        norm = mod(g["mlp_in"].prev)
        ch = channels_from_mlp(ins[0].weight.data, ins[1].weight.data if lmap.mlp_kind == "gated" else None,
                               getattr(norm, "weight", None), getattr(norm, "bias", None),
                               ins[0].bias.data if ins[0].bias is not None else None, _act_name(config), L_mlp)
        D = mod(g["mlp_out"].linears[0]).weight.data.double()
        self.M = self.M + D @ kernel(ch, ch, 1.0, matched=True) @ D.T
        self._next += 1
        return L_attn, L_mlp

    def _mlp(self, ctx: LayerContext, L: torch.Tensor | None = None) -> None:
        o = self.opts
        g_in = next(g for g in ctx.lmap.groups if g.name == "mlp_in")
        g_out = next(g for g in ctx.lmap.groups if g.name == "mlp_out")
        gated = ctx.lmap.mlp_kind == "gated"
        ins = [ctx.module(n) for n in g_in.linears]  # gate, up  |  fc1
        down = ctx.module(g_out.linears[0])
        norm = ctx.module(g_in.prev)
        gamma = getattr(norm, "weight", None)
        beta = getattr(norm, "bias", None)
        act = _act_name(ctx.config)
        w_in, w_up = ins[0].weight.data, (ins[1].weight.data if gated else None)
        b_in = ins[0].bias.data if ins[0].bias is not None else None
        ch = channels_from_mlp(w_in, w_up, gamma, beta, b_in, act, L)
        D = down.weight.data
        keep = select_keep(energy_scores(D, ch, o.alpha1), self.n_keep)
        # quantize the kept input rows -> hhat
        new_in = []
        for n, lin in zip(g_in.linears, ins):
            w = self._quant(ctx, n, lin.weight.data[keep])
            new_in.append((n, lin, w))
        ch_hat = None
        if o.quantize and self.spec is not None:
            ch_hat = channels_from_mlp(new_in[0][2], new_in[1][2] if gated else None, gamma, beta,
                                       None if b_in is None else b_in[keep], act, L)
        has_bias = down.bias is not None
        if o.reconstruct:
            mode = o.mode if o.mode != "auto" else ("pair" if gated else "lstsq")
            ctx.stats["udfc.mode_lstsq"] = float(mode == "lstsq")
            if mode == "merge":
                gf = torch.ones(w_in.shape[1]) if gamma is None else gamma.data.float()
                rec = merge_by_cosine(D, w_in.float() * gf, None if w_up is None else w_up.float() * gf, keep,
                                      o.merge_threshold)
            else:
                rec = reconstruct(D, ch, keep, ch_hat, o.alpha1, o.alpha2, mode, o.ridge, has_bias)
            newD, bias_delta = rec.D, rec.bias_delta
            if rec.s is not None:
                ctx.stats["udfc.s_abs_mean"] = float(rec.s.abs().mean())
            if rec.s_q is not None:
                ctx.stats["udfc.sq_mean"] = float(rec.s_q.mean())
        else:
            newD, bias_delta = D[:, keep].clone(), None
        newD = self._quant(ctx, g_out.linears[0], newD)
        # swap in the smaller modules
        for n, lin, w in new_in:
            b = lin.bias.data[keep] if lin.bias is not None else None
            _replace(ctx.layer, n, _linear(w, b))
        b_out = None
        if has_bias:
            b_out = down.bias.data + (bias_delta if bias_delta is not None else 0)
        _replace(ctx.layer, g_out.linears[0], _linear(newD, b_out))
        mlp = get_module(ctx.layer, g_in.linears[0].rsplit(".", 1)[0]) if "." in g_in.linears[0] else None
        if mlp is not None and hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = self.n_keep
        ctx.stats["udfc.kept"] = int(self.n_keep)
        ctx.stats["udfc.pruned"] = int(self.total - self.n_keep)

    def _attention(self, ctx: LayerContext, L: torch.Tensor | None = None) -> None:
        if not self.opts.quantize or self.spec is None:
            return
        g_in = next(g for g in ctx.lmap.groups if g.name == "attn_in")
        g_out = next(g for g in ctx.lmap.groups if g.name == "attn_out")
        gamma = getattr(ctx.module(g_in.prev), "weight", None)
        v_name = g_in.linears[2]
        for n in g_in.linears:
            lin = ctx.module(n)
            w = lin.weight.data
            wq = self._quant(ctx, n, w)
            if n == v_name and self.opts.attn_comp and self.opts.reconstruct and self.opts.mode != "merge":
                beta = getattr(ctx.module(g_in.prev), "bias", None)
                m = (w @ beta if beta is not None else 0) + (lin.bias.data if lin.bias is not None else 0)
                s = linear_rescale(w, wq, gamma, m if torch.is_tensor(m) else None, self.opts.alpha2, L)
                o_lin = ctx.module(g_out.linears[0])
                o_lin.weight.data = o_lin.weight.data * _o_cols(s, ctx.config, o_lin.weight.shape[1]).to(w.dtype)[None]
                ctx.stats["udfc.v_sq_mean"] = float(s.mean())
            lin.weight.data = wq
        o_lin = ctx.module(g_out.linears[0])
        o_lin.weight.data = self._quant(ctx, g_out.linears[0], o_lin.weight.data)


def _o_cols(s_v: torch.Tensor, config, k_o: int) -> torch.Tensor:
    """Map per-v-channel scales ``[n_kv * hd]`` to o_proj input columns ``[n_heads * hd]`` (GQA repeats kv heads)."""
    n_heads = config.num_attention_heads
    hd = k_o // n_heads
    n_kv = s_v.numel() // hd
    rep = n_heads // n_kv
    return s_v.reshape(n_kv, 1, hd).expand(n_kv, rep, hd).reshape(-1)


def _act_name(config) -> str:
    return getattr(config, "hidden_act", None) or getattr(config, "activation_function", "relu")


def _linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    lin.weight.data = w.contiguous()
    if b is not None:
        lin.bias.data = b.contiguous()
    return lin


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(get_module(root, parent) if parent else root, leaf, new)


@torch.no_grad()
def udfc_full_model(src, spec, moment_cache: dict | None = None, **options):
    """Whole model in memory with UDFC applied to every layer (small models: tests and benches).
    ``moment_cache``: a dict shared across calls on the same checkpoint keeps the propagated input moments.
    Returns ``(model, config, qweights)``; the model runs in transformers as is (config updated)."""
    from ptq.model_io import StreamingModel

    sm = StreamingModel.open(str(src))
    p = UDFCPass(UDFCPass.Options(**options), spec)
    p.setup(sm)
    p.moment_cache = moment_cache
    qweights = {}
    for i in range(len(sm.layers)):
        ctx = LayerContext(i, sm.load_layer(i), sm.layer_prefix(i), sm.lmap, sm.config, [], spec)
        p.apply(ctx)
        qweights.update(ctx.qweights)
    sm.head()
    if sm.tied and hasattr(sm.model, "tie_weights"):
        sm.model.tie_weights()
    return sm.model.eval(), sm.config, qweights
