"""Bi-branch KV cache of CSKV (Wang et al. 2024, arXiv 2409.10593), transformers `Cache` compatible.

Per decoder layer the cache holds, for ``T`` tokens seen so far and a window ``W`` (default 32):

* **compressed branch** (tokens ``[0, floor(T/W)*W)``, complete windows): the low-rank features
  ``c_k = A_k x  [b, n, r_k]`` and ``c_v = A_v x  [b, n, r_v]`` stored *pre-RoPE*. With ``bits < 16`` they are
  quantized when a window fills (asymmetric min/max, ``s = (max-min).clamp(1e-5) / (2^b-1)``,
  ``q = clamp(round((c - min)/s), 0, 2^b-1)``, ``c_hat = q s + min``, see `quantize_groups`):
  K per channel over the W tokens of the window (KIVI), V per token in groups of ``r_v / n_kv`` channels.
  Codes are bit-packed (uint8), scales and minima fp16.
* **full-precision branch** (tokens ``[floor(T/W)*W, T)``, the current, incomplete window, 0..W-1 tokens):
  the exact pre-RoPE ``K, V [b, n_kv, R, d]`` plus their (not yet quantized) features.

Attention semantics (the reference `LlamaAttentionForCSKV` decode path): a query at index ``t`` sees the exact
K/V of keys in its own window (``j // W == t // W``, ``j <= t``) and ``K_hat = RoPE(B_k c_k_hat)``,
``V_hat = B_v c_v_hat`` for every key of an earlier window. The attention module (`ptq.kv.cskv`) builds that
mask from the `CSKVView` returned by `CSKVLayer.append`; running a whole sequence through a fresh layer is
therefore exactly equal to decoding it token by token.

Memory: `CSKVLayer.nbytes` counts every stored tensor (codes, scales, minima, fp features, window K/V);
positions (int64, one per token) are bookkeeping shared with any cache and are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ptq.quant.primitives import pack, unpack


def quantize_groups(x: torch.Tensor, bits: int, dim: int):
    """Asymmetric min/max codes of ``x`` reduced over ``dim``: ``s = (max-min).clamp(1e-5) / (2^b-1)``,
    ``q = clamp(round((x - min) / s), 0, 2^b-1)``, ``x_hat = q s + min`` (KIVI's scale + min form).

    The reference `KVQuantizer` stores ``z = clamp(-round(min/s), 0, 2^b-1)`` instead; that clamp clips every
    group whose range excludes 0 (e.g. a feature channel in [10, 11] decodes to [0, 1]), which low-rank features
    often are, so we keep the fp16 minimum. Returns ``codes`` (uint8, shape of x), ``scale`` and ``lo`` (fp16, x
    with ``dim`` of size 1)."""
    qmax = 2**bits - 1
    xf = x.float()
    lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    scale = ((hi - lo).clamp(min=1e-5) / qmax).half()
    lo = lo.half()
    codes = torch.clamp(torch.round((xf - lo.float()) / scale.float()), 0, qmax)
    return codes.to(torch.uint8), scale, lo


def dequantize_groups(codes, scale, lo) -> torch.Tensor:
    return codes.float() * scale.float() + lo.float()


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """`ptq.quant.primitives.unpack` for uint8 words: ``[..., W]`` -> uint8 codes ``[..., k]`` (same layout, code i
    at bits ``(i % per) * bits`` of word ``i // per``). Widths that divide 8 shift in uint8 (a decode step unpacks
    every cached code; the generic path widens to int64 first)."""
    if packed.dtype != torch.uint8 or not 1 <= bits <= 8:
        return unpack(packed, bits, k)
    if bits == 8:
        return packed[..., :k]
    mask = 2**bits - 1
    if 8 % bits == 0:
        parts = [(packed >> (j * bits)) & mask for j in range(8 // bits)]
        return torch.stack(parts, -1).flatten(-2)[..., :k]
    # other widths: 8 codes fill exactly `bits` bytes (LSB-first bitstream); join each group into one integer
    w = packed.shape[-1]
    ng = -(-w // bits)
    p = torch.nn.functional.pad(packed, (0, ng * bits - w)) if ng * bits != w else packed
    g = p.reshape(*p.shape[:-1], ng, bits).to(torch.int32 if bits <= 3 else torch.int64)
    val = g[..., 0]
    for j in range(1, bits):
        val = val | (g[..., j] << (8 * j))
    codes = (val[..., None] >> (torch.arange(8, dtype=val.dtype) * bits)) & mask
    return codes.flatten(-2)[..., :k].to(torch.uint8)


@dataclass
class CSKVView:
    """What attention needs after an `append` of ``q`` new tokens (``P`` already cached, ``T = P + q``).

    ``rec_ck [b, Nr, r_k]``, ``rec_cv [b, Nr, r_v]``: dequantized features of keys ``[0, Nr)``, ``Nr = floor(T/W)*W``;
    ``ex_k, ex_v [b, n_kv, T-E, d]``: exact pre-RoPE K/V of keys ``[E, T)``, ``E = floor(P/W)*W``;
    ``pos [b, T]``: position ids of all keys."""

    rec_ck: torch.Tensor
    rec_cv: torch.Tensor
    ex_k: torch.Tensor
    ex_v: torch.Tensor
    pos: torch.Tensor
    past: int
    ex_start: int
    total: int
    window: int

    def branch_masks(self, exact_prefill: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks ``[q, Nr]`` (compressed branch) and ``[q, T-E]`` (exact branch), True = attend."""
        dev = self.ex_k.device
        t = torch.arange(self.past, self.total, device=dev)[:, None]
        jr = torch.arange(self.rec_ck.shape[1], device=dev)[None, :]
        je = torch.arange(self.ex_start, self.total, device=dev)[None, :]
        w = self.window
        if exact_prefill and self.past == 0:
            return torch.zeros(t.shape[0], jr.shape[1], dtype=torch.bool, device=dev), je <= t
        return jr // w < t // w, (je // w == t // w) & (je <= t)


class CSKVLayer(CacheLayerMixin):
    """One layer of the bi-branch cache. Use `append`, not `update` (CSKV stores features, not K/V)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, window: int = 32, k_bits: int = 16, v_bits: int = 16, v_group: int | None = None,
                 store_dtype: torch.dtype = torch.float16):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        for b in (k_bits, v_bits):
            if b != 16 and not 2 <= b <= 8:
                raise ValueError(f"KV bits must be 16 (no quantization) or 2..8, got {b}")
        self.window, self.k_bits, self.v_bits, self.v_group = window, k_bits, v_bits, v_group
        self.store_dtype = store_dtype
        self.n_tok = 0
        self.t: dict[str, torch.Tensor | None] = {}  # every stored tensor, by name

    # -- storage helpers -----------------------------------------------------------------------------
    def _cat(self, name: str, x: torch.Tensor, dim: int = 1) -> None:
        old = self.t.get(name)
        self.t[name] = x if old is None else torch.cat([old, x], dim)

    def _store_k(self, ck: torch.Tensor) -> None:
        """``ck [b, nW*W, r_k]`` (complete windows)."""
        if self.k_bits == 16:
            return self._cat("k_feat", ck.to(self.store_dtype))
        b, n, r = ck.shape
        chunks = ck.reshape(b, n // self.window, self.window, r)
        codes, scale, lo = quantize_groups(chunks, self.k_bits, dim=2)  # per channel over the window
        self._cat("k_codes", pack(codes.reshape(b, n, r), self.k_bits))
        self._cat("k_scale", scale.squeeze(2))
        self._cat("k_min", lo.squeeze(2))

    def _store_v(self, cv: torch.Tensor) -> None:
        if self.v_bits == 16:
            return self._cat("v_feat", cv.to(self.store_dtype))
        b, n, r = cv.shape
        g = self.v_group or r
        codes, scale, lo = quantize_groups(cv.reshape(b, n, r // g, g), self.v_bits, dim=3)  # per token/group
        self._cat("v_codes", pack(codes.reshape(b, n, r), self.v_bits))
        self._cat("v_scale", scale.squeeze(3))
        self._cat("v_min", lo.squeeze(3))

    def _load_k(self, r: int, dtype, start: int = 0) -> torch.Tensor | None:
        """Dequantized key features of tokens ``[start, Nr)`` (``start`` a multiple of the window)."""
        if self.k_bits == 16:
            f = self.t.get("k_feat")
            return None if f is None else f[:, start:].to(dtype)
        if self.t.get("k_codes") is None:
            return None
        codes = unpack_codes(self.t["k_codes"][:, start:], self.k_bits, r)
        b, n, _ = codes.shape
        c = codes.reshape(b, n // self.window, self.window, r)
        w0 = start // self.window
        return dequantize_groups(c, self.t["k_scale"][:, w0:, None], self.t["k_min"][:, w0:, None]).reshape(b, n, r).to(dtype)

    def _load_v(self, r: int, dtype) -> torch.Tensor | None:
        if self.v_bits == 16:
            f = self.t.get("v_feat")
            return None if f is None else f.to(dtype)
        if self.t.get("v_codes") is None:
            return None
        codes = unpack_codes(self.t["v_codes"], self.v_bits, r)
        b, n, _ = codes.shape
        g = self.v_group or r
        c = codes.reshape(b, n, r // g, g)
        return dequantize_groups(c, self.t["v_scale"][..., None], self.t["v_min"][..., None]).reshape(b, n, r).to(dtype)

    # -- the CSKV update -----------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor,
               pos: torch.Tensor, load_k: bool = True) -> CSKVView:
        """Add ``q`` tokens: exact pre-RoPE ``k, v [b, n_kv, q, d]``, features ``ck [b, q, r_k]``,
        ``cv [b, q, r_v]``, positions ``pos [b, q]``. Complete windows move to the compressed branch.
        ``load_k=False``: the view's ``rec_ck`` is an empty ``[b, Nr, 0]`` placeholder (keys kept elsewhere)."""
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        dtype, sd, w = k.dtype, self.store_dtype, self.window
        P, q = self.n_tok, k.shape[2]
        T = P + q
        E = (P // w) * w
        res = {n: self.t.get(n) for n in ("res_k", "res_v", "res_ck", "res_cv")}
        ex_k = k.to(sd) if res["res_k"] is None else torch.cat([res["res_k"], k.to(sd)], 2)
        ex_v = v.to(sd) if res["res_v"] is None else torch.cat([res["res_v"], v.to(sd)], 2)
        fk = ck.to(sd) if res["res_ck"] is None else torch.cat([res["res_ck"], ck.to(sd)], 1)
        fv = cv.to(sd) if res["res_cv"] is None else torch.cat([res["res_cv"], cv.to(sd)], 1)
        n_full = (T // w) * w - E  # tokens of newly completed windows
        if n_full > 0:
            self._store_k(fk[:, :n_full])
            self._store_v(fv[:, :n_full])
        self.t["res_k"], self.t["res_v"] = ex_k[:, :, n_full:], ex_v[:, :, n_full:]
        self.t["res_ck"], self.t["res_cv"] = fk[:, n_full:], fv[:, n_full:]
        self.pos = pos if self.pos is None else torch.cat([self.pos, pos], 1)
        self.n_tok = T
        rk, rv = ck.shape[-1], cv.shape[-1]
        b = k.shape[0]
        rec_cv = self._load_v(rv, dtype)
        if rec_cv is None:
            rec_cv = k.new_zeros(b, 0, rv)
        rec_ck = self._load_k(rk, dtype) if load_k else k.new_empty(b, rec_cv.shape[1], 0)
        if rec_ck is None:
            rec_ck = k.new_zeros(b, 0, rk)
        return CSKVView(rec_ck, rec_cv, ex_k.to(dtype), ex_v.to(dtype), self.pos, P, E, T, w)

    # -- CacheLayerMixin API -------------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.pos = None
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a CSKV cache layer stores low-rank features: it is filled by ptq.kv.cskv.CSKVAttention "
                        "(load the model with ptq.kv.cskv.load_cskv_model), not by a plain attention module")

    def get_seq_length(self) -> int:
        return self.n_tok

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n_tok + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.t, self.n_tok, self.pos = {}, 0, None
        self.is_initialized = False

    def _map(self, fn) -> None:
        self.t = {k: (fn(v) if v is not None else None) for k, v in self.t.items()}
        if getattr(self, "pos", None) is not None:
            self.pos = fn(self.pos)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda x: x[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("CSKV cache cannot be cropped (quantized windows are not reversible)")

    def nbytes(self) -> int:
        """Bytes of everything this layer stores (positions excluded)."""
        return sum(v.numel() * v.element_size() for v in self.t.values() if v is not None)


class CSKVCache(Cache):
    """`Cache` of `CSKVLayer` (one per decoder layer); pass it as ``past_key_values`` to ``model.generate`` or
    ``model(...)`` of a model converted with `ptq.kv.cskv` (`load_cskv_model` also makes it generate's default)."""

    def __init__(self, num_layers: int, window: int = 32, k_bits: int = 16, v_bits: int = 16,
                 v_group: int | None = None, store_dtype: torch.dtype = torch.float16,
                 exact_prefill: bool = False):
        super().__init__(layers=[CSKVLayer(window, k_bits, v_bits, v_group, store_dtype) for _ in range(num_layers)])
        self.exact_prefill = exact_prefill
        self._rope = None  # (cos, sin) [b, T, d] of the cached positions, shared by all layers

    def rope_table(self, pos: torch.Tensor, fn) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [b, T, d]`` for the positions ``pos [b, T]`` of every cached token. Every layer needs them
        for the keys it rebuilds; they are computed (``fn(pos[:, a:b])`` = the model's rotary embedding) only for
        positions not seen before and kept here, not per layer. Bookkeeping like the positions: not in `nbytes`."""
        T = pos.shape[1]
        have = 0 if self._rope is None else self._rope[0].shape[1]
        if self._rope is not None and self._rope[0].shape[0] != pos.shape[0]:
            have, self._rope = 0, None
        if have < T:
            c, s = fn(pos[:, have:])
            self._rope = (c, s) if self._rope is None else (torch.cat([self._rope[0], c], 1),
                                                            torch.cat([self._rope[1], s], 1))
        return self._rope[0][:, :T], self._rope[1][:, :T]

    def reset(self):
        self._rope = None
        super().reset()

    def reorder_cache(self, beam_idx):
        self._rope = None
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        self._rope = None
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices):
        self._rope = None
        super().batch_select_indices(indices)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def dense_kv_bytes(n_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int, bytes_per: int = 2) -> int:
    """Bytes of a plain fp16 K/V cache: ``T * layers * 2 (K,V) * n_kv * d * 2``."""
    return n_tokens * num_layers * 2 * num_kv_heads * head_dim * bytes_per
