"""Per-architecture layer maps: where the decoder layers live, which linears share an input and which
norm (or linear) feeds them. The pipeline, passes and exporters read only this table, never fx traces.

A `LinearGroup` is one "sub-block" in true-sequential order: its linears read the same input tensor,
produced by `prev` (a norm for q/k/v and gate/up, a linear for o_proj / down_proj). Fused checkpoints (Phi-3
``qkv_proj``, ``gate_up_proj``) list the fused linear once: it is quantized as the checkpoint stores it.

Norm form: ``norm_offset`` is the constant added to the norm weight, ``y = x_hat * (norm_offset + w)``
(0 for Llama-style RMSNorm and LayerNorm, 1 for Gemma's ``(1 + w)`` RMSNorm); scale folding (OS+, SmoothQuant)
works on the effective scale ``norm_offset + w``.

Adding a family: docs/architectures.md.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LinearGroup:
    name: str  # attn_in | attn_out | mlp_in | mlp_out
    linears: tuple[str, ...]  # module paths relative to the decoder layer
    prev: str  # module that produces the shared input (norm or linear)
    prev_is_norm: bool
    stage: str = ""  # groups with the same non-empty stage are calibrated in one pass (MoE experts, ptq.moe)
    expert: int | None = None  # MoE: routed expert index, -1 for a shared expert, None for dense linears


@dataclass(frozen=True)
class LayerMap:
    arch: str
    layers: str  # path of the ModuleList of decoder layers
    embed: tuple[str, ...]  # modules run before layer 0
    final_norm: str
    lm_head: str
    groups: tuple[LinearGroup, ...]
    attn: str  # attention module inside a layer
    norm_has_bias: bool
    mlp_kind: str  # "gated" (act(gate)*up -> down), "gated_fused" (one gate_up linear) or "fc" (fc1 -> act -> fc2)
    norm_offset: float = 0.0  # y = x_hat * (norm_offset + w): 1.0 for Gemma's (1 + w) RMSNorm
    unsupported: tuple[tuple[str, str], ...] = ()  # (pass name, reason): refused before any work

    def linears(self) -> list[str]:
        return [name for g in self.groups for name in g.linears]

    def group_of(self, linear: str) -> LinearGroup:
        for g in self.groups:
            if linear in g.linears:
                return g
        raise KeyError(linear)

    def refusal(self, pass_name: str) -> str | None:
        """Why ``pass_name`` cannot run on this family (None if it can)."""
        return dict(self.unsupported).get(pass_name)


_LLAMA_GROUPS = (
    LinearGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", True),
    LinearGroup("attn_out", ("self_attn.o_proj",), "self_attn.v_proj", False),
    LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", True),
    LinearGroup("mlp_out", ("mlp.down_proj",), "mlp.up_proj", False),
)

# Gemma 2/3 sandwich norms: the MLP reads pre_feedforward_layernorm; post_attention_layernorm and
# post_feedforward_layernorm normalize the attention / MLP outputs before the residual adds.
_GEMMA_GROUPS = (
    LinearGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", True),
    LinearGroup("attn_out", ("self_attn.o_proj",), "self_attn.v_proj", False),
    LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "pre_feedforward_layernorm", True),
    LinearGroup("mlp_out", ("mlp.down_proj",), "mlp.up_proj", False),
)

_PHI3_GROUPS = (
    LinearGroup("attn_in", ("self_attn.qkv_proj",), "input_layernorm", True),
    LinearGroup("attn_out", ("self_attn.o_proj",), "self_attn.qkv_proj", False),
    LinearGroup("mlp_in", ("mlp.gate_up_proj",), "post_attention_layernorm", True),
    LinearGroup("mlp_out", ("mlp.down_proj",), "mlp.gate_up_proj", False),
)

_QK_NORM = "the q/k RMSNorm inside attention is not modelled by its attention code"
_GEMMA_NOT = (
    ("cskv", "soft-capping, query_pre_attn_scalar and q/k norms are not modelled by the CSKV attention"),
    ("double-sparsity", "the label-channel statistics ignore soft-capping and q/k norms"),
    ("udfc", "its moment propagation assumes pre-norm residual blocks and w (not 1 + w) norm scales"),
)
_PHI3_NOT = (
    ("cskv", "fused qkv_proj: the CSKV attention needs separate k_proj / v_proj"),
    ("double-sparsity", "fused qkv_proj: label channels need separate q_proj / k_proj"),
    ("udfc", "fused gate_up_proj: channel pruning of the fused linear is not implemented"),
)
_SLIDING_NOT = (
    ("cskv", "sliding-window layers: the compressed KV cache assumes full causal attention"),
    ("double-sparsity", "sliding-window layers: the sparse attention assumes full causal attention"),
)


def _decoder(arch: str, groups=_LLAMA_GROUPS, mlp_kind: str = "gated", **kw) -> LayerMap:
    return LayerMap(arch, "model.layers", ("model.embed_tokens", "model.rotary_emb"), "model.norm", "lm_head",
                    groups, "self_attn", False, mlp_kind, **kw)


LAYER_MAPS: dict[str, LayerMap] = {
    "llama": _decoder("llama"),
    "mistral": _decoder("mistral"),
    "qwen2": _decoder("qwen2"),
    "qwen3": _decoder("qwen3", unsupported=(("cskv", _QK_NORM), ("double-sparsity", _QK_NORM))),
    "gemma2": _decoder("gemma2", _GEMMA_GROUPS, norm_offset=1.0, unsupported=_GEMMA_NOT),
    "gemma3_text": _decoder("gemma3_text", _GEMMA_GROUPS, norm_offset=1.0, unsupported=_GEMMA_NOT),
    "phi3": _decoder("phi3", _PHI3_GROUPS, "gated_fused", unsupported=_PHI3_NOT),
    "opt": LayerMap(
        "opt", "model.decoder.layers", ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        "model.decoder.final_layer_norm", "lm_head",
        (
            LinearGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                        "self_attn_layer_norm", True),
            LinearGroup("attn_out", ("self_attn.out_proj",), "self_attn.v_proj", False),
            LinearGroup("mlp_in", ("fc1",), "final_layer_norm", True),
            LinearGroup("mlp_out", ("fc2",), "fc1", False),
        ),
        "self_attn", True, "fc"),
}


def has_sliding_layers(config) -> bool:
    """Layers of sliding-window type listed in ``config.layer_types`` (Qwen2/3 with max_window_layers, Gemma)."""
    return "sliding_attention" in (getattr(config, "layer_types", None) or [])


def layer_map_for(config) -> LayerMap:
    """Layer map for a transformers config; clear error for anything else."""
    mt = getattr(config, "model_type", None)
    from ptq import moe  # mixture-of-experts maps are built from the config (number of experts)

    if mt in moe.ARCHS:
        return moe.layer_map(config, LAYER_MAPS.get(moe.BASE_FAMILY[mt]) or LAYER_MAPS["llama"])
    if mt not in LAYER_MAPS:
        known = ", ".join(sorted([*LAYER_MAPS, *moe.ARCHS]))
        raise ValueError(f"unsupported architecture {mt!r}: ptq supports {known}; "
                         "docs/architectures.md says how to add a layer map for another family")
    if mt == "opt" and not getattr(config, "do_layer_norm_before", True):
        raise ValueError("unsupported architecture: post-LayerNorm OPT (opt-350m style) is not supported")
    lm = LAYER_MAPS[mt]
    extra = tuple(r for r in _SLIDING_NOT if lm.refusal(r[0]) is None) if has_sliding_layers(config) else ()
    return replace(lm, unsupported=lm.unsupported + extra) if extra else lm


def get_module(root, path: str):
    m = root
    for part in path.split("."):
        m = getattr(m, part)
    return m
