"""Double Sparsity run time: a KV cache with a label cache, and sparse decode that reads only the labels to choose
tokens (Yang et al., arXiv 2408.07092, the e2e kernel's ``k_label`` cache; here in plain torch ops for CPU).

Per decoder layer `DSLayer` holds, for ``S`` cached tokens (capacity doubles, so an append is amortized O(1)):

* ``keys, values [b, Hkv, cap, d]`` post-RoPE (contiguous: row ``(b*Hkv + g)*cap + t`` of the flat view);
* the **label cache** ``[b, Hkv, r, cap]``: the r label channels ``C_g`` of each cached key of KV head g,
  channels-major so that scoring is one contiguous matmul; fp16 (``label_bits=16``) or 4-bit codes packed two
  per byte (``[b, Hkv, r/2, cap]``) with a per-token fp16 step and minimum (``label_bits=4``;
  ``x ~ code * step + min``, the reference's per-vector min/max quantizer).

Decode (one query token, ``q [b, H, 1, d]``, group ``G = H / Hkv`` query heads per KV head g)::

    s~[g, t]   = sum_{h in group g} Q(q_h[C_g]) . L[g, t]       one batched matmul over the label cache
    T_g        = top-k_t s~[g, t]                                shared by the G heads of the group
    o_h        = softmax(q_h K[g, T_g]^T * scaling) V[g, T_g]    rows gathered by KV-head index, no repeat_kv

With ``selection="head"`` each query head keeps its own top-k (``s~[h, t] = Q(q_h[C_g]) . L[g, t]``).
Prefill (more than one query token), layers below ``dense_layers`` and caches with ``S <= max(sparse_threshold,
k)`` run dense sdpa on the cached K/V: the sparse path never scores a full ``[Lq, S]`` matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

LABEL_ATTR = "_ds_layer"  # set on the key tensor returned by DSLayer.update, read by the attention function


def quant_labels(x: torch.Tensor, bits: int):
    """Per-vector (last dim) asymmetric min/max codes: ``step = range / (2^b-1)`` (a zero range counts as 1),
    step and minimum rounded to fp16. Returns ``codes`` (uint8, shape of x), ``step``, ``lo`` (fp16, last dim 1)."""
    maxq = 2**bits - 1
    xf = x.float()
    lo = xf.amin(-1, keepdim=True)
    rng = xf.amax(-1, keepdim=True) - lo
    rng = torch.where(rng == 0, torch.ones_like(rng), rng)
    step, lo = (rng / maxq).half(), lo.half()
    codes = torch.round((xf - lo.float()) / step.float()).clamp(0, maxq)
    return codes.to(torch.uint8), step, lo


def dequant_labels(codes: torch.Tensor, step: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    return codes.float() * step.float() + lo.float()


def fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequant(quant(x))`` in x's dtype; identity for ``bits >= 16``."""
    if bits >= 16:
        return x
    return dequant_labels(*quant_labels(x, bits)).to(x.dtype)


def kv_label_channels(labels: torch.Tensor, kv_heads: int, r: int) -> torch.Tensor:
    """``labels [rows, d]`` (most important first) -> ``[kv_heads, r]`` channels of each KV head's label cache.

    Rows = kv heads: the first r of each row. Rows = query heads (GQA): the group's rankings are merged by Borda
    count (a channel scores ``d - rank`` in each head of the group), so the KV head keeps the channels its query
    heads rank highest together."""
    rows, d = labels.shape
    if rows == kv_heads:
        return labels[:, :r].contiguous()
    if rows % kv_heads:
        raise ValueError(f"{rows} label rows cannot map onto {kv_heads} KV heads")
    score = torch.zeros(rows, d)
    score.scatter_(1, labels.long(), torch.arange(d, 0, -1, dtype=torch.float).expand(rows, d))
    merged = score.view(kv_heads, rows // kv_heads, d).sum(1)
    return torch.sort(merged, dim=-1, descending=True, stable=True).indices[:, :r].contiguous()


class DSLayer(CacheLayerMixin):
    """One decoder layer of a `DSCache`. ``channels [Hkv, r]`` (None: a dense layer, no label cache)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, channels: torch.Tensor | None, label_bits: int = 16):
        super().__init__()
        if label_bits != 16 and not 2 <= label_bits <= 8:
            raise ValueError(f"label_bits must be 16 or 2..8, got {label_bits}")
        self.channels, self.label_bits = channels, label_bits
        self.n = 0
        self.keys = self.values = None
        self.lab = self.lab_step = self.lab_lo = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _grow(self, need: int) -> None:
        cap = self.keys.shape[2]
        if need <= cap:
            return
        new = max(need, 2 * cap, 256)

        def grown(t, dim):  # token dim: 2 for K/V [b, Hkv, cap, d], 3 for labels [b, Hkv, R, cap]
            if t is None:
                return None
            shape = list(t.shape)
            shape[dim] = new
            out = t.new_empty(shape)
            out.narrow(dim, 0, self.n).copy_(t.narrow(dim, 0, self.n))
            return out

        self.keys, self.values = grown(self.keys, 2), grown(self.values, 2)
        self.lab, self.lab_step, self.lab_lo = grown(self.lab, 3), grown(self.lab_step, 3), grown(self.lab_lo, 3)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[b, Hkv, q, d]`` post-RoPE K/V (and their label channels); returns the cached K/V views
        ``[b, Hkv, S, d]`` (the key view carries this layer for the attention function)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            b, hkv, _, d = key_states.shape
            self.keys = key_states.new_empty(b, hkv, 0, d)
            self.values = value_states.new_empty(b, hkv, 0, d)
            if self.channels is not None:
                r = self.channels.shape[1]
                self.channels = self.channels.to(key_states.device)
                if self.label_bits == 16:
                    self.lab = key_states.new_empty(b, hkv, r, 0, dtype=torch.float16)
                else:
                    packed = -(-r // 2) if self.label_bits == 4 else r
                    self.lab = key_states.new_empty(b, hkv, packed, 0, dtype=torch.uint8)
                    self.lab_step = key_states.new_empty(b, hkv, 1, 0, dtype=torch.float16)
                    self.lab_lo = key_states.new_empty(b, hkv, 1, 0, dtype=torch.float16)
        q = key_states.shape[2]
        self._grow(self.n + q)
        s, e = self.n, self.n + q
        self.keys[:, :, s:e] = key_states
        self.values[:, :, s:e] = value_states
        if self.channels is not None:
            b, hkv, _, _ = key_states.shape
            ch = self.channels[None, :, None, :].expand(b, hkv, q, self.channels.shape[1])
            kl = key_states.gather(-1, ch)  # [b, Hkv, q, r]
            if self.label_bits == 16:
                self.lab[..., s:e] = kl.transpose(-1, -2)
            else:
                codes, step, lo = quant_labels(kl, self.label_bits)
                self.lab[..., s:e] = pack_codes(codes, self.label_bits).transpose(-1, -2)
                self.lab_step[..., s:e], self.lab_lo[..., s:e] = step.transpose(-1, -2), lo.transpose(-1, -2)
        self.n = e
        k, v = self.keys[:, :, :e], self.values[:, :, :e]
        setattr(k, LABEL_ATTR, self)
        return k, v

    def label_scores(self, ql: torch.Tensor) -> torch.Tensor:
        """``ql [b, Hkv, m, r]`` float query labels -> approximate scores ``[b, Hkv, m, S]`` from the label cache
        alone (one batched matmul; 4-bit: ``step_t * (ql . codes_t) + lo_t * sum(ql)``, no dequantized copy)."""
        S = self.n
        if self.label_bits == 16:
            return torch.matmul(ql, self.lab[..., :S].float())
        codes = unpack_codes(self.lab[..., :S], self.label_bits, self.channels.shape[1])
        sc = torch.matmul(ql, codes.float())
        return sc * self.lab_step[..., :S].float() + ql.sum(-1, keepdim=True) * self.lab_lo[..., :S].float()

    def labels(self) -> torch.Tensor:
        """The label cache as float ``[b, Hkv, S, r]`` (dequantized)."""
        S = self.n
        if self.label_bits == 16:
            return self.lab[..., :S].float().transpose(-1, -2)
        codes = unpack_codes(self.lab[..., :S], self.label_bits, self.channels.shape[1])
        return (codes.float() * self.lab_step[..., :S].float() + self.lab_lo[..., :S].float()).transpose(-1, -2)

    def nbytes(self) -> dict:
        """Bytes held for the ``S`` cached tokens: K/V and the label cache (capacity slack excluded)."""
        per = {"kv": 0, "labels": 0}
        if self.keys is None:
            return per
        per["kv"] = 2 * self.keys[:, :, :self.n].numel() * self.keys.element_size()
        for t in (self.lab, self.lab_step, self.lab_lo):
            if t is not None:
                per["labels"] += t[..., :self.n].numel() * t.element_size()
        return per

    # -- CacheLayerMixin API
    def get_seq_length(self) -> int:
        return self.n

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.n = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:  # noqa: D102
        for name in ("keys", "values", "lab", "lab_step", "lab_lo"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, beam_idx.to(t.device)))

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens (negative: drop that many from the end); buffers keep capacity."""
        if max_length < 0:
            max_length = self.n + max_length
        self.n = max(0, min(self.n, max_length))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., r]`` -> ``[..., ceil(r/2)]`` for 4 bits (channel 2i in the low nibble, 2i+1 in the
    high one); other widths stay one code per byte."""
    if bits != 4:
        return codes
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, r: int) -> torch.Tensor:
    """Label-cache codes ``[..., R, S]`` (channels on dim -2) -> ``[..., r, S]``."""
    if bits != 4:
        return packed
    return torch.stack([packed & 15, packed >> 4], -2).flatten(-3, -2)[..., :r, :]


class DSCache(Cache):
    """`Cache` of `DSLayer`: ``channels[i] [Hkv, r]`` per layer (None = dense layer)."""

    def __init__(self, channels: list[torch.Tensor | None], label_bits: int = 16):
        super().__init__(layers=[DSLayer(c, label_bits) for c in channels])

    def nbytes(self) -> dict:
        tot = {"kv": 0, "labels": 0}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                tot[k] += v
        return tot


def top_k_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim, unordered. On CPU numpy's introselect
    (``argpartition``, O(S)) is 3-4x faster than ``torch.topk`` at 16k-32k entries; elsewhere ``torch.topk``."""
    S = x.shape[-1]
    if k >= S:
        return torch.arange(S, device=x.device).expand(*x.shape[:-1], S)
    if x.device.type == "cpu" and x.dtype == torch.float32:
        import numpy as np

        part = np.argpartition(x.detach().numpy(), S - k, axis=-1)[..., S - k:]
        return torch.from_numpy(np.ascontiguousarray(part)).long()
    return x.topk(k, -1, sorted=False).indices


@torch.no_grad()
def sparse_decode(query: torch.Tensor, layer: DSLayer, heavy_tokens: int, scaling: float, label_bits: int = 16,
                  selection: str = "kv", allowed: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of Double Sparsity from a `DSLayer`. ``query [b, H, 1, d]`` -> ``[b, H, 1, d]``.

    ``allowed [b, S]`` bool (padding) or None. Reads the label cache ``[b, Hkv, S, r]`` and ``2 k`` rows of K/V
    per KV head (``selection="kv"``) or per query head (``"head"``)."""
    b, H, _, d = query.shape
    K, V = layer.keys, layer.values
    hkv, cap, S = K.shape[1], K.shape[2], layer.n
    g = H // hkv
    kk = min(heavy_tokens, S)
    ch = layer.channels
    r = ch.shape[1]
    q = query.view(b, hkv, g, d)
    ql = fake_quant(q.gather(-1, ch[None, :, None, :].expand(b, hkv, g, r)).float(), label_bits)  # [b,Hkv,G,r]
    if selection == "kv":
        ql = ql.sum(2, keepdim=True)  # [b, Hkv, 1, r]
    approx = layer.label_scores(ql)  # [b, Hkv, 1|G, S]
    if allowed is not None:
        approx = approx.masked_fill(~allowed[:, None, None, :], float("-inf"))
    idx = top_k_indices(approx, kk)  # [b, Hkv, 1|G, k]
    base = (torch.arange(b * hkv, device=idx.device) * cap).view(b, hkv, 1, 1)
    flat = (idx + base).reshape(-1)
    ks = K.reshape(-1, d).index_select(0, flat).view(*idx.shape, d)  # [b, Hkv, 1|G, k, d]
    vs = V.reshape(-1, d).index_select(0, flat).view(*idx.shape, d)
    if selection == "kv":
        sc = torch.matmul(q, ks.squeeze(2).transpose(-1, -2)) * scaling  # [b, Hkv, G, k]
    else:
        sc = torch.matmul(q.unsqueeze(-2), ks.transpose(-1, -2)).squeeze(-2) * scaling
    if allowed is not None:
        ok = allowed[:, None, None, :].expand(b, hkv, idx.shape[2], S).gather(-1, idx)
        sc = sc.masked_fill(~ok, torch.finfo(sc.dtype).min)
    p = F.softmax(sc, dim=-1, dtype=torch.float32).to(query.dtype)
    if selection == "kv":
        out = torch.matmul(p, vs.squeeze(2))  # [b, Hkv, G, d]
    else:
        out = torch.matmul(p.unsqueeze(-2), vs).squeeze(-2)
    return out.reshape(b, H, 1, d)
