"""Double Sparsity (Yang et al., arXiv 2408.07092): offline label channels + top-k token sparse attention.

Offline (`ChannelStats`): per head h and channel c, over every calibration token t (all batches)::

    qk[h, c] = mean_t |q_t[h, c] * k_t[h, c]|      (post-RoPE, GQA keys repeated to the query heads)
    q[h, c]  = mean_t |q_t[h, c]|,  k[g, c] = mean_t |k_t[g, c]|   (pre-RoPE, as in the reference)

The label channels of a head are its channels sorted by that statistic, descending (``labels [rows, d]``).
``qk_kv`` sums ``qk`` over the query heads of one KV group, so all heads of a group share one label set and the
label cache is ``[kv_heads, S, r]`` (an extension: the reference ranks per query head).

Run time (`double_sparse_attention`), for one layer, query ``q [b, H, Lq, d]``, keys/values ``[b, Hkv, Lk, d]``::

    s~ = Q4(q[..., C_h]) Q4(K[..., C_h])^T            C_h = labels[h, :r]; Q4 = per-vector min/max fake-quant
    T  = top-k_j (s~ + causal mask)                   per query and head
    o  = softmax((q K^T * scaling + mask)|_T) V       exact attention restricted to the kept tokens T

Layers below ``dense_layers``, sequences with ``Lk <= sparse_threshold`` (or ``Lk <= k``) and, with
``sparse_prefill=False``, multi-token forwards (prefill) run dense sdpa.
`install` registers the transformers attention implementation ``"ptq_double_sparsity"`` and attaches
``ds_labels`` / ``ds_cfg`` to each attention module.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from ptq.sparse.ds_runtime import LABEL_ATTR, DSCache, fake_quant, kv_label_channels, sparse_decode, union_rows

IMPL = "ptq_double_sparsity"
OURS = "double_sparsity.json"
SGLANG = "ds_channel_config.json"
CHANNEL_TYPES = ("qk", "qk_kv", "q", "k")
SELECTIONS = ("kv", "head", "query-labels")
LABEL_LAYOUTS = ("auto", "per-head", "union")


@dataclass
class DSConfig:
    heavy_tokens: int = 256  # k: tokens kept per query and head
    heavy_channels: int = 16  # r: label channels (0 -> head_dim // 4)
    label_bits: int = 16  # 32 = unrounded (fp32; fp16/bf16 keys: their dtype), 16 = fp16; 4 = the paper's 4-bit
    dense_layers: int = 2  # layers [0, dense_layers) stay dense
    sparse_threshold: int = 0  # sparse only when the key length Lk > threshold
    channel_type: str = "qk"
    sparse_prefill: bool = True  # False: queries of a multi-token forward run dense (SGLang: sparse decode only)
    q_chunk: int = 512  # study path: queries per block in prefill (memory ~ b*H*q_chunk*Lk)
    selection: str = "query-labels"  # query-labels: each query head's own label channels and top-k (the
    #   reference; label cache [H, r] or union [Hkv, U] per token) | head: KV-head channels, a top-k per query
    #   head | kv: KV-head channels, one top-k per KV head shared by its query heads (group scores summed)
    study: bool = False  # forwards WITHOUT a DSCache (perplexity) run the accuracy-study path; else dense
    label_layout: str = "auto"  # query-labels with fp labels: per-head [H, r] rows | union [Hkv, U] rows per KV
    #   head (same scores) | auto: union where it holds at most 2/3 of the per-head label bytes (channels overlap)

    @classmethod
    def from_dict(cls, d: dict) -> "DSConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------------------- calibration
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [b, heads, L, d]``, ``cos/sin [b, L, d]`` (Llama convention, pairs (c, c + d/2))."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class ChannelStats:
    """Running sums of |q|, |k| (pre-RoPE) and |q*k| (post-RoPE) per head/channel over ALL calibration tokens.

    (The reference overwrites the qk statistic with every batch; here every batch is accumulated.)"""

    def __init__(self, heads: int, kv_heads: int, head_dim: int):
        self.h, self.kvh, self.d = heads, kv_heads, head_dim
        self.q = torch.zeros(heads, head_dim, dtype=torch.float64)
        self.k = torch.zeros(kv_heads, head_dim, dtype=torch.float64)
        self.qk = torch.zeros(heads, head_dim, dtype=torch.float64)
        self.tokens = 0

    @torch.no_grad()
    def update(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor | None = None,
               sin: torch.Tensor | None = None) -> None:
        """``q [b, L, H*d]``, ``k [b, L, Hkv*d]`` projections (pre-RoPE); ``cos/sin [b, L, d]`` or None (no RoPE)."""
        b, L = q.shape[:2]
        q4 = q.float().view(b, L, self.h, self.d).transpose(1, 2)
        k4 = k.float().view(b, L, self.kvh, self.d).transpose(1, 2)
        self.q += q4.abs().sum((0, 2)).double()
        self.k += k4.abs().sum((0, 2)).double()
        if cos is not None:
            q4, k4 = apply_rope(q4, cos.float(), sin.float()), apply_rope(k4, cos.float(), sin.float())
        k4 = k4.repeat_interleave(self.h // self.kvh, dim=1)
        self.qk += (q4 * k4).abs().sum((0, 2)).double()
        self.tokens += b * L

    def means(self) -> dict[str, torch.Tensor]:
        n = max(self.tokens, 1)
        qk = self.qk / n
        return {"q": self.q / n, "k": self.k / n, "qk": qk,
                "qk_kv": qk.view(self.kvh, self.h // self.kvh, self.d).sum(1)}

    def labels(self) -> dict[str, torch.Tensor]:
        """channel type -> ``[rows, d]`` channel indices, most important first."""
        return {t: rank_channels(v) for t, v in self.means().items()}


def rank_channels(stat: torch.Tensor) -> torch.Tensor:
    """``stat [rows, d]`` -> indices sorted by descending importance (stable for ties)."""
    return torch.sort(stat, dim=-1, descending=True, stable=True).indices


def random_labels(rows: int, head_dim: int, seed: int = 0) -> torch.Tensor:
    """Baseline: a random channel permutation per row."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(head_dim, generator=g) for _ in range(rows)])


# --------------------------------------------------------------------------------------------- runtime
def fake_quant_labels(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric per-vector min/max fake quantization over the last dim (reference ``pseudo_quantize``; a zero
    range is replaced by 1), with step and minimum rounded to fp16 as the run-time label cache stores them."""
    return fake_quant(x, bits)


def label_channels(labels: torch.Tensor, r: int, heads: int) -> torch.Tensor:
    """``labels [rows, d]`` (rows = heads or kv heads) -> the first r channels per query head ``[heads, r]``."""
    ch = labels[:, :r]
    if ch.shape[0] != heads:
        ch = ch.repeat_interleave(heads // ch.shape[0], dim=0)
    return ch


def gather_channels(x: torch.Tensor, ch: torch.Tensor) -> torch.Tensor:
    """``x [b, H, L, d]``, ``ch [H, r]`` -> ``[b, H, L, r]``."""
    b, H, L, _ = x.shape
    return x.gather(-1, ch[None, :, None, :].expand(b, H, L, ch.shape[1]))


def _allowed_and_bias(mask, b, Lq, Lk, device, dtype):
    """Normalize a transformers mask (None = causal aligned at the end, bool True = attend, float additive)
    to ``allowed [b|1, 1|H, Lq, Lk]`` bool and an additive ``bias`` (or None)."""
    if mask is None:
        i = torch.arange(Lq, device=device)[:, None] + (Lk - Lq)
        return (torch.arange(Lk, device=device)[None, :] <= i)[None, None], None
    if mask.dtype == torch.bool:
        return mask[..., :Lk], None
    m = mask[..., :Lk]
    return m > torch.finfo(m.dtype).min / 2, m.to(dtype)


@torch.no_grad()
def double_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, labels: torch.Tensor,
                            cfg: DSConfig, scaling: float | None = None,
                            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k token sparse attention with label-channel score approximation.

    ``query [b, H, Lq, d]``, ``key/value [b, Hkv, Lk, d]`` (post-RoPE), ``labels [H or Hkv, d]``.
    Returns ``[b, H, Lq, d]``. Decode (``Lq == 1``) gathers the kept K/V rows; prefill masks the exact scores.
    """
    b, H, Lq, d = query.shape
    Lk = key.shape[2]
    groups = H // key.shape[1]
    scaling = d**-0.5 if scaling is None else scaling
    r = cfg.heavy_channels or d // 4
    k_keep = min(cfg.heavy_tokens, Lk)
    kr = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    vr = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    if cfg.selection == "query-labels":
        ch = label_channels(labels.to(query.device), r, H)
    else:  # the run time's channels: one set per KV head (ds_runtime.kv_label_channels)
        ch = kv_label_channels(labels, key.shape[1], r).to(query.device).repeat_interleave(groups, 0)
    q_lab = fake_quant(gather_channels(query, ch).float(), cfg.label_bits)
    k_lab = gather_channels(kr, ch).float()
    if cfg.label_bits == 16:  # as cached: fp16, 2..8-bit codes, or fp32 as is
        k_lab = k_lab.half().float()
    elif cfg.label_bits < 16:
        k_lab = fake_quant(k_lab, cfg.label_bits)
    allowed, bias = _allowed_and_bias(attention_mask, b, Lq, Lk, query.device, query.dtype)
    neg = torch.finfo(query.dtype).min
    sm_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32  # softmax in >= fp32
    out = torch.empty_like(query)
    step = Lq if Lq == 1 else max(1, cfg.q_chunk)
    for s in range(0, Lq, step):
        e = min(Lq, s + step)
        al = allowed[..., s:e, :] if allowed.shape[-2] > 1 else allowed
        approx = torch.matmul(q_lab[:, :, s:e], k_lab.transpose(-1, -2))
        if cfg.selection == "kv" and groups > 1:  # one selection per KV head: the group's scores summed
            a5 = approx.view(b, H // groups, groups, *approx.shape[2:])
            approx = a5.sum(2, keepdim=True).expand_as(a5).reshape(approx.shape)
        approx = approx.masked_fill(~al, float("-inf"))
        idx = approx.topk(k_keep, dim=-1).indices  # [b, H, c, k]
        if Lq == 1:  # decode: read only the kept rows of K and V
            i2 = idx[:, :, 0, :, None].expand(b, H, k_keep, d)
            ks, vs = kr.gather(2, i2), vr.gather(2, i2)
            sc = torch.matmul(query[:, :, s:e], ks.transpose(-1, -2)) * scaling
            ok = al.expand(b, H, 1, Lk).gather(-1, idx)
            if bias is not None:
                sc = sc + bias[..., s:e, :].expand(b, H, 1, Lk).gather(-1, idx)
            sc = sc.masked_fill(~ok, neg)
            p = F.softmax(sc, dim=-1, dtype=sm_dtype).to(query.dtype)
            out[:, :, s:e] = torch.matmul(p, vs)
            continue
        keep = torch.zeros_like(approx, dtype=torch.bool).scatter_(-1, idx, True) & al
        sc = torch.matmul(query[:, :, s:e], kr.transpose(-1, -2)) * scaling
        if bias is not None:
            sc = sc + bias[..., s:e, :]
        sc = sc.masked_fill(~keep, float("-inf"))
        p = F.softmax(sc, dim=-1, dtype=sm_dtype).nan_to_num(0.0).to(query.dtype)  # fully masked rows -> 0
        out[:, :, s:e] = torch.matmul(p, vr)
    return out


def ds_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function (``"ptq_double_sparsity"``); returns ``([b, Lq, H, d], None)``.

    With a `DSCache` (generate's default after `install`): decode steps of sparse layers with more than
    ``max(sparse_threshold, heavy_tokens)`` cached tokens run `sparse_decode` (label cache, top-k gather);
    everything else (prefill, short caches, dense layers) runs dense sdpa. Without a `DSCache`, ``cfg.study``
    selects the accuracy-study path `double_sparse_attention` (full score matrices, masks; for perplexity)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cfg = getattr(module, "ds_cfg", None)
    layer = getattr(key, LABEL_ATTR, None)
    Lk = key.shape[2]
    sparse_layer = (cfg is not None and getattr(module, "ds_labels", None) is not None
                    and getattr(module, "layer_idx", 0) >= cfg.dense_layers
                    and Lk > cfg.sparse_threshold and Lk > cfg.heavy_tokens)
    if sparse_layer and layer is not None and layer.channels is not None and query.shape[2] == 1:
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        allowed = None
        if attention_mask is not None and attention_mask.dtype == torch.bool and not bool(attention_mask.all()):
            allowed = attention_mask[:, 0, -1, :Lk]
        out = sparse_decode(query, layer, cfg.heavy_tokens, scaling, cfg.label_bits, cfg.selection, allowed)
        return out.transpose(1, 2).contiguous(), None
    if sparse_layer and layer is None and cfg.study and (cfg.sparse_prefill or query.shape[2] == 1):
        out = double_sparse_attention(query, key, value, module.ds_labels, cfg, scaling, attention_mask)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


double_sparse_attention_study = double_sparse_attention  # the accuracy-study path, by its role


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPL, ds_attention_forward)
    AttentionMaskInterface.register(IMPL, sdpa_mask)  # bool masks (or None = plain causal), like sdpa


def _attn_modules(model) -> list:
    from ptq.layermap import get_module, layer_map_for

    lm = layer_map_for(model.config)
    return [get_module(layer, lm.attn) for layer in get_module(model, lm.layers)]


def _set_impl(model, impl: str) -> None:
    try:
        model.set_attn_implementation(impl)
    except Exception:  # older/odd models: set the config field the attention modules read
        pass
    model.config._attn_implementation = impl


def install(model, labels: dict[int, torch.Tensor] | list[torch.Tensor], cfg: DSConfig) -> None:
    """Make ``model`` run Double Sparsity attention. ``labels[i] [rows, d]`` for layer i (missing = dense).

    ``model.generate`` then builds a `DSCache` (label cache + sparse decode) by default; `make_cache` gives one
    for manual decoding loops."""
    import types

    register()
    if cfg.channel_type not in CHANNEL_TYPES:
        raise ValueError(f"channel_type must be one of {CHANNEL_TYPES}, got {cfg.channel_type!r}")
    if cfg.selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {cfg.selection!r}")
    if cfg.label_layout not in LABEL_LAYOUTS:
        raise ValueError(f"label_layout must be one of {LABEL_LAYOUTS}, got {cfg.label_layout!r}")
    mc = model.config
    H = mc.num_attention_heads
    kvh = getattr(mc, "num_key_value_heads", None) or H
    d = getattr(mc, "head_dim", None) or mc.hidden_size // H
    r = cfg.heavy_channels or d // 4
    channels = []
    for i, attn in enumerate(_attn_modules(model)):
        lab = labels.get(i) if isinstance(labels, dict) else (labels[i] if i < len(labels) else None)
        attn.ds_labels = None if lab is None else torch.as_tensor(lab, dtype=torch.long)
        attn.ds_cfg = cfg
        sparse = attn.ds_labels is not None and i >= cfg.dense_layers
        channels.append(runtime_channels(attn.ds_labels, cfg.selection, H, kvh, r) if sparse else None)
    model.ds_channels, model.ds_cfg = channels, cfg
    model.ds_union = [c is not None and use_union(c, cfg, kvh) for c in channels]
    _set_impl(model, IMPL)
    if not hasattr(model, "_ds_orig_prepare"):
        orig = model._ds_orig_prepare = model._prepare_cache_for_generation

        def _prepare(self, generation_config, model_kwargs, *args, **kwargs):
            key = "cache" if _takes_cache(self) else "past_key_values"
            if (getattr(self, "ds_cfg", None) is not None and model_kwargs.get(key) is None
                    and generation_config.use_cache is not False and generation_config.cache_implementation is None):
                model_kwargs[key] = make_cache(self)
            return orig(generation_config, model_kwargs, *args, **kwargs)

        model._prepare_cache_for_generation = types.MethodType(_prepare, model)


def runtime_channels(labels: torch.Tensor, selection: str, heads: int, kv_heads: int, r: int) -> torch.Tensor:
    """The label-cache channels of one layer: ``[heads, r]`` per query head for ``selection="query-labels"``
    (rows of ``labels`` repeated when they are per KV head), else ``[kv_heads, r]`` (`kv_label_channels`)."""
    if selection == "query-labels":
        return label_channels(labels, r, heads).contiguous()
    return kv_label_channels(labels, kv_heads, r)


def use_union(channels: torch.Tensor, cfg: DSConfig, kv_heads: int) -> bool:
    """Whether a layer with label-cache ``channels [R, r]`` keeps the union label cache (`ds_runtime.union_channels`):
    per-query-head rows (R > kv_heads), fp labels, and ``label_layout`` "union", or "auto" with
    ``kv_heads * U <= 2/3 * R * r`` (the union saves at least a third of the label bytes; its matmul does
    ``U / r`` times the multiply-adds of the per-head one, so with little overlap the per-head cache is faster)."""
    R, r = channels.shape
    if R == kv_heads or cfg.label_bits < 16 or cfg.label_layout == "per-head":
        return False
    return cfg.label_layout == "union" or 3 * kv_heads * union_rows(channels, kv_heads) <= 2 * R * r


def _takes_cache(model) -> bool:
    import inspect

    return "cache" in inspect.signature(type(model).forward).parameters


def make_cache(model) -> DSCache:
    """A fresh `DSCache` for a model prepared by `install` (label channels per query head or KV head, as the
    selection needs; label bits; union label caches where `use_union`). A cache serves the selection it was made
    for."""
    return DSCache(model.ds_channels, model.ds_cfg.label_bits, getattr(model, "ds_union", None))


def uninstall(model, impl: str = "sdpa") -> None:
    for attn in _attn_modules(model):
        attn.ds_labels = attn.ds_cfg = None
    model.ds_cfg = None
    _set_impl(model, impl)


# --------------------------------------------------------------------------------------------- files
def label_files(all_labels: dict[int, dict[str, torch.Tensor]], cfg: DSConfig, model_config, tokens: int,
                means: dict[int, dict[str, torch.Tensor]] | None = None) -> dict[str, str]:
    """Our ``double_sparsity.json`` and SGLang's ``ds_channel_config.json`` (keys
    ``model.layers.{i}.self_attn.{q,k,qk}_proj`` -> list[rows][d] channels, most important first; ``qk`` has
    KV-head rows for GQA models, ``q`` query-head rows, ``k`` KV-head rows)."""
    H = model_config.num_attention_heads
    ours = {
        "format": "ptq-double-sparsity", "version": 1,
        "settings": asdict(cfg),
        "num_layers": len(all_labels), "num_heads": H,
        "num_kv_heads": getattr(model_config, "num_key_value_heads", None) or H,
        "head_dim": getattr(model_config, "head_dim", None) or model_config.hidden_size // H,
        "calibration_tokens": tokens,
        "labels": {t: {str(i): all_labels[i][t].tolist() for i in sorted(all_labels)} for t in CHANNEL_TYPES},
    }
    if means:
        ours["importance"] = {str(i): means[i]["qk"].float().tolist() for i in sorted(means)}
    sg = {}
    kvh = ours["num_kv_heads"]
    for i in sorted(all_labels):
        for t in ("q", "k", "qk"):
            # SGLang gathers K's label channels with these rows (index rows <= KV heads, label buffer
            # [tokens, Hkv, r]): with GQA, "qk" must have one row per KV head, i.e. our qk_kv ranking
            lab = all_labels[i]["qk_kv"] if t == "qk" and kvh != H else all_labels[i][t]
            sg[f"model.layers.{i}.self_attn.{t}_proj"] = lab.tolist()
    return {OURS: json.dumps(ours), SGLANG: json.dumps(sg)}


def load_labels(path: str | Path, channel_type: str | None = None) -> tuple[dict[int, torch.Tensor], DSConfig]:
    """Labels + settings from a folder holding ``double_sparsity.json`` (or that file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / OURS
    data = json.loads(p.read_text())
    settings = data.get("settings", {})
    cfg = DSConfig.from_dict({"selection": "kv", **settings})  # files written before the setting: per KV head
    t = channel_type or cfg.channel_type
    cfg.channel_type = t
    labels = {int(i): torch.tensor(v, dtype=torch.long) for i, v in data["labels"][t].items()}
    return labels, cfg


def install_from(model, path: str | Path, **overrides) -> DSConfig:
    """`install` with the labels and settings written by ``ptq compress --recipe double-sparsity``."""
    labels, cfg = load_labels(path, overrides.pop("channel_type", None))
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"DSConfig has no field {k!r}")
        setattr(cfg, k, v)
    install(model, labels, cfg)
    return cfg


def load_double_sparsity(folder: str | Path, dtype=torch.float32, **overrides):
    """The model of a ``ptq compress --recipe double-sparsity`` folder, with Double Sparsity installed
    (``overrides`` replace `DSConfig` fields); ``model.generate`` then decodes sparsely from a label cache."""
    from ptq.model_io import full_model

    model, _ = full_model(folder, dtype=dtype)
    install_from(model, folder, **overrides)
    return model
