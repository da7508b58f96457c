"""Per-architecture layer maps: where the decoder layers live, which linears share an input and which
norm (or linear) feeds them. The pipeline, passes and exporters read only this table, never fx traces.

A `LinearGroup` is one "sub-block" in true-sequential order: its linears read the same input tensor,
produced by `prev` (a norm for q/k/v and gate/up, a linear for o_proj / down_proj).
"""
from __future__ import annotations

from dataclasses import dataclass


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
    mlp_kind: str  # "gated" (act(gate)*up -> down) or "fc" (fc1 -> act -> fc2)

    def linears(self) -> list[str]:
        return [name for g in self.groups for name in g.linears]

    def group_of(self, linear: str) -> LinearGroup:
        for g in self.groups:
            if linear in g.linears:
                return g
        raise KeyError(linear)


_LLAMA_GROUPS = (
    LinearGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", True),
    LinearGroup("attn_out", ("self_attn.o_proj",), "self_attn.v_proj", False),
    LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", True),
    LinearGroup("mlp_out", ("mlp.down_proj",), "mlp.up_proj", False),
)


def _llama_like(arch: str) -> LayerMap:
    return LayerMap(arch, "model.layers", ("model.embed_tokens", "model.rotary_emb"), "model.norm", "lm_head",
                    _LLAMA_GROUPS, "self_attn", False, "gated")


LAYER_MAPS: dict[str, LayerMap] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
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


def layer_map_for(config) -> LayerMap:
    """Layer map for a transformers config; clear error for anything else."""
    mt = getattr(config, "model_type", None)
    from ptq import moe  # mixture-of-experts maps are built from the config (number of experts)

    if mt in moe.ARCHS:
        return moe.layer_map(config, LAYER_MAPS.get(moe.BASE_FAMILY[mt]) or LAYER_MAPS["llama"])
    if mt not in LAYER_MAPS:
        raise ValueError(f"unsupported architecture {mt!r}: ptq supports {', '.join(sorted(LAYER_MAPS))}")
    if mt == "opt" and not getattr(config, "do_layer_norm_before", True):
        raise ValueError("unsupported architecture: post-LayerNorm OPT (opt-350m style) is not supported")
    return LAYER_MAPS[mt]


def get_module(root, path: str):
    m = root
    for part in path.split("."):
        m = getattr(m, part)
    return m
