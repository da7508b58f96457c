"""CSKV: channel shrinking of the KV cache (Wang et al. 2024, arXiv 2409.10593; code wln20/CSKV).

Factorization (per layer, over the whole projection, not per head): ``W_k [n_kv*d, H] ~ B_k A_k`` with
``A_k [r_k, H]`` (`k_proj_a`), ``B_k [n_kv*d, r_k]`` (`k_proj_b`), ``r_k = int(k_density*d) * n_kv``; same for V.

ASVD init (reference ``init_asvd``): ``m_c = mean_t |x_tc|`` over the calibration inputs of k/v_proj,
``S = diag((m + 1e-6)^alpha)`` (alpha 0.5), ``S W^T = U Sigma V^T``,
``A^T = S^-1 U_r Sigma_r^1/2``, ``B^T = Sigma_r^1/2 V_r^T``.

Layer-wise fit (reference ``train.py``, only A, B trained): minimize
``MSE(RoPE(K), RoPE(K_hat)) + MSE(V, V_hat)`` with ``K = x W_k^T``, ``K_hat = x A^T B^T``. RoPE is a rotation of
each (i, i+d/2) pair, so ``||RoPE(K) - RoPE(K_hat)|| = ||K - K_hat||`` (times the rope attention scaling): the
fit needs no positions.

Inference (`CSKVAttention`): the original ``k_proj, v_proj`` still give the exact K/V of the current window
(the reference concatenates ``[W_k; A_k]`` into one GEMM), ``A x`` gives the features cached pre-RoPE, and older
keys are rebuilt as ``RoPE(B_k c_k + b_k)``, values as ``B_v c_v + b_v`` (see `ptq.kv.cskv_cache`).
"""
from __future__ import annotations

import inspect
import json
import math
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ptq.kv.cskv_cache import CSKVCache, CSKVLayer

SUPPORTED = ("llama", "mistral", "qwen2")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class CSKVConfig:
    k_density: float = 0.25
    v_density: float = 0.75
    window: int = 32
    k_bits: int = 16  # 16 = compressed features stored in store_dtype, else 2..8-bit codes
    v_bits: int = 16
    store_dtype: str = "float16"  # dtype of the exact window and of 16-bit features
    exact_prefill: bool = False  # True: a first multi-token forward attends exactly (reference prefill)
    keep_keys: bool = False  # True: keep RoPE'd reconstructed keys of finished windows (store_dtype, counted in
    #                          the cache bytes): decode then rebuilds no past key; False: rebuild them each step

    def __post_init__(self):
        if not (0 < self.k_density <= 1 and 0 < self.v_density <= 1):
            raise ValueError(f"densities must be in (0, 1], got k {self.k_density}, v {self.v_density}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        for b in (self.k_bits, self.v_bits):
            if b != 16 and not 2 <= b <= 8:
                raise ValueError(f"KV bits must be 16 (unquantized) or 2..8, got {b}")
        if self.store_dtype not in DTYPES:
            raise ValueError(f"store_dtype must be one of {', '.join(DTYPES)}, got {self.store_dtype!r}")

    def dims(self, config) -> dict:
        """Per-model sizes: ``r_k, r_v`` (total), per-head ``gk, gv``, ``n_kv``, ``d``."""
        d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        n_kv = config.num_key_value_heads
        gk, gv = int(self.k_density * d), int(self.v_density * d)
        if not (0 < gk <= d and 0 < gv <= d):
            raise ValueError(f"densities must give 1..{d} channels per head, got k {gk}, v {gv}")
        return {"d": d, "n_kv": n_kv, "gk": gk, "gv": gv, "r_k": gk * n_kv, "r_v": gv * n_kv}

    def to_dict(self) -> dict:
        return asdict(self)


# -- attention ---------------------------------------------------------------------------------------
def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def _rope(x, cos, sin):
    """``x [b, h, n, d]``, ``cos, sin [b, n, d]``."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _repeat_kv(x, n_rep):
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class CSKVAttention(nn.Module):
    """Drop-in for a Llama/Mistral/Qwen2 attention module: keeps ``q/k/v/o_proj`` and adds
    ``k_proj_a [r_k, H]``, ``k_proj_b [n_kv*d, r_k]``, ``v_proj_a``, ``v_proj_b``.

    ``past_key_values``: a `CSKVCache` (bi-branch decode), or None: then with ``emulate=True`` the whole input
    is run through a fresh bi-branch layer (each query sees exact K/V of its own window and reconstructed K/V of
    earlier windows: identical to token-by-token decoding), with ``emulate=False`` plain exact attention."""

    def __init__(self, attn: nn.Module, ccfg: CSKVConfig, rotary: nn.Module, a_k, b_k, a_v, b_v):
        super().__init__()
        cfg = attn.config
        self.config, self.layer_idx, self.ccfg = cfg, attn.layer_idx, ccfg
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.num_key_value_groups = attn.num_key_value_groups
        self.is_causal = True
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        dims = ccfg.dims(cfg)
        self.n_kv, self.v_group = dims["n_kv"], dims["gv"]
        h = cfg.hidden_size
        dev, dt = attn.k_proj.weight.device, attn.k_proj.weight.dtype
        self.k_proj_a = nn.Linear(h, a_k.shape[0], bias=False, device=dev, dtype=dt)
        self.k_proj_b = nn.Linear(a_k.shape[0], b_k.shape[0], bias=False, device=dev, dtype=dt)
        self.v_proj_a = nn.Linear(h, a_v.shape[0], bias=False, device=dev, dtype=dt)
        self.v_proj_b = nn.Linear(a_v.shape[0], b_v.shape[0], bias=False, device=dev, dtype=dt)
        for lin, t in ((self.k_proj_a, a_k), (self.k_proj_b, b_k), (self.v_proj_a, a_v), (self.v_proj_b, b_v)):
            lin.weight.data.copy_(t)
        self._rotary = [rotary]  # shared model.rotary_emb, kept out of the module tree
        self.emulate = True

    def _cos_sin(self, x, pos):
        return self._rotary[0](x, pos)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                cache=None, **kwargs):
        if past_key_values is None:  # transformers >= 5.24 passes the cache as ``cache``
            past_key_values = cache
        b, q, _ = hidden_states.shape
        d, nkv = self.head_dim, self.n_kv
        x = hidden_states
        query = self.q_proj(x).view(b, q, -1, d).transpose(1, 2)
        k = self.k_proj(x).view(b, q, nkv, d).transpose(1, 2)  # exact, pre-RoPE
        v = self.v_proj(x).view(b, q, nkv, d).transpose(1, 2)
        cos, sin = position_embeddings
        query = _rope(query, cos, sin)
        pos = kwargs.get("position_ids")
        if pos is None:
            past = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
            pos = torch.arange(past, past + q, device=x.device)[None]
        pos = pos.expand(b, q)
        exact_prefill = False
        if isinstance(past_key_values, CSKVCache):
            layer = past_key_values.layers[self.layer_idx]
            exact_prefill = past_key_values.exact_prefill
        elif past_key_values is None and self.emulate:
            c = self.ccfg
            layer = CSKVLayer(c.window, c.k_bits, c.v_bits, self.v_group, DTYPES[c.store_dtype])
        elif past_key_values is None:
            return self._dense(query, _rope(k, cos, sin), v, attention_mask, q)
        else:
            raise TypeError(f"CSKV attention needs a ptq.kv.cskv_cache.CSKVCache, got {type(past_key_values).__name__}; "
                            "pass past_key_values=make_cache(model) or use_cache=False")
        keep = self.ccfg.keep_keys and isinstance(past_key_values, CSKVCache)
        view = layer.append(k, v, self.k_proj_a(x), self.v_proj_a(x), pos, load_k=not keep)
        nr = view.rec_cv.shape[1]
        if isinstance(past_key_values, CSKVCache):
            cos_all, sin_all = past_key_values.rope_table(view.pos, lambda p: self._cos_sin(x, p))
        else:
            cos_all, sin_all = self._cos_sin(x, view.pos)
        if keep:
            k_rec = self._kept_keys(layer, view, cos_all, sin_all, x.dtype)
        else:
            k_rec = self._rebuild_keys(view.rec_ck, cos_all[:, :nr], sin_all[:, :nr])
        plain = attention_mask is None or bool((attention_mask if attention_mask.dtype == torch.bool
                                                else attention_mask == 0).all())
        if q == 1 and plain and not (exact_prefill and view.past == 0):
            return self._decode(query, k_rec, view, cos_all, sin_all), None
        v_rec = self.v_proj_b(view.rec_cv)
        if self.v_proj.bias is not None:
            v_rec = v_rec + self.v_proj.bias
        v_rec = v_rec.view(b, nr, nkv, d).transpose(1, 2)
        k_ex = _rope(view.ex_k, cos_all[:, view.ex_start:], sin_all[:, view.ex_start:])
        m_rec, m_ex = view.branch_masks(exact_prefill)
        mask = torch.cat([m_rec, m_ex], 1)[None, None]  # [1, 1, q, Nr + T - E]
        if attention_mask is not None and attention_mask.shape[-1] == view.total:
            am = attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(attention_mask.dtype).min / 2
            am = am[..., -q:, :]
            mask = mask & torch.cat([am[..., :nr], am[..., view.ex_start:]], -1)
        keys = _repeat_kv(torch.cat([k_rec, k_ex], 2), self.num_key_value_groups)
        vals = _repeat_kv(torch.cat([v_rec, view.ex_v], 2), self.num_key_value_groups)
        out = F.scaled_dot_product_attention(query, keys, vals, attn_mask=mask, scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(b, q, -1)), None

    def _rebuild_keys(self, ck, cos, sin):
        """``RoPE(B_k c_k + b_k)`` for features ``ck [b, n, r_k]`` at ``cos/sin [b, n, d]`` -> ``[b, n_kv, n, d]``."""
        b, n, _ = ck.shape
        k = self.k_proj_b(ck)
        if self.k_proj.bias is not None:
            k = k + self.k_proj.bias
        return _rope(k.view(b, n, self.n_kv, self.head_dim).transpose(1, 2), cos, sin)

    def _kept_keys(self, layer, view, cos_all, sin_all, dtype):
        """Keys of the compressed branch kept in the layer (``k_kept``, store dtype): only windows finished since
        the last step are dequantized, re-projected and rotated."""
        kept = layer.t.get("k_kept")
        have = 0 if kept is None else kept.shape[2]
        nr = view.rec_cv.shape[1]
        if nr > have:
            ck = layer._load_k(self.k_proj_a.out_features, dtype, start=have)
            new = self._rebuild_keys(ck, cos_all[:, have:nr], sin_all[:, have:nr]).to(layer.store_dtype)
            layer.t["k_kept"] = kept = new if kept is None else torch.cat([kept, new], 2)
        return kept.to(dtype)

    def _decode(self, query, k_rec, view, cos_all, sin_all):
        """One query token per sequence: attention per KV head (no repeat_kv) over the compressed keys
        ``[0, E)`` and the exact window ``[E, T)``; values of the compressed branch stay low-rank:
        ``sum_j p_j (B_v c_j + b_v) = B_v (sum_j p_j c_j) + (sum_j p_j) b_v`` (no past value is rebuilt)."""
        b, H, _, d = query.shape
        nkv, G, E = self.n_kv, self.num_key_value_groups, view.ex_start
        qg = query.view(b, nkv, G, d)
        k_ex = _rope(view.ex_k, cos_all[:, E:], sin_all[:, E:])
        s = torch.cat([torch.matmul(qg, k_rec[:, :, :E].transpose(-1, -2)),
                       torch.matmul(qg, k_ex.transpose(-1, -2))], -1) * self.scaling
        p = torch.softmax(s, -1, dtype=torch.float32).to(query.dtype)
        p_rec, p_ex = p[..., :E], p[..., E:]
        out = torch.matmul(p_ex, view.ex_v)  # [b, nkv, G, d]
        if E > 0:
            pc = torch.matmul(p_rec, view.rec_cv[:, None, :E])  # [b, nkv, G, r_v]
            bv = self.v_proj_b.weight.view(nkv, d, -1)  # [nkv, d, r_v]
            out = out + torch.matmul(pc, bv.transpose(-1, -2)[None])
            if self.v_proj.bias is not None:
                out = out + p_rec.sum(-1, keepdim=True) * self.v_proj.bias.view(nkv, 1, d)
        return self.o_proj(out.reshape(b, 1, H * d))

    def _dense(self, query, k, v, attention_mask, q):
        keys = _repeat_kv(k, self.num_key_value_groups)
        vals = _repeat_kv(v, self.num_key_value_groups)
        causal = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()[None, None]
        if attention_mask is not None and attention_mask.shape[-1] == q:
            am = attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(attention_mask.dtype).min / 2
            causal = causal & am
        out = F.scaled_dot_product_attention(query, keys, vals, attn_mask=causal, scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(query.shape[0], q, -1)), None


# -- model conversion, cache, save/load -------------------------------------------------------------
def factor_names(prefix: str) -> dict[str, str]:
    """Checkpoint tensor names of one layer's factors (``prefix`` like ``model.layers.3.``)."""
    return {k: f"{prefix}self_attn.{k}.weight" for k in ("k_proj_a", "k_proj_b", "v_proj_a", "v_proj_b")}


def convert_model(model, ccfg: CSKVConfig, factors: dict[int, dict[str, torch.Tensor]]):
    """Replace each decoder layer's ``self_attn`` by `CSKVAttention` with ``factors[i]`` (keys k_proj_a, ...),
    make a `CSKVCache` generate's default and disable the implicit DynamicCache of plain forwards."""
    mt = model.config.model_type
    if mt not in SUPPORTED:
        raise ValueError(f"CSKV supports RoPE models {', '.join(SUPPORTED)}, not {mt!r}")
    rotary = model.model.rotary_emb
    for i, layer in enumerate(model.model.layers):
        f = factors[i]
        layer.self_attn = CSKVAttention(layer.self_attn, ccfg, rotary, f["k_proj_a"], f["k_proj_b"],
                                        f["v_proj_a"], f["v_proj_b"])
    model.cskv_config = ccfg
    model.config.use_cache = False  # plain forward: emulated bi-branch, no DynamicCache
    if hasattr(model, "_cskv_orig_prepare"):  # converted before: the generate hook is in place
        return model
    orig = model._cskv_orig_prepare = model._prepare_cache_for_generation

    def _prepare(self, generation_config, model_kwargs, *args, **kwargs):
        key = cache_kwarg(self)
        if (model_kwargs.get(key) is None and generation_config.use_cache is not False
                and generation_config.cache_implementation is None):
            model_kwargs[key] = make_cache(self)
        return orig(generation_config, model_kwargs, *args, **kwargs)

    model._prepare_cache_for_generation = types.MethodType(_prepare, model)
    return model


def cache_kwarg(model) -> str:
    """Name under which ``model.forward`` / ``generate`` take a Cache: ``cache`` from transformers 5.24,
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def make_cache(model) -> CSKVCache:
    c: CSKVConfig = model.cskv_config
    return CSKVCache(model.config.num_hidden_layers, c.window, c.k_bits, c.v_bits, c.dims(model.config)["gv"],
                     DTYPES[c.store_dtype], c.exact_prefill)


def set_config(model, ccfg: CSKVConfig) -> None:
    """Change window / bits / store dtype of a converted model (the ranks must stay those of its factors)."""
    model.cskv_config = ccfg
    for m in model.modules():
        if isinstance(m, CSKVAttention):
            if ccfg.dims(model.config)["r_k"] != m.k_proj_a.out_features:
                raise ValueError("set_config cannot change the densities of a converted model")
            m.ccfg = ccfg


def set_emulate(model, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, CSKVAttention):
            m.emulate = on


def load_cskv_model(folder: str | Path, dtype=torch.float32, **overrides):
    """Model exported by the ``cskv`` pass (plain weights + ``*_proj_a/b`` tensors + ``cskv.json``), converted.
    ``overrides`` replace `CSKVConfig` fields at load time (e.g. ``k_bits=4``, ``window=64``)."""
    from ptq.model_io import SafetensorsSource, full_model

    folder = Path(folder)
    meta = json.loads((folder / "cskv.json").read_text())
    ccfg = CSKVConfig(**{**meta["config"], **overrides})
    model, _ = full_model(folder, dtype=dtype)
    src = SafetensorsSource(folder)
    factors = {i: {k: src.get(n).to(dtype) for k, n in factor_names(f"model.layers.{i}.").items()}
               for i in range(model.config.num_hidden_layers)}
    return convert_model(model, ccfg, factors)


def kv_bytes_per_token(model, ids: torch.Tensor) -> dict:
    """Run ``ids [1, T]`` through a `CSKVCache` and report stored bytes/token vs a dense fp16 cache."""
    from ptq.kv.cskv_cache import dense_kv_bytes

    cache = make_cache(model)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
    cfg = model.config
    d = model.cskv_config.dims(cfg)
    t = ids.shape[1]
    dense = dense_kv_bytes(t, cfg.num_hidden_layers, d["n_kv"], d["d"])
    got = cache.nbytes()
    return {"tokens": t, "cskv_bytes_per_token": got / t, "dense_fp16_bytes_per_token": dense / t,
            "reduction": 1 - got / dense}


def asymptotic_bytes_per_token(ccfg: CSKVConfig, config) -> float:
    """Bytes/token of the compressed branch alone (long-context limit, window amortized away)."""
    d = ccfg.dims(config)
    L = config.num_hidden_layers

    def part(r, bits, meta_per_token):
        return r * 2 if bits == 16 else math.ceil(r * bits / 8) + meta_per_token

    k = part(d["r_k"], ccfg.k_bits, d["r_k"] * 4 / ccfg.window)  # fp16 scale + fp16 min per channel per window
    v = part(d["r_v"], ccfg.v_bits, d["n_kv"] * 4)  # per token per head group
    return L * (k + v)


def expected_cache_bytes(ccfg: CSKVConfig, config, n_tokens: int) -> int:
    """Bytes a `CSKVCache` holds after ``n_tokens`` tokens (batch 1), from the layout alone: per layer,
    ``Nr = floor(T/W)*W`` tokens in the compressed branch (`asymptotic_bytes_per_token` per token, or fp features),
    ``T - Nr`` window tokens with exact K/V and their features in ``store_dtype``, and with ``keep_keys`` the
    reconstructed keys of the ``Nr`` tokens in ``store_dtype``."""
    d = ccfg.dims(config)
    es = DTYPES[ccfg.store_dtype].itemsize
    w = ccfg.window
    nr = (n_tokens // w) * w
    res = n_tokens - nr

    def part(r, bits, meta):
        return nr * r * es if bits == 16 else nr * math.ceil(r * bits / 8) + meta

    k = part(d["r_k"], ccfg.k_bits, (nr // w) * d["r_k"] * 4)
    v = part(d["r_v"], ccfg.v_bits, nr * (d["r_v"] // d["gv"]) * 4)
    window = res * (2 * d["n_kv"] * d["d"] + d["r_k"] + d["r_v"]) * es
    kept = nr * d["n_kv"] * d["d"] * es if ccfg.keep_keys else 0
    return config.num_hidden_layers * (k + v + window + kept)
