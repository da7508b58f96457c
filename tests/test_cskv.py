"""CSKV: factorization, bi-branch cache (transformers Cache), emulated single-pass attention, pass + export/load."""
from __future__ import annotations

import json

import pytest
import torch

from ptq.kv.cskv import (CSKVConfig, asymptotic_bytes_per_token, convert_model, expected_cache_bytes, load_cskv_model,
                         make_cache)
from ptq.kv.cskv_fit import asvd_factors, fit_factors, recon_error
from ptq.kv.cskv_cache import CSKVCache, dequantize_groups, quantize_groups
from ptq.model_io import full_model


def _factors(model, ccfg, act_mean=None):
    d = ccfg.dims(model.config)
    out = {}
    for i, layer in enumerate(model.model.layers):
        ak, bk = asvd_factors(layer.self_attn.k_proj.weight.data, d["r_k"], act_mean)
        av, bv = asvd_factors(layer.self_attn.v_proj.weight.data, d["r_v"], act_mean)
        out[i] = {"k_proj_a": ak, "k_proj_b": bk, "v_proj_a": av, "v_proj_b": bv}
    return out


def _converted(folder, **kw):
    model, _ = full_model(folder)
    ccfg = CSKVConfig(**kw)
    return convert_model(model, ccfg, _factors(model, ccfg))


@torch.no_grad()
def _decode(model, ids, prefill: int):
    """Logits of ``ids`` fed as one ``prefill`` chunk then token by token through a `CSKVCache`."""
    cache = make_cache(model)
    outs = [model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        outs.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2"])
def test_full_rank_reproduces_dense(tiny_models, kind):
    dense, _ = full_model(tiny_models[kind])
    ids = torch.randint(2, 300, (2, 26), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dense(input_ids=ids, use_cache=False).logits
    model = _converted(tiny_models[kind], k_density=1.0, v_density=1.0, window=8, store_dtype="float32")
    with torch.no_grad():
        emu = model(input_ids=ids).logits
    dec, cache = _decode(model, ids, prefill=11)
    assert isinstance(cache, CSKVCache) and cache.get_seq_length() == 26
    torch.testing.assert_close(emu, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(dec, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits,store,atol", [(16, "float32", 1e-4), (4, "float16", 1e-3)])
def test_emulated_forward_equals_token_by_token(tiny_models, bits, store, atol):
    """The single-pass two-branch mask reproduces real decoding with the compressed cache. (4-bit: features are
    rounded to fp16 before quantization, so fp32 noise of batched vs single-token GEMMs cannot flip a code.)"""
    model = _converted(tiny_models["llama-gqa"], k_density=0.5, v_density=0.5, window=8, k_bits=bits,
                       v_bits=bits, store_dtype=store)
    dense, _ = full_model(tiny_models["llama-gqa"])
    ids = torch.randint(2, 300, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emu = model(input_ids=ids).logits
        ref = dense(input_ids=ids, use_cache=False).logits
    dec, _ = _decode(model, ids, prefill=13)
    torch.testing.assert_close(dec, emu, atol=atol, rtol=0)
    # the first window is exact; later tokens really go through the low-rank branch
    torch.testing.assert_close(emu[:, :8], ref[:, :8], atol=1e-3 if store == "float16" else 1e-4, rtol=0)
    assert (emu[:, 8:] - ref[:, 8:]).abs().max() > 1e-2


def test_generate_200_tokens_with_compressed_cache(tiny_models):
    model = _converted(tiny_models["llama-gqa"], k_density=0.25, v_density=0.5, k_bits=4, v_bits=4)
    prompt = torch.tensor([[0, 5, 9, 77, 31, 2, 100]])
    out = model.generate(prompt, max_new_tokens=200, min_new_tokens=200, do_sample=False,
                         return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, CSKVCache)  # generate's default cache is the CSKV one
    assert out.sequences.shape[1] == 207 and cache.get_seq_length() == 206
    assert cache.layers[0].t["k_codes"].shape[1] == 192  # 6 full 32-token windows quantized, 14 in the window
    assert cache.layers[0].t["res_k"].shape[2] == 14


def test_cache_bytes_match_layout(tiny_models):
    model = _converted(tiny_models["llama-gqa"], k_density=0.5, v_density=0.5, window=8, k_bits=4, v_bits=4)
    cfg = model.config  # 2 layers, n_kv 2, d 16 -> r_k = r_v = 16, v group 8
    ids = torch.randint(2, 300, (1, 35))
    _, cache = _decode(model, ids, prefill=3)
    L, T, W = 2, 35, 8
    full, res = 32, 3
    k = full * 16 // 2 + (full // W) * 16 * 4  # packed 4-bit codes + fp16 scale + fp16 min per channel per window
    v = full * 16 // 2 + full * 2 * 4  # codes + (scale, min) per token per head group
    window = res * (2 * 2 * 16 * 2) + res * (16 + 16) * 2  # exact fp16 K, V + fp16 features of the window
    assert cache.nbytes() == L * (k + v + window) == expected_cache_bytes(model.cskv_config, cfg, T)
    assert asymptotic_bytes_per_token(model.cskv_config, cfg) == L * (k + v) / full
    assert cache.get_seq_length() == T


def test_quantizer_per_channel_and_per_token():
    x = torch.randn(2, 4, 8, 6) + 10 * torch.rand(6)  # [b, windows, W, r]; channel offsets: ranges exclude 0
    codes, scale, lo = quantize_groups(x, 4, dim=2)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and scale.shape == (2, 4, 1, 6)
    err = (dequantize_groups(codes, scale, lo) - x).abs()
    assert (err <= 0.5 * scale.float() + 1e-2).all()  # half a step (+ fp16 rounding of the minimum)
    assert err.mean() < 0.3 * scale.float().mean()
    codes_v, scale_v, _ = quantize_groups(x.reshape(2, 32, 2, 3), 2, dim=3)  # per token, groups of 3 channels
    assert scale_v.shape == (2, 32, 2, 1) and int(codes_v.max()) <= 3


def test_asvd_and_fit():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=g)
    a, b = asvd_factors(w, 32)
    torch.testing.assert_close(b @ a, w, atol=1e-4, rtol=0)  # full rank: exact
    x = torch.randn(2000, 48, generator=g) * torch.logspace(-1, 1, 48)  # anisotropic activations
    m = x.abs().mean(0)
    e_svd = recon_error(w, *asvd_factors(w, 8), x)
    a8, b8 = asvd_factors(w, 8, m)
    e_asvd = recon_error(w, a8, b8, x)
    assert e_asvd < 0.8 * e_svd
    af, bf, e0, e1 = fit_factors(w, a8, b8, x, steps=200, seed=0)
    assert e1 < 0.95 * e0 and recon_error(w, af, bf, x) < e_asvd


def test_pass_export_and_load(tiny_models, tmp_path):
    from ptq.export.base import DenseWriter
    from ptq.model_io import StreamingModel
    from ptq.passes.cskv import CSKVPass
    from ptq.pipeline import compress_loop
    from ptq.recipes import load_recipe

    assert load_recipe("cskv").passes[0][0] == "cskv"
    sm = StreamingModel.open(str(tiny_models["llama-gqa"]))
    calib = torch.randint(2, 300, (4, 64), generator=torch.Generator().manual_seed(2))
    p = CSKVPass(CSKVPass.Options(k_density=0.5, v_density=0.5, window=8, fit_steps=50, fit_tokens=128))
    out = tmp_path / "cskv"
    w = DenseWriter(out, sm)
    loop = compress_loop(sm, [p], calib, None, w)
    w.write_nonlayer()
    w.finalize(loop.artifacts)
    meta = json.loads((out / "cskv.json").read_text())
    assert meta["dims"]["r_k"] == 16 and len(meta["layers"]) == 2
    assert all(s["cskv.k.err_fit"] <= s["cskv.k.err_init"] + 1e-6 for s in meta["layers"])
    model = load_cskv_model(out)
    assert model.model.layers[1].self_attn.k_proj_a.weight.shape == (16, 64)
    ids = torch.randint(2, 300, (1, 20))
    with torch.no_grad():
        emu = model(input_ids=ids).logits
    dec, _ = _decode(model, ids, prefill=12)
    torch.testing.assert_close(dec, emu, atol=2e-3, rtol=0)  # fp16 window storage
    q4 = load_cskv_model(out, k_bits=4, v_bits=4)
    assert q4.cskv_config.k_bits == 4 and q4.generate(ids[:, :3], max_new_tokens=5, min_new_tokens=5).shape[1] == 8
    from transformers import AutoModelForCausalLM  # plain transformers still loads the dense model

    plain = AutoModelForCausalLM.from_pretrained(out)
    dense, _ = full_model(tiny_models["llama-gqa"])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_rejects_non_rope_and_bad_options(tiny_models):
    model, _ = full_model(tiny_models["opt"])
    with pytest.raises(ValueError, match="RoPE"):
        convert_model(model, CSKVConfig(), {})
    with pytest.raises(ValueError):
        CSKVConfig(k_bits=1)
    with pytest.raises(ValueError):
        CSKVConfig(k_density=0.0)


def test_keep_keys_decode_equals_emulated_and_counts_bytes(tiny_models):
    """keep_keys: decode reads the kept RoPE'd keys (only new windows rebuilt); same logits as the emulated pass
    (fp32 store: exact up to GEMM order); the kept keys are counted in the cache bytes."""
    model = _converted(tiny_models["llama-gqa"], k_density=0.5, v_density=0.5, window=8, k_bits=4, v_bits=4,
                       store_dtype="float32", keep_keys=True)
    ids = torch.randint(2, 300, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emu = model(input_ids=ids).logits
    dec, cache = _decode(model, ids, prefill=13)
    torch.testing.assert_close(dec, emu, atol=1e-3, rtol=0)
    kept = cache.layers[0].t["k_kept"]
    assert kept.shape == (1, 2, 24, 16)  # 3 finished windows of 8 tokens, n_kv 2, d 16
    model.cskv_config.keep_keys = False
    for m in model.modules():
        if hasattr(m, "ccfg"):
            m.ccfg = model.cskv_config
    _, cache2 = _decode(model, ids, prefill=13)
    assert "k_kept" not in cache2.layers[0].t
    assert cache.nbytes() - cache2.nbytes() == 2 * 24 * 2 * 16 * 4  # 2 layers x kept fp32 keys
    assert cache.nbytes() == expected_cache_bytes(model.cskv_config.__class__(**{**model.cskv_config.to_dict(),
                                                                                 "keep_keys": True}), model.config, 30)


def test_quantization_aware_fit_lowers_quantized_error():
    """With the cache quantizer in the loss (STE), the error measured through the quantizer: lower than the plain
    fit's at 2-bit V (per token groups), on par at 3-bit K (per channel over windows); the STE passes gradients."""
    from ptq.kv.cskv_fit import fake_quant_ste

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=g)
    x = torch.randn(1024, 48, generator=g) * torch.logspace(-1, 1, 48)
    a8, b8 = asvd_factors(w, 12, x.abs().mean(0))
    for quant in ({"bits": 3, "axis": "channel", "window": 32}, {"bits": 2, "axis": "token", "group": 6}):
        c = x[:64] @ a8.t()
        cq = fake_quant_ste(c.clone().requires_grad_(), **quant)
        assert (cq - c).abs().max() > 0  # really quantizes
        cq.sum().backward()  # straight-through: the gradient flows
        af, bf, _, _ = fit_factors(w, a8, b8, x, steps=100, batch=512, seed=0)
        aq, bq, _, e_qat = fit_factors(w, a8, b8, x, steps=100, batch=512, seed=0, quant=quant)
        e_plain = recon_error(w, af, bf, x, quant)
        slack = 1.01 if quant["axis"] == "channel" else 0.99  # 3-bit K: on par; 2-bit V: QAT clearly lower
        assert recon_error(w, aq, bq, x, quant) < slack * e_plain, quant


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_unpack_codes_equals_primitive_unpack(bits):
    from ptq.kv.cskv_cache import unpack_codes
    from ptq.quant.primitives import pack, unpack

    for k in (5, 16, 72, 192):
        codes = torch.randint(0, 2**bits, (2, 7, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
        packed = pack(codes, bits)
        assert torch.equal(unpack_codes(packed, bits, k), codes)
        assert torch.equal(unpack_codes(packed, bits, k), unpack(packed, bits, k))


def test_rope_table_is_shared_and_grows_with_the_cache(tiny_models):
    """The rotary table a decode step reads covers every cached position once (computed for new positions only),
    equals the model's rotary embedding at those positions, and is dropped when the batch is reordered."""
    model = _converted(tiny_models["llama-gqa"], k_density=0.5, v_density=0.5, window=8, k_bits=4, v_bits=4)
    ids = torch.randint(2, 300, (1, 21), generator=torch.Generator().manual_seed(3))
    _, cache = _decode(model, ids, prefill=13)
    cos, sin = cache._rope
    assert cos.shape[:2] == (1, 21)
    pos = torch.arange(21)[None]
    ref_cos, ref_sin = model.model.rotary_emb(cos, pos)
    torch.testing.assert_close(cos, ref_cos, atol=0, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=0, rtol=0)
    cache.reorder_cache(torch.tensor([0]))
    assert cache._rope is None
