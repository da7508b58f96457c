"""Mixture-of-experts decoder layers (Mixtral, Qwen2-MoE, Qwen3-MoE) as per-expert ``nn.Linear`` modules.

transformers 5 keeps a layer's experts as fused 3D parameters (``experts.gate_up_proj [E, 2I, H]``,
``experts.down_proj [E, H, I]``) and converts the hub's per-expert tensors into them on load. ptq instead swaps
each sparse-MoE block of the meta skeleton for `SparseMoE`, whose modules carry the checkpoint's own names:

  Mixtral     ``block_sparse_moe.gate`` (router ``[E, H]``), ``block_sparse_moe.experts.{e}.w1 / w3 / w2``
              (gate / up ``[I, H]``, down ``[H, I]``)
  Qwen2/3-MoE ``mlp.gate``, ``mlp.experts.{e}.gate_proj / up_proj / down_proj``; Qwen2-MoE adds
              ``mlp.shared_expert.{gate,up,down}_proj`` and ``mlp.shared_expert_gate`` (``[1, H]``)

so every expert linear is an ordinary layer-map entry: RTN and GPTQ quantize it like any other linear, a GPTQ
forward hook on expert ``e`` sees exactly the tokens the router sends to ``e``, and every exporter writes the
checkpoint's names (which transformers converts back to its fused layout on load). Checkpoints saved in the
fused layout are read through `FusedExpertsView` and exported per expert.

Forward (equal to transformers'): router probabilities ``p = softmax(x Wg^T)`` (fp32), top-k experts per token,
weights ``p_topk`` (renormalized to sum 1 for Mixtral and when ``norm_topk_prob``), output
``y = sum_{e in topk(x)} p_e * W2_e (act(W1_e x) * W3_e x)`` (+ ``sigmoid(x Ws^T) * shared(x)`` for Qwen2-MoE).
The routers and the shared-expert gate stay unquantized (they are not in the layer map).

Experts the router starves: GPTQ quantizes a linear whose Hessian saw fewer than ``gptq.min_tokens`` tokens
with RTN instead (see ptq.passes.gptq); the per-layer report lists ``moe.routed_tokens`` (tokens per expert)
and ``moe.fallback_experts`` (experts that fell back).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

# Imports nothing from ptq: the layer map (ptq.layermap) and the loader (ptq.model_io) call into this module.

MOE_PASSES = ("rtn", "gptq")  # passes tested on MoE layers; the rest refuse them (docs/architectures.md)
_FOLD = "one norm feeds the router and every expert; folding a channel scale would need it in all of them"
_UNTESTED = "not validated on mixture-of-experts layers"
REFUSALS = (("os+", _FOLD), ("smoothquant", _FOLD), ("act-quant", _UNTESTED), ("nupes", _UNTESTED),
            ("nupes-df", _UNTESTED), ("udfc", "channel pruning models one MLP per layer, not experts"),
            ("cskv", _UNTESTED), ("double-sparsity", _UNTESTED))  # LayerMap.unsupported, where the map has it


@dataclass(frozen=True)
class MoEArch:
    model_type: str
    block: str  # module name of the sparse block in the checkpoint (and in our skeleton)
    names: tuple[str, str, str]  # expert gate, up, down linear names
    num_experts: str  # config attribute
    intermediate: str  # config attribute of the expert width
    shared: bool  # Qwen2-MoE shared expert + sigmoid gate
    fp32_weights: bool  # Mixtral keeps the routing weights fp32; Qwen casts them to the logits dtype

    def renormalize(self, config) -> bool:
        return True if self.model_type == "mixtral" else bool(getattr(config, "norm_topk_prob", False))

    def is_sparse(self, config, i: int) -> bool:
        """Whether decoder layer ``i`` is a sparse-MoE layer (Qwen: ``mlp_only_layers`` / ``decoder_sparse_step``)."""
        if self.model_type == "mixtral":
            return True
        only = getattr(config, "mlp_only_layers", None) or []
        step = getattr(config, "decoder_sparse_step", 1) or 1
        return i not in only and config.num_experts > 0 and (i + 1) % step == 0


ARCHS: dict[str, MoEArch] = {
    "mixtral": MoEArch("mixtral", "block_sparse_moe", ("w1", "w3", "w2"), "num_local_experts",
                       "intermediate_size", False, True),
    "qwen2_moe": MoEArch("qwen2_moe", "mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts",
                         "moe_intermediate_size", True, False),
    "qwen3_moe": MoEArch("qwen3_moe", "mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts",
                         "moe_intermediate_size", False, False),
}


def moe_arch(config) -> MoEArch | None:
    return ARCHS.get(getattr(config, "model_type", None))


# ---- modules ---------------------------------------------------------------------------------------------------


class GatedExpert(nn.Module):
    """``down(act(gate(x)) * up(x))`` with the checkpoint's linear names; ``x [t, H] -> [t, H]``."""

    def __init__(self, hidden: int, inter: int, act, names: tuple[str, str, str]):
        super().__init__()
        self.names = names
        g, u, d = names
        setattr(self, g, nn.Linear(hidden, inter, bias=False))
        setattr(self, u, nn.Linear(hidden, inter, bias=False))
        setattr(self, d, nn.Linear(inter, hidden, bias=False))
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u, d = (getattr(self, n) for n in self.names)
        return d(self.act_fn(g(x)) * u(x))


class SparseMoE(nn.Module):
    """Top-k routed experts (+ optional shared expert) on ``hidden [b, L, H]``; see the module docstring."""

    def __init__(self, config, arch: MoEArch):
        super().__init__()
        from transformers.activations import ACT2FN

        H = config.hidden_size
        E = getattr(config, arch.num_experts)
        act = ACT2FN[config.hidden_act]
        self.arch, self.top_k, self.num_experts = arch, config.num_experts_per_tok, E
        self.renormalize = arch.renormalize(config)
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(GatedExpert(H, getattr(config, arch.intermediate), act, arch.names)
                                     for _ in range(E))
        if arch.shared:
            self.shared_expert = GatedExpert(H, config.shared_expert_intermediate_size, act,
                                             ("gate_proj", "up_proj", "down_proj"))
            self.shared_expert_gate = nn.Linear(H, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [t, H]`` -> (weights ``[t, k]``, expert ids ``[t, k]``)."""
        logits = self.gate(x)
        probs = torch.softmax(logits.float(), dim=-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return (w if self.arch.fp32_weights else w.to(logits.dtype)), idx

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        w, idx = self.route(x)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):  # ascending expert order, as transformers adds them
            tok, pos = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            y = self.experts[e](x[tok]) * w[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        if self.arch.shared:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


def _aliased(cls: type, alias: str, target: str) -> type:
    """Subclass of a decoder-layer class whose ``alias`` attribute (what its forward calls) is ``target``."""
    return type(cls.__name__, (cls,), {alias: property(lambda self: getattr(self, target)),
                                       "__module__": cls.__module__})


def install(model: nn.Module, config) -> None:
    """Swap every sparse-MoE block of a (meta) skeleton for `SparseMoE` under the checkpoint's module name.
    Dense layers (Qwen ``mlp_only_layers``) keep their ``mlp`` (gate_proj / up_proj / down_proj)."""
    arch = moe_arch(config)
    if arch is None:
        return
    layers = model.model.layers
    device = next(model.parameters()).device
    for i, layer in enumerate(layers):
        if not arch.is_sparse(config, i):
            continue
        with torch.device(device):
            block = SparseMoE(config, arch)
        del layer._modules["mlp"]
        if arch.block != "mlp":  # forward calls self.mlp; the module is registered under the checkpoint name
            layer.__class__ = _aliased(type(layer), "mlp", arch.block)
        layer.add_module(arch.block, block)


# ---- layer map --------------------------------------------------------------------------------------------------


BASE_FAMILY = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}  # dense map to start from


def layer_map(config, base):
    """Layer map of an MoE model, built from the dense map ``base`` (attention groups, paths) of its family.

    Groups (``LinearGroup``, the class of ``base.groups``): attention as ``base``; per expert ``e`` an
    ``expert{e}_in`` group (gate+up, fed by post_attention_layernorm, ``stage="moe_in"``, ``expert=e``) and
    ``expert{e}_out`` (down, ``stage="moe_out"``); the shared expert likewise (``expert=-1``); the dense
    ``mlp_in``/``mlp_out`` groups of ``base`` for Qwen's dense layers. Groups of one stage are calibrated in one
    pass over the data, each with its own Hessian."""
    Group = type(base.groups[0])
    arch = moe_arch(config)
    E = getattr(config, arch.num_experts)
    g, u, d = arch.names
    b = arch.block
    groups = [x for x in base.groups if x.name.startswith("attn")]
    for e in range(E):
        p = f"{b}.experts.{e}"
        groups += [Group(f"expert{e}_in", (f"{p}.{g}", f"{p}.{u}"), "post_attention_layernorm", True, stage="moe_in",
                         expert=e),
                   Group(f"expert{e}_out", (f"{p}.{d}",), f"{p}.{u}", False, stage="moe_out", expert=e)]
    if arch.shared:
        p = f"{b}.shared_expert"
        groups += [Group("shared_in", (f"{p}.gate_proj", f"{p}.up_proj"), "post_attention_layernorm", True,
                         stage="moe_in", expert=-1),
                   Group("shared_out", (f"{p}.down_proj",), f"{p}.up_proj", False, stage="moe_out", expert=-1)]
    if arch.model_type != "mixtral":
        groups += [x for x in base.groups if x.name.startswith("mlp")]
    kw = {"unsupported": REFUSALS} if "unsupported" in {f.name for f in dataclasses.fields(base)} else {}
    return dataclasses.replace(base, arch=arch.model_type, groups=tuple(groups), mlp_kind="moe", **kw)


def expert_of(lmap, linear: str) -> int | None:
    """Routed-expert index of ``linear`` (None for dense and shared-expert linears)."""
    try:
        g = lmap.group_of(linear)
    except KeyError:
        return None
    e = getattr(g, "expert", None)
    return e if e is not None and e >= 0 else None


def check_passes(lmap, pass_names) -> None:
    """Refuse passes not validated on MoE layers (they assume one MLP per norm)."""
    if lmap.mlp_kind != "moe":
        return
    bad = [p for p in pass_names if p not in MOE_PASSES]
    if bad:
        raise ValueError(f"pass(es) {', '.join(bad)} do not support mixture-of-experts models ({lmap.arch}); "
                         f"use {' or '.join(MOE_PASSES)} (see docs/architectures.md)")


def note_expert(ctx, linear: str, tokens: int, fallback: bool) -> None:
    """Report the tokens routed to the expert of ``linear`` (``moe.routed_tokens [E]``) and a fallback."""
    e = expert_of(ctx.lmap, linear)
    if e is None:
        return
    counts = ctx.stats.setdefault("moe.routed_tokens", [0] * getattr(ctx.config, moe_arch(ctx.config).num_experts))
    counts[e] = int(tokens)
    if fallback:
        fb = ctx.stats.setdefault("moe.fallback_experts", [])
        if e not in fb:
            fb.append(e)
        ctx.stats["moe.fallback_linears"] = ctx.stats.get("moe.fallback_linears", 0) + 1


# ---- fused on-disk layout -----------------------------------------------------------------------------------------


class FusedExpertsView:
    """A `ptq.model_io.WeightSource` (keys / get / in) over a checkpoint saved in transformers' fused layout
    (``mlp.experts.gate_up_proj [E, 2I, H]`` gate rows first, ``mlp.experts.down_proj [E, H, I]``; Mixtral also
    ``mlp.gate``) that presents the per-expert names `SparseMoE` expects. Keeps the last fused tensor read."""

    FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

    def __init__(self, inner, arch: MoEArch, num_experts: int):
        self.inner, self.arch = inner, arch
        self._map: dict[str, tuple[str, int | None, int | None]] = {}  # our key -> (inner key, expert, half)
        g, u, d = arch.names
        keys = []
        for k in inner.keys():
            fused = next((f for f in self.FUSED if k.endswith("." + f)), None)
            if fused is not None:
                base = k[: -len(fused)] + arch.block + ".experts."
                for e in range(num_experts):
                    if fused.endswith("gate_up_proj"):
                        self._map[f"{base}{e}.{g}.weight"] = (k, e, 0)
                        self._map[f"{base}{e}.{u}.weight"] = (k, e, 1)
                    else:
                        self._map[f"{base}{e}.{d}.weight"] = (k, e, None)
                continue
            if arch.block != "mlp" and ".mlp." in k:  # Mixtral's router: mlp.gate -> block_sparse_moe.gate
                ours = k.replace(".mlp.", f".{arch.block}.")
                self._map[ours] = (k, None, None)
                k = ours
            keys.append(k)
        self._keys = keys + [k for k, v in self._map.items() if v[1] is not None]
        self._keyset = set(self._keys)
        self._cache: tuple[str, torch.Tensor] | None = None

    @classmethod
    def applies(cls, source) -> bool:
        return any(k.endswith("." + cls.FUSED[0]) for k in source.keys())

    def keys(self):
        return list(self._keys)

    def __contains__(self, name):
        return name in self._keyset

    def get(self, name):
        if name not in self._map:
            return self.inner.get(name)
        key, e, half = self._map[name]
        if e is None:
            return self.inner.get(key)
        if self._cache is None or self._cache[0] != key:
            self._cache = None  # drop the previous layer's tensor before reading the next
            self._cache = (key, self.inner.get(key))
        t = self._cache[1][e]
        if half is not None:
            i = t.shape[0] // 2
            t = t[i * half:i * (half + 1)]
        return t.clone()

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


def per_expert_source(config, source):
    """``source`` itself, or a `FusedExpertsView` of it when the checkpoint stores fused experts."""
    arch = moe_arch(config)
    if arch is None or not FusedExpertsView.applies(source):
        return source
    return FusedExpertsView(source, arch, getattr(config, arch.num_experts))
