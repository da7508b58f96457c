"""Double Sparsity run time: a KV cache with a label cache, and sparse decode that reads only the labels to choose
tokens (Yang et al., arXiv 2408.07092, the e2e kernel's ``k_label`` cache; here in plain torch ops for CPU).

Per decoder layer `DSLayer` holds, for ``S`` cached tokens (capacity doubles, so an append is amortized O(1)):

* ``keys, values [b, Hkv, cap, d]`` post-RoPE (contiguous: row ``(b*Hkv + g)*cap + t`` of the flat view);
* the **label cache** ``[b, R, r, cap]`` with ``R`` label rows: one per query head (``R = H``, channels
  ``C_h``, the reference's layout) or one per KV head (``R = Hkv``, channels ``C_g``). Row ``j`` holds the r
  label channels of each cached key of KV head ``j // (R / Hkv)``, channels-major so that scoring is one
  contiguous matmul; unrounded (``label_bits=32``: fp32, or the keys' own dtype for fp16 / bf16 keys; fp32 labels
  are scored as stored, no conversion per step), fp16
  (``label_bits=16``) or 4-bit codes packed two per byte (``[b, R, r/2, cap]``) with a
  per-token fp16 step and minimum (``label_bits=4``; ``x ~ code * step + min``, the reference's per-vector
  min/max quantizer).
* or, for per-query-head channels with fp labels (``union=True``), the **union label cache** ``[b, Hkv, U, cap]``:
  for KV head g the union ``U_g = ∪_{h in g} C_h`` of its query heads' channels (``U = max_g |U_g| <= G r``,
  padded). Query head h scores with a vector that is ``q_h[c]`` on its own channels ``C_h`` and 0 elsewhere, so
  the G heads of a group score in one matmul ``[G, U] @ [U, S]`` with the scores of the per-query-head cache (up
  to the order of the sums).
  On SmolLM2 the ``qk`` channels of a group overlap (U = 13 of G r = 24 at r = 8 in its layer of median U).

Decode (one query token, ``q [b, H, 1, d]``, group ``G = H / Hkv`` query heads per KV head g(h))::

    selection="query-labels" (R = H):  s~[h, t] = Q(q_h[C_h]) . L[h, t]          T_h = top-k_t s~[h, t]
    selection="head"         (R = Hkv): s~[h, t] = Q(q_h[C_g(h)]) . L[g(h), t]   T_h = top-k_t s~[h, t]
    selection="kv"           (R = Hkv): s~[g, t] = sum_{h in g} Q(q_h[C_g]) . L[g, t]   T_g shared by the group
    o_h = softmax(q_h K[g(h), T_h]^T * scaling) V[g(h), T_h]     rows read by KV-head index, no repeat_kv

Per-query-head selections run one batched top-k over ``[b*H, S]`` scores, one ``index_select`` of the ``b*H*k``
key rows from the flat K buffer, one ``bmm`` for the scores of all heads, and ``embedding_bag`` (weighted sum of
the selected value rows, weights = the softmax) for the output, so the selected V rows are never copied.
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


def unrounded_dtype(key_dtype: torch.dtype) -> torch.dtype:
    """The label-cache dtype of ``label_bits=32``: the key channels unrounded (fp16 / bf16 keys are kept in their
    own dtype, wider keys in fp32)."""
    return key_dtype if key_dtype in (torch.float16, torch.bfloat16) else torch.float32


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


def union_channels(channels: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query-head channels ``[H, r]`` -> ``(union [kv_heads, U], pos [H, r])``: row g the sorted union of the
    channels of query heads ``g*G .. g*G+G-1`` (shorter unions padded with their first channel, which no query head
    reads there), ``pos[h, i]`` the position of ``channels[h, i]`` in the union of its KV head."""
    H, r = channels.shape
    if H % kv_heads:
        raise ValueError(f"{H} label rows cannot map onto {kv_heads} KV heads")
    G = H // kv_heads
    sets = [torch.unique(channels[g * G:(g + 1) * G]) for g in range(kv_heads)]  # sorted
    U = max(len(u) for u in sets)
    union = torch.stack([torch.cat([u, u[:1].expand(U - len(u))]) for u in sets])
    pos = torch.stack([torch.searchsorted(sets[h // G], channels[h]) for h in range(H)])
    return union.to(channels.dtype), pos


def union_rows(channels: torch.Tensor, kv_heads: int) -> int:
    """``U``: the label rows per KV head of the union cache of per-query-head ``channels [H, r]``."""
    return union_channels(channels, kv_heads)[0].shape[1]


class DSLayer(CacheLayerMixin):
    """One decoder layer of a `DSCache`. ``channels [R, r]``, R = KV heads or query heads (a multiple of the KV
    heads; None: a dense layer, no label cache). ``union=True`` (per-query-head channels, label_bits 16 or 32):
    store the union label cache ``[b, Hkv, U, cap]`` instead of ``[b, H, r, cap]``; ``query_channels [H, r]`` and
    ``union_pos [H, r]`` then say where each query head's channels sit in its KV head's rows."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, channels: torch.Tensor | None, label_bits: int = 16, union: bool = False):
        super().__init__()
        if label_bits not in (16, 32) and not 2 <= label_bits <= 8:
            raise ValueError(f"label_bits must be 32, 16 or 2..8, got {label_bits}")
        if union and label_bits < 16:  # a per-vector quantizer over U channels is not the one over C_h
            raise ValueError("the union label cache needs fp labels (label_bits 16 or 32)")
        self.channels, self.label_bits = channels, label_bits
        self.union = union and channels is not None
        self.query_channels = self.union_pos = None
        self.n = 0
        self.keys = self.values = None
        self.lab = self.lab_step = self.lab_lo = None
        self._index = {}  # decode index tensors per shape (query-label channels, row bases, bag offsets)

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
            if self.union:
                self.query_channels = self.channels
                self.channels, self.union_pos = union_channels(self.channels, hkv)
            if self.channels is not None:
                R, r = self.channels.shape
                if R % hkv:
                    raise ValueError(f"{R} label rows cannot map onto {hkv} KV heads")
                self.channels = self.channels.to(key_states.device)
                if self.label_bits >= 16:
                    dt = torch.float16 if self.label_bits == 16 else unrounded_dtype(key_states.dtype)
                    self.lab = key_states.new_empty(b, R, r, 0, dtype=dt)
                else:
                    packed = -(-r // 2) if self.label_bits == 4 else r
                    self.lab = key_states.new_empty(b, R, packed, 0, dtype=torch.uint8)
                    self.lab_step = key_states.new_empty(b, R, 1, 0, dtype=torch.float16)
                    self.lab_lo = key_states.new_empty(b, R, 1, 0, dtype=torch.float16)
        q = key_states.shape[2]
        self._grow(self.n + q)
        s, e = self.n, self.n + q
        self.keys[:, :, s:e] = key_states
        self.values[:, :, s:e] = value_states
        if self.channels is not None:
            b, hkv, _, d = key_states.shape
            R, r = self.channels.shape
            ch = self.channels.view(1, hkv, R // hkv, 1, r).expand(b, hkv, R // hkv, q, r)
            kl = key_states[:, :, None].expand(b, hkv, R // hkv, q, d).gather(-1, ch).view(b, R, q, r)
            if self.label_bits >= 16:
                self.lab[..., s:e] = kl.transpose(-1, -2)
            else:
                codes, step, lo = quant_labels(kl, self.label_bits)
                self.lab[..., s:e] = pack_codes(codes, self.label_bits).transpose(-1, -2)
                self.lab_step[..., s:e], self.lab_lo[..., s:e] = step.transpose(-1, -2), lo.transpose(-1, -2)
        self.n = e
        k, v = self.keys[:, :, :e], self.values[:, :, :e]
        setattr(k, LABEL_ATTR, self)
        return k, v

    def decode_index(self, kind: str, b: int, H: int, n: int) -> torch.Tensor | tuple:
        """Index tensors of a decode step, built once per shape (and K/V capacity). ``"q"``: ``[H*r]`` flat
        positions ``h*d + C_row(h)[c]`` in ``q [b, H*d]`` (``n = d``), row = ``h // (H/R)`` (union cache: ``C_h``).
        ``"upos"`` (union cache): ``[H*r]`` positions ``h*U + pos[h, c]`` in the padded query labels. ``"rows"``: the flat
        K/V row of token 0 of each query head's KV head ``[b*H, 1]``, the bag offsets ``[b*H]`` (bags of k rows)
        and ``arange(b*H*k)`` (bags of one row) (``n = k``)."""
        cap = self.keys.shape[2]
        key = (kind, b, H, n, cap)
        hit = self._index.get(key)
        if hit is None:
            dev = self.keys.device
            if kind == "q":  # union cache: each query head's own channels C_h
                ch = self.query_channels if self.union else self.channels
                R, r = ch.shape
                head = torch.arange(H, device=dev)
                hit = (head[:, None] * n + ch.to(dev)[head // (H // R)]).reshape(-1)
            elif kind == "upos":  # [H*r] flat positions h*U + pos[h, i] in the zero-padded query vectors [b, H*U]
                U = self.channels.shape[1]
                head = torch.arange(H, device=dev)
                hit = (head[:, None] * U + self.union_pos.to(dev)).reshape(-1)
            else:
                hkv = self.keys.shape[1]
                heads = torch.arange(b * H, device=dev)
                hit = (((heads // H) * hkv + (heads % H) // (H // hkv)) * cap)[:, None], heads * n, \
                    torch.arange(b * H * n, device=dev)
            self._index[key] = hit
        return hit

    def label_scores(self, ql: torch.Tensor) -> torch.Tensor:
        """``ql [b, R, m, r]`` float query labels -> approximate scores ``[b, R, m, S]`` from the label cache
        alone (one batched matmul; 4-bit: ``step_t * (ql . codes_t) + lo_t * sum(ql)``, no dequantized copy)."""
        S = self.n
        if self.label_bits >= 16:
            return torch.matmul(ql, self.lab[..., :S].float())
        codes = unpack_codes(self.lab[..., :S], self.label_bits, self.channels.shape[1])
        sc = torch.matmul(ql, codes.float())
        return sc * self.lab_step[..., :S].float() + ql.sum(-1, keepdim=True) * self.lab_lo[..., :S].float()

    def labels(self) -> torch.Tensor:
        """The label cache as float ``[b, R, S, r]`` (dequantized; union cache: ``[b, Hkv, S, U]``)."""
        S = self.n
        if self.label_bits >= 16:
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
    """`Cache` of `DSLayer`: ``channels[i] [R, r]`` per layer (R = KV heads or query heads; None = dense layer);
    ``union[i]``: layer i keeps the union label cache of its per-query-head channels."""

    def __init__(self, channels: list[torch.Tensor | None], label_bits: int = 16, union: list[bool] | None = None):
        union = union or [False] * len(channels)
        super().__init__(layers=[DSLayer(c, label_bits, u) for c, u in zip(channels, union)])

    def nbytes(self) -> dict:
        tot = {"kv": 0, "labels": 0}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                tot[k] += v
        return tot


def top_k_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim, in no particular order. On CPU numpy's introselect
    (``argpartition``, O(S); 3-4x faster than ``torch.topk`` at 16k-32k entries; its indices are left unsorted:
    sorting them so that the gathers read K/V rows in memory order made a decode step slower, not faster);
    elsewhere ``torch.topk``."""
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

    ``allowed [b, S]`` bool (padding) or None. Reads the label cache ``[b, R, S, r]`` and ``2 k`` rows of K/V
    per KV head (``selection="kv"``) or per query head (``"head"``, ``"query-labels"``). ``"query-labels"``
    needs a layer with one label row per query head, the others one per KV head."""
    b, H, _, d = query.shape
    hkv, S = layer.keys.shape[1], layer.n
    kk = min(heavy_tokens, S)
    R, r = (layer.query_channels if layer.union else layer.channels).shape
    if (R == H) != (selection == "query-labels") and H != hkv:
        raise ValueError(f"selection {selection!r} needs {'query' if selection == 'query-labels' else 'KV'}-head "
                         f"label rows; this cache has {R} (H={H}, Hkv={hkv})")
    qidx = layer.decode_index("q", b, H, d)  # [H*r] flat channels: q_h[C_row(h)] for every query head h
    ql = fake_quant(query.reshape(b, H * d).index_select(1, qidx).view(b, R, H // R, r).float(), label_bits)
    if selection == "kv":
        approx = layer.label_scores(ql.sum(2, keepdim=True))  # [b, Hkv, 1, S]
        if allowed is not None:
            approx = approx.masked_fill(~allowed[:, None, None, :], float("-inf"))
        return _attend_shared(query, layer, top_k_indices(approx, kk), scaling, allowed)
    if layer.union:  # q_h on its own channels C_h, zero on the rest of its KV head's union: [b, Hkv, G, U]
        U = layer.channels.shape[1]
        qu = ql.new_zeros(b, H * U).index_copy_(1, layer.decode_index("upos", b, H, U), ql.view(b, H * r))
        ql = qu.view(b, hkv, H // hkv, U)
    approx = layer.label_scores(ql).view(b, H, S)  # [b, H, S]: one row of scores per query head
    if allowed is not None:
        approx = approx.masked_fill(~allowed[:, None, :], float("-inf"))
    return _attend_per_head(query, layer, top_k_indices(approx, kk), scaling, allowed)


def _softmax_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # softmax in >= fp32


def _attend_shared(query, layer, idx, scaling, allowed):
    """Exact attention of the G query heads of each KV head over the shared rows ``idx [b, Hkv, 1, k]``."""
    b, H, _, d = query.shape
    K, V = layer.keys, layer.values
    hkv, cap, S = K.shape[1], K.shape[2], layer.n
    base = (torch.arange(b * hkv, device=idx.device) * cap).view(b, hkv, 1, 1)
    flat = (idx + base).reshape(-1)
    ks = K.reshape(-1, d).index_select(0, flat).view(b, hkv, -1, d)  # [b, Hkv, k, d]
    vs = V.reshape(-1, d).index_select(0, flat).view(b, hkv, -1, d)
    sc = torch.matmul(query.view(b, hkv, H // hkv, d), ks.transpose(-1, -2)) * scaling  # [b, Hkv, G, k]
    if allowed is not None:
        ok = allowed[:, None, None, :].expand(b, hkv, 1, S).gather(-1, idx)
        sc = sc.masked_fill(~ok, torch.finfo(sc.dtype).min)
    p = F.softmax(sc, dim=-1, dtype=_softmax_dtype(query)).to(query.dtype)
    return torch.matmul(p, vs).reshape(b, H, 1, d)


def _attend_per_head(query, layer, idx, scaling, allowed):
    """Exact attention of each query head h over its own rows ``idx [b, H, k]`` of KV head ``h // G``: the key
    rows gathered once (``embedding_bag`` with bags of one row: its CPU kernel prefetches rows, faster than
    ``index_select`` when K is not in cache), one bmm for every head's scores, and ``embedding_bag`` for
    ``sum_t p[h, t] V[g(h), t]`` (the value rows are read in place, not copied)."""
    b, H, _, d = query.shape
    K, V = layer.keys, layer.values
    S, kk = layer.n, idx.shape[-1]
    base, offsets, rows = layer.decode_index("rows", b, H, kk)
    flat = (idx.reshape(b * H, kk) + base).view(-1)
    ks = F.embedding_bag(flat, K.view(-1, d), rows, mode="sum").view(b * H, kk, d)  # bags of one row: a gather
    sc = torch.bmm(query.reshape(b * H, 1, d), ks.transpose(1, 2)).view(b * H, kk)
    sc.mul_(scaling)
    if allowed is not None:
        ok = allowed[:, None, :].expand(b, H, S).gather(-1, idx).view(b * H, kk)
        sc = sc.masked_fill(~ok, torch.finfo(sc.dtype).min)
    p = F.softmax(sc, dim=-1, dtype=_softmax_dtype(query)).to(query.dtype)
    out = F.embedding_bag(flat, V.view(-1, d), offsets, mode="sum", per_sample_weights=p.view(-1))
    return out.view(b, H, 1, d)
