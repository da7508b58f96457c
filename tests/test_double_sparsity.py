"""Double Sparsity: calibration statistics, sparse attention math, transformers install, compress artifacts."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ptq.model_io import full_model
from ptq.sparse.double_sparsity import (ChannelStats, DSConfig, apply_rope, double_sparse_attention,
                                        fake_quant_labels, install, install_from, random_labels, uninstall)


def dense_ref(q, k, v, scaling, allowed):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scaling
    s = s.masked_fill(~allowed, float("-inf"))
    return F.softmax(s, -1) @ v


def oracle_topk(q, k, v, scaling, allowed, kk):
    """Exact top-k attention: keep the kk largest exact scores per row."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scaling
    s = s.masked_fill(~allowed, float("-inf"))
    idx = s.topk(min(kk, s.shape[-1]), -1).indices
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True) & allowed
    return F.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v


def causal(Lq, Lk):
    return (torch.arange(Lk)[None] <= torch.arange(Lq)[:, None] + (Lk - Lq))[None, None]


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("H,Hkv,Lq", [(4, 4, 37), (6, 2, 37), (6, 2, 1)])
def test_full_r_full_k_equals_dense(H, Hkv, Lq):
    """r = head_dim and k = all tokens: exactly dense attention (prefill with chunks, and decode)."""
    b, Lk, d = 2, 37, 16
    q, k, v = rnd(b, H, Lq, d, seed=1), rnd(b, Hkv, Lk, d, seed=2), rnd(b, Hkv, Lk, d, seed=3)
    labels = random_labels(H, d, seed=4)
    cfg = DSConfig(heavy_tokens=Lk, heavy_channels=d, q_chunk=8)
    out = double_sparse_attention(q, k, v, labels, cfg, d**-0.5, None)
    ref = dense_ref(q, k, v, d**-0.5, causal(Lq, Lk))
    assert (out - ref).abs().max() < 1e-12
    # the same through a bool mask and an additive float mask
    al = causal(Lq, Lk).expand(b, 1, Lq, Lk)
    fm = torch.zeros(b, 1, Lq, Lk, dtype=torch.float64).masked_fill(~al, torch.finfo(torch.float64).min)
    for m in (al, fm):
        assert (double_sparse_attention(q, k, v, labels, cfg, d**-0.5, m) - ref).abs().max() < 1e-12


@pytest.mark.parametrize("Lq", [1, 40])
def test_full_r_is_exact_topk(Lq):
    """With r = d the label scores are exact, so k < Lk keeps exactly the true top-k tokens."""
    b, H, Hkv, Lk, d, kk = 1, 4, 2, 40, 8, 7
    q, k, v = rnd(b, H, Lq, d, seed=5), rnd(b, Hkv, Lk, d, seed=6), rnd(b, Hkv, Lk, d, seed=7)
    cfg = DSConfig(heavy_tokens=kk, heavy_channels=d, q_chunk=16, selection="head")
    out = double_sparse_attention(q, k, v, random_labels(Hkv, d, 1), cfg, d**-0.5, None)
    ora = oracle_topk(q, k, v, d**-0.5, causal(Lq, Lk), kk)
    assert (out - ora).abs().max() < 1e-12
    assert (out - dense_ref(q, k, v, d**-0.5, causal(Lq, Lk))).abs().max() > 1e-3  # really sparse


def test_decode_gather_equals_prefill_mask_path():
    """The decode gather path and the prefill masking path agree on the last query row (r < d, 4-bit labels)."""
    b, H, Hkv, L, d = 1, 4, 2, 50, 16
    q, k, v = rnd(b, H, L, d, seed=8), rnd(b, Hkv, L, d, seed=9), rnd(b, Hkv, L, d, seed=10)
    cfg = DSConfig(heavy_tokens=9, heavy_channels=4, label_bits=4)
    lab = random_labels(H, d, 2)
    full = double_sparse_attention(q, k, v, lab, cfg, None, None)
    last = double_sparse_attention(q[:, :, -1:], k, v, lab, cfg, None, None)
    assert (full[:, :, -1:] - last).abs().max() < 1e-12


def test_fake_quant_labels():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    assert torch.equal(fake_quant_labels(x, 2), x)  # 4 levels on [0, 3]: exact; constant row kept
    y = fake_quant_labels(torch.tensor([[0.0, 0.4, 1.0]]), 1)
    assert torch.equal(y, torch.tensor([[0.0, 0.0, 1.0]]))


def test_channel_stats_accumulate_all_batches():
    """qk statistic = mean over ALL tokens of every batch (the reference keeps only the last batch)."""
    H, Hkv, d, L = 4, 2, 8, 5
    st = ChannelStats(H, Hkv, d)
    pos = torch.arange(L, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    emb = torch.cat([pos[:, None] * inv] * 2, -1)[None]
    cos, sin = emb.cos(), emb.sin()
    qs, ks = [rnd(1, L, H * d, seed=20 + i) * (1 + 3 * i) for i in range(3)], [rnd(1, L, Hkv * d, seed=30 + i) for i in range(3)]
    for q, k in zip(qs, ks):
        st.update(q, k, cos, sin)
    q4 = torch.cat([apply_rope(q.view(1, L, H, d).transpose(1, 2), cos, sin) for q in qs], 2)
    k4 = torch.cat([apply_rope(k.view(1, L, Hkv, d).transpose(1, 2), cos, sin) for k in ks], 2)
    want = (q4 * k4.repeat_interleave(2, 1)).abs().mean((0, 2))
    m = st.means()
    assert st.tokens == 3 * L
    assert torch.allclose(m["qk"], want, atol=1e-6)
    last_only = (q4[:, :, -L:] * k4.repeat_interleave(2, 1)[:, :, -L:]).abs().mean((0, 2))
    assert not torch.allclose(m["qk"], last_only, atol=1e-3)
    assert torch.allclose(m["qk_kv"], want.view(Hkv, 2, d).sum(1), atol=1e-6)
    lab = st.labels()["qk"]
    assert torch.equal(lab[:, 0], want.argmax(-1))
    assert sorted(lab[0].tolist()) == list(range(d))


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    """Only the tiny GQA Llama (building all tiny_models costs ~13 s)."""
    from conftest import make_tiny

    return make_tiny("llama-gqa", tmp_path_factory.mktemp("ds") / "llama-gqa")


def _ids(n=2, L=48, vocab=300, seed=0):
    return torch.randint(2, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def test_installed_model_full_k_equals_dense_and_oracle(gqa_dir):
    """In a real transformers model: k >= L gives the dense logits; r = d with k < L gives exact top-k attention
    (checked against an eager model whose attention keeps the true top-k); small r and k change the logits."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    model, cfg = full_model(gqa_dir)
    model = model.double()
    ids = _ids()
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        H, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        labels = {i: random_labels(H, d, i) for i in range(cfg.num_hidden_layers)}
        install(model, labels, DSConfig(heavy_tokens=48, heavy_channels=d, dense_layers=0, study=True))
        assert (model(input_ids=ids).logits - dense).abs().max() < 1e-10
        install(model, labels, DSConfig(heavy_tokens=6, heavy_channels=d, dense_layers=0, q_chunk=16, study=True,
                                        selection="head"))
        sparse = model(input_ids=ids).logits

        def oracle(module, q, k, v, mask, scaling=None, **kw):
            al = causal(q.shape[2], k.shape[2]) if mask is None else mask
            return oracle_topk(q, k, v, scaling, al, 6).transpose(1, 2), None

        AttentionInterface.register("test_oracle", oracle)
        AttentionMaskInterface.register("test_oracle", sdpa_mask)
        uninstall(model, "test_oracle")
        assert (sparse - model(input_ids=ids).logits).abs().max() < 1e-10
        assert (sparse - dense).abs().max() > 1e-3
        # dense_layers / threshold: layer 0 dense, layer 1 sparse differs from all-sparse
        install(model, labels, DSConfig(heavy_tokens=6, heavy_channels=d, dense_layers=1, study=True,
                                        selection="head"))
        part = model(input_ids=ids).logits
        assert (part - sparse).abs().max() > 1e-6 and (part - dense).abs().max() > 1e-6
        install(model, labels, DSConfig(heavy_tokens=6, heavy_channels=d, dense_layers=0, sparse_threshold=48,
                                        study=True))
        assert (model(input_ids=ids).logits - dense).abs().max() < 1e-10
        uninstall(model)
        assert (model(input_ids=ids).logits - dense).abs().max() < 1e-10


@pytest.mark.parametrize("selection,bits", [("kv", 16), ("head", 4), ("query-labels", 16), ("query-labels", 4)])
def test_runtime_decode_equals_study_path(gqa_dir, selection, bits):
    """Token-by-token decode through a DSCache (label cache, top-k gather) gives the logits of one forward
    through the accuracy-study path (each query its own top-k over the same channels, selection, label bits);
    generate() builds a DSCache by default and its prefill is dense."""
    from ptq.sparse import make_cache
    from ptq.sparse.ds_runtime import DSCache

    model, cfg = full_model(gqa_dir)
    H, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    labels = {i: random_labels(H, d, i) for i in range(2)}
    install(model, labels, DSConfig(heavy_tokens=8, heavy_channels=4, dense_layers=0, study=True,
                                    selection=selection, label_bits=bits))
    ids = _ids(1, 30, seed=3)
    with torch.no_grad():
        study = model(input_ids=ids, use_cache=False).logits
        cache = make_cache(model)
        steps = [model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                 for t in range(ids.shape[1])]
        rows = H if selection == "query-labels" else 2  # label rows: per query head, or per KV head
        assert cache.layers[1].n == 30 and cache.layers[1].lab.shape == (1, rows, 4 if bits == 16 else 2, 256)
        torch.testing.assert_close(torch.cat(steps, 1), study, atol=2e-4, rtol=0)
        uninstall(model)
        dense = model(input_ids=ids, use_cache=False).logits
        assert (study - dense).abs().max() > 1e-3  # really sparse
        install(model, labels, DSConfig(heavy_tokens=8, heavy_channels=4, dense_layers=0, selection=selection,
                                        label_bits=bits))
        out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=1, return_dict_in_generate=True,
                             output_logits=True)
        cache = out.past_key_values
        assert isinstance(cache, DSCache) and cache.layers[0].n == 31
        assert cache.layers[0].lab.dtype == (torch.float16 if bits == 16 else torch.uint8)
        torch.testing.assert_close(out.logits[0], dense[:, -1], atol=1e-4, rtol=0)  # prefill is dense
        nb = cache.nbytes()
        r_bytes = 4 * 2 if bits == 16 else 2 + 4  # fp16 labels, or 4-bit codes + fp16 step and minimum
        assert nb["labels"] == 2 * rows * 31 * r_bytes and nb["kv"] == 2 * 2 * 2 * 31 * d * 4


def test_compress_writes_labels_and_unchanged_weights(gqa_dir, tmp_path):
    from safetensors import safe_open

    from ptq.compress import CompressOptions, compress

    src = gqa_dir
    out = tmp_path / "ds"
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and text {i}." for i in range(400)))
    rep = compress(CompressOptions(model=str(src), out=str(out), recipe="double-sparsity", calib=str(text),
                                   nsamples=4, seqlen=32))
    assert rep["format"] == "fp" and "ds_top_r_mass" in rep["layers"][0]
    ours = json.loads((out / "double_sparsity.json").read_text())
    sg = json.loads((out / "ds_channel_config.json").read_text())
    assert ours["settings"]["channel_type"] == "qk" and ours["settings"]["selection"] == "query-labels"
    assert ours["settings"]["label_bits"] == 16
    assert ours["settings"]["heavy_tokens"] == 256 and ours["calibration_tokens"] == 4 * 32
    assert set(sg) == {f"model.layers.{i}.self_attn.{t}_proj" for i in range(2) for t in ("q", "k", "qk")}
    qk = torch.tensor(sg["model.layers.1.self_attn.qk_proj"])
    assert qk.shape == (2, 16) and torch.equal(qk.sort(-1).values, torch.arange(16).expand(2, 16))  # KV-head rows
    assert torch.equal(torch.tensor(ours["labels"]["qk_kv"]["1"]), qk)
    assert torch.tensor(sg["model.layers.0.self_attn.k_proj"]).shape == (2, 16)
    assert torch.tensor(sg["model.layers.0.self_attn.q_proj"]).shape == (4, 16)
    # importance is sorted along the (query-head) labels
    imp, qkh = torch.tensor(ours["importance"]["1"]), torch.tensor(ours["labels"]["qk"]["1"])
    assert (imp.gather(-1, qkh)[:, :-1] >= imp.gather(-1, qkh)[:, 1:]).all()
    # weights unchanged
    a, b = safe_open(str(src / "model.safetensors"), "pt"), safe_open(str(out / "layer-00001.safetensors"), "pt")
    for name in b.keys():
        assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
    # labels load back into a model
    model, _ = full_model(out)
    cfg = install_from(model, out, heavy_tokens=8, sparse_threshold=0, dense_layers=0, study=True)
    assert cfg.label_bits == 16 and cfg.selection == "query-labels" and cfg.channel_type == "qk"
    assert model.config._attn_implementation == "ptq_double_sparsity"
    ids = _ids(1, 40)
    with torch.no_grad():
        s = model(input_ids=ids).logits
        uninstall(model)
        assert (s - model(input_ids=ids).logits).abs().max() > 1e-4


def test_pass_resume_state_roundtrip(gqa_dir):
    """The per-layer means survive a resume (ptq/resume.py hooks) and give the same label files."""
    from types import SimpleNamespace

    from ptq.model_io import load_config
    from ptq.passes.double_sparsity import DoubleSparsityPass

    sm = SimpleNamespace(config=load_config(gqa_dir))
    a, b = DoubleSparsityPass(), DoubleSparsityPass()
    a.setup(sm)
    b.setup(sm)
    for i in range(2):
        st = ChannelStats(4, 2, 16)
        st.update(rnd(1, 6, 64, seed=i), rnd(1, 6, 32, seed=10 + i))
        a.means[i], a.labels[i] = st.means(), st.labels()
    a.tokens = 12
    state = a.resume_state()
    assert all(isinstance(v, torch.Tensor) for k, v in state.items() if k != "tokens")
    b.load_resume_state(state)
    assert a.finalize(sm) == b.finalize(sm)


@pytest.mark.parametrize("bits", [16, 4, 3])
def test_label_cache_appends_and_scores(bits):
    """The label cache holds (quantized) label channels of every appended key; its scores equal q_r . labels;
    top_k_indices (numpy introselect on CPU) returns the same set as torch.topk."""
    from ptq.sparse.ds_runtime import DSLayer, fake_quant, kv_label_channels, top_k_indices

    g = torch.Generator().manual_seed(0)
    K, V = torch.randn(1, 2, 300, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g)
    ch = kv_label_channels(random_labels(2, 16, 3), 2, 5)
    lay = DSLayer(ch, bits)
    for s, e in ((0, 200), (200, 201), (201, 300)):  # prefill, one decode step, a chunk (capacity grows)
        k, v = lay.update(K[:, :, s:e], V[:, :, s:e])
    assert lay.n == 300 and torch.equal(k, K) and torch.equal(v, V)
    want = K.gather(-1, ch[None, :, None, :].expand(1, 2, 300, 5))
    want = want.half().float() if bits == 16 else fake_quant(want, bits)
    torch.testing.assert_close(lay.labels(), want, atol=1e-6, rtol=0)
    ql = torch.randn(1, 2, 3, 5, generator=g)
    torch.testing.assert_close(lay.label_scores(ql), ql @ want.transpose(-1, -2), atol=1e-4, rtol=1e-5)
    nb = lay.nbytes()
    assert nb["labels"] == 2 * 300 * {16: 10, 4: 3 + 4, 3: 5 + 4}[bits]
    x = torch.randn(2, 3, 1000, generator=g)
    assert torch.equal(top_k_indices(x, 37).sort(-1).values, x.topk(37, -1).indices.sort(-1).values)


@pytest.mark.parametrize("selection,bits", [("query-labels", 16), ("query-labels", 4), ("query-labels", 32), ("head", 16),
                                            ("kv", 4)])
def test_sparse_decode_equals_study_decode(selection, bits):
    """One decode step from a filled DSLayer (label cache, batched top-k, one index_select of the key rows,
    embedding_bag over the value rows) equals the study path's decode on the same K/V, channels, selection and
    label bits, with and without padding; per-query-head label rows hold each head's own channels."""
    from ptq.sparse.double_sparsity import runtime_channels
    from ptq.sparse.ds_runtime import DSLayer, sparse_decode

    b, H, Hkv, S, d, r, kk = 2, 6, 2, 300, 16, 4, 24
    q, K, V = rnd(b, H, 1, d, seed=40), rnd(b, Hkv, S, d, seed=41), rnd(b, Hkv, S, d, seed=42)
    labels = random_labels(H, d, 5)
    cfg = DSConfig(heavy_tokens=kk, heavy_channels=r, label_bits=bits, selection=selection)
    ch = runtime_channels(labels, selection, H, Hkv, r)
    assert ch.shape == ((H, r) if selection == "query-labels" else (Hkv, r))
    lay = DSLayer(ch, bits)
    lay.update(K[:, :, :200], V[:, :, :200])
    lay.update(K[:, :, 200:], V[:, :, 200:])
    if selection == "query-labels":  # row h = channels C_h of the keys of KV head h // 3
        want = K.repeat_interleave(3, 1).gather(-1, labels[None, :, None, :r].expand(b, H, S, r))
        torch.testing.assert_close(lay.labels(), want.half().float() if bits == 16 else fake_quant_labels(
            want.float(), bits), atol=1e-6, rtol=0)
    allowed = torch.ones(b, S, dtype=torch.bool)
    allowed[1, :37] = False
    allowed[0, 250:260] = False
    for al in (None, allowed):
        out = sparse_decode(q, lay, kk, d**-0.5, bits, selection, al)
        ref = double_sparse_attention(q, K, V, labels, cfg, d**-0.5, None if al is None else al[:, None, None, :])
        assert (out - ref).abs().max() < 1e-12
    dense = dense_ref(q, K, V, d**-0.5, torch.ones(1, 1, 1, S, dtype=torch.bool))
    assert (out - dense).abs().max() > 1e-3  # really sparse
    with pytest.raises(ValueError, match="label rows"):
        sparse_decode(q, lay, kk, d**-0.5, bits, "kv" if selection == "query-labels" else "query-labels")


def test_kv_label_channels_merges_query_head_rankings():
    from ptq.sparse.ds_runtime import kv_label_channels

    lab = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2], [3, 2, 1, 0], [3, 2, 0, 1]])  # 4 query heads, 2 KV heads
    assert kv_label_channels(lab, 2, 2).tolist() == [[0, 1], [3, 2]]
    assert kv_label_channels(lab[:2], 2, 3).tolist() == [[0, 1, 2], [1, 0, 3]]


def test_union_channels_positions():
    from ptq.sparse.ds_runtime import union_channels

    ch = torch.tensor([[3, 1], [1, 5], [7, 3], [2, 0], [0, 2], [2, 0]])  # 6 query heads, 2 KV heads, r = 2
    union, pos = union_channels(ch, 2)
    assert union.tolist() == [[1, 3, 5, 7], [0, 2, 0, 0]]  # sorted unions, the second padded with its first
    assert torch.equal(union.repeat_interleave(3, 0).gather(1, pos), ch)


@pytest.mark.parametrize("bits", [16, 32])
def test_union_label_cache_equals_per_head_cache(bits):
    """The union label cache [Hkv, U, S] (each query head zero outside its own channels) gives the scores, the
    top-k and the output of the per-query-head cache [H, r, S], with fewer label bytes when the channels of a group
    overlap; both equal the study path."""
    from ptq.sparse.ds_runtime import DSLayer, sparse_decode, top_k_indices

    b, H, Hkv, S, d, r, kk = 2, 6, 2, 300, 16, 4, 24
    q, K, V = rnd(b, H, 1, d, seed=50), rnd(b, Hkv, S, d, seed=51), rnd(b, Hkv, S, d, seed=52)
    ch = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4], [2, 0, 5, 9], [8, 9, 10, 11], [9, 8, 12, 13], [6, 7, 8, 9]])
    per, uni = DSLayer(ch, bits), DSLayer(ch, bits, union=True)
    for lay in (per, uni):
        lay.update(K[:, :, :200], V[:, :, :200])
        lay.update(K[:, :, 200:], V[:, :, 200:])
    assert uni.lab.shape[:3] == (b, Hkv, 8) and per.lab.shape[:3] == (b, H, r)  # U = 8 of G r = 12
    assert uni.nbytes()["labels"] * 3 == per.nbytes()["labels"] * 2
    ql = q[:, :, 0].gather(-1, ch[None].expand(b, H, r)).float()  # [b, H, r]
    qu = torch.zeros(b, H, 8).scatter_(-1, uni.union_pos[None].expand(b, H, r), ql)
    s_per = per.label_scores(ql[:, :, None]).view(b, H, S)
    s_uni = uni.label_scores(qu.view(b, Hkv, 3, 8)).view(b, H, S)
    assert (s_per - s_uni).abs().max() < 1e-5 and (s_per - s_uni).abs().max() <= 1e-6 * s_per.abs().max()
    assert torch.equal(top_k_indices(s_per, kk).sort(-1).values, top_k_indices(s_uni, kk).sort(-1).values)
    cfg = DSConfig(heavy_tokens=kk, heavy_channels=r, label_bits=bits, selection="query-labels")
    allowed = torch.ones(b, S, dtype=torch.bool)
    allowed[1, :37] = False
    for al in (None, allowed):
        o_per = sparse_decode(q, per, kk, d**-0.5, bits, "query-labels", al)
        o_uni = sparse_decode(q, uni, kk, d**-0.5, bits, "query-labels", al)
        assert torch.equal(o_per, o_uni)
        ref = double_sparse_attention(q, K, V, ch, cfg, d**-0.5, None if al is None else al[:, None, None, :])
        assert (o_uni - ref).abs().max() < 1e-12
    with pytest.raises(ValueError, match="fp labels"):
        DSLayer(ch, 4, union=True)


def test_install_picks_union_where_channels_overlap(gqa_dir):
    """label_layout auto: the union cache where a group's channels overlap (here: identical), the per-head one
    where they do not; generate() through the union cache gives the per-head cache's tokens."""
    from ptq.sparse import make_cache

    model, cfg = full_model(gqa_dir)
    H, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    shared = random_labels(2, d, 7).repeat_interleave(2, 0)  # each KV head's 2 query heads: the same ranking
    labels = {0: shared, 1: torch.cat([torch.arange(d)[None].roll(-4 * h, 1) for h in range(H)])}  # disjoint
    ids = _ids(1, 30, seed=4)
    outs = {}
    for layout in ("auto", "per-head"):
        install(model, labels, DSConfig(heavy_tokens=8, heavy_channels=4, dense_layers=0, selection="query-labels",
                                        label_layout=layout))
        assert model.ds_union == ([True, False] if layout == "auto" else [False, False])
        cache = make_cache(model)
        with torch.no_grad():
            outs[layout] = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=1, cache=cache)
        assert cache.layers[0].lab.shape[1] == (2 if layout == "auto" else H) and cache.layers[1].lab.shape[1] == H
    assert torch.equal(outs["auto"], outs["per-head"])
    uninstall(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_unrounded_labels_keep_the_key_values(dtype):
    """label_bits=32 stores the label channels of each key unrounded: in the key's dtype for fp16/bf16 keys, fp32
    otherwise; label_bits=16 rounds them to fp16."""
    from ptq.sparse.ds_runtime import DSLayer

    K = (torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    ch = torch.tensor([[3, 7, 0, 12], [5, 1, 9, 14]])
    want = K[0].gather(-1, ch[:, None, :].expand(2, 40, 4)).transpose(-1, -2)  # [Hkv, r, S]
    lay = DSLayer(ch, 32)
    lay.update(K, K)
    stored = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    assert lay.lab.dtype == stored and torch.equal(lay.lab[0, :, :, :40], want.to(stored))
    assert lay.nbytes()["labels"] == 2 * 4 * 40 * torch.finfo(stored).bits // 8
    half = DSLayer(ch, 16)
    half.update(K, K)
    assert half.lab.dtype == torch.float16 and torch.equal(half.lab[0, :, :, :40], want.half())
