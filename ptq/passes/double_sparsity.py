"""Double Sparsity calibration pass: per layer, rank each head's channels by mean |q * k| (post-RoPE) over ALL
calibration tokens, and write the label channels beside the model. No weight changes.

For every batch (decoder-layer input ``hidden [b, L, H]``, rotary ``position_embeddings = (cos, sin) [b, L, d]``)::

    x = norm(hidden);  q = q_proj(x) [b, L, H*d];  k = k_proj(x) [b, L, Hkv*d]
    qk[h, c] += sum_t |RoPE(q)_t[h, c] * RoPE(k)_t[g(h), c]|          (g(h) = h // (H / Hkv))

``finalize`` writes ``double_sparsity.json`` (ours: labels for q, k, qk, qk_kv per layer/head, the run-time
settings below) and ``ds_channel_config.json`` (SGLang ``--ds-channel-config-path`` format).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptq.pipeline import LayerContext, Pass
from ptq.sparse.double_sparsity import (CHANNEL_TYPES, SELECTIONS, ChannelStats, DSConfig, label_files,
                                        rank_channels)


class DoubleSparsityPass(Pass):
    name = "double-sparsity"
    needs_calibration = True
    quantizes_weights = False

    @dataclass
    class Options:
        heavy_tokens: int = 256  # k, tokens kept per query/head at run time
        heavy_channels: int = 0  # r label channels; 0 = head_dim // 4
        label_bits: int = 16  # label cache: 32 unrounded (keys' dtype, at most fp32) | 16 fp16 | 4 = 4-bit codes
        dense_layers: int = 2
        sparse_threshold: int = 1024  # sparse attention only when the key length exceeds this
        channel_type: str = "qk"  # qk (per query head, the reference) | qk_kv (one set per KV head) | q | k
        selection: str = "query-labels"  # run-time top-k: query-labels (per query head, own labels) | head | kv

        def __post_init__(self):
            if self.channel_type not in CHANNEL_TYPES:
                raise ValueError(f"channel_type must be one of {', '.join(CHANNEL_TYPES)}")
            if self.selection not in SELECTIONS:
                raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}")
            if self.heavy_tokens < 1 or self.heavy_channels < 0 or not (1 <= self.label_bits <= 16 or self.label_bits == 32):
                raise ValueError("need heavy_tokens >= 1, heavy_channels >= 0, label_bits in 1..16 or 32")

    def setup(self, sm) -> None:
        self.labels: dict[int, dict[str, torch.Tensor]] = {}
        self.means: dict[int, dict[str, torch.Tensor]] = {}
        self.tokens = 0
        self.config = sm.config

    @torch.no_grad()
    def apply(self, ctx: LayerContext) -> None:
        if not ctx.batches:
            raise ValueError("double-sparsity needs calibration data")
        cfg = ctx.config
        H = cfg.num_attention_heads
        kvh = getattr(cfg, "num_key_value_heads", None) or H
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
        q_name = f"{ctx.lmap.attn}.q_proj"
        norm = ctx.module(ctx.lmap.group_of(q_name).prev)
        attn = ctx.module(ctx.lmap.attn)
        st = ChannelStats(H, kvh, d)
        for b in ctx.batches:
            x = norm(b.hidden)
            pe = b.kwargs.get("position_embeddings")
            cos, sin = pe if pe is not None else (None, None)
            st.update(attn.q_proj(x), attn.k_proj(x), cos, sin)
        means = st.means()
        self.means[ctx.index] = means
        self.labels[ctx.index] = st.labels()
        self.tokens = st.tokens
        # share of the total |q*k| mass captured by the top d/4 channels (how "outlier-y" the layer is)
        qk = means["qk"]
        r = self.opts.heavy_channels or d // 4
        ctx.stats["ds_top_r_mass"] = float((qk.sort(-1, descending=True).values[:, :r].sum(-1) / qk.sum(-1)).mean())

    # -- resume (ptq/resume.py): per-layer means are the only cross-layer state; labels are recomputed
    def resume_state(self) -> dict:
        st = {"tokens": self.tokens}
        for i, m in self.means.items():
            for t, v in m.items():
                st[f"mean.{i}.{t}"] = v.contiguous()
        return st

    def load_resume_state(self, st: dict) -> None:
        self.tokens = int(st.get("tokens", 0))
        for k, v in st.items():
            if k.startswith("mean."):
                _, i, t = k.split(".")
                self.means.setdefault(int(i), {})[t] = v.double()
        self.labels = {i: {t: rank_channels(v) for t, v in m.items()} for i, m in self.means.items()}

    def finalize(self, sm) -> dict:
        o = self.opts
        cfg = DSConfig(heavy_tokens=o.heavy_tokens, heavy_channels=o.heavy_channels, label_bits=o.label_bits,
                       dense_layers=o.dense_layers, sparse_threshold=o.sparse_threshold, channel_type=o.channel_type,
                       selection=o.selection)
        return label_files(self.labels, cfg, self.config, self.tokens, self.means)
