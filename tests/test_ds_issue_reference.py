"""Double Sparsity's issue-time code (commit 61c8077, loaded from git history by bench/ds_issue_reference.py) and
today's ``selection="query-labels"`` give the same attention with fp labels: in one attention call (prefill and
decode), in a model's forward (the study path) and in ``generate()`` (today's DSCache run time against the
issue-time dense-prefill / sparse-decode path on a DynamicCache)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ptq.model_io import full_model
from ptq.sparse.double_sparsity import DSConfig, double_sparse_attention, install, random_labels, register, uninstall

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def issue():
    spec = importlib.util.spec_from_file_location("bench_ds_issue_reference", ROOT / "bench" / "ds_issue_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        old = mod.load_issue_code()
    except LookupError as e:  # shallow clone, no git
        pytest.skip(str(e))
    yield old
    register()  # the issue-time module registered its own function under the same attention name


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("Lq", [1, 40])
def test_issue_time_attention_equals_query_labels(issue, Lq):
    b, H, Hkv, Lk, d, kk, r = 2, 6, 2, 40, 16, 7, 4
    q, k, v = rnd(b, H, Lq, d, seed=1), rnd(b, Hkv, Lk, d, seed=2), rnd(b, Hkv, Lk, d, seed=3)
    labels = random_labels(H, d, seed=4)  # per query head, as the issue-time bench used (qk)
    old = issue.double_sparse_attention(q, k, v, labels, issue.DSConfig(heavy_tokens=kk, heavy_channels=r,
                                                                        label_bits=16, q_chunk=16), d**-0.5, None)
    today = double_sparse_attention(q, k, v, labels, DSConfig(heavy_tokens=kk, heavy_channels=r, label_bits=32,
                                                              q_chunk=16, selection="query-labels"), d**-0.5, None)
    torch.testing.assert_close(today, old, atol=1e-6, rtol=0)
    kv = double_sparse_attention(q, k, v, labels, DSConfig(heavy_tokens=kk, heavy_channels=r, label_bits=32,
                                                           q_chunk=16, selection="kv"), d**-0.5, None)
    assert (kv - old).abs().max() > 1e-3  # a different selection is told apart


def test_issue_time_model_equals_query_labels_study_and_runtime(issue, tmp_path):
    from conftest import make_tiny

    model, cfg = full_model(make_tiny("llama-gqa", tmp_path / "llama-gqa"))
    H, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    labels = {i: random_labels(H, d, 10 + i) for i in range(cfg.num_hidden_layers)}
    ids = torch.randint(2, 300, (1, 40), generator=torch.Generator().manual_seed(5))
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=1, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        dense_gen = torch.stack(model.generate(ids, **gen).logits)
        issue.install(model, labels, issue.DSConfig(heavy_tokens=8, heavy_channels=4, label_bits=16, dense_layers=0))
        old_study = model(input_ids=ids).logits
        issue.install(model, labels, issue.DSConfig(heavy_tokens=8, heavy_channels=4, label_bits=16, dense_layers=0,
                                                    sparse_prefill=False))
        old_gen = model.generate(ids, **gen)
        uninstall(model)
        today = DSConfig(heavy_tokens=8, heavy_channels=4, label_bits=32, dense_layers=0, selection="query-labels",
                         channel_type="qk", study=True)
        install(model, labels, today)
        study = model(input_ids=ids).logits
        new_gen = model.generate(ids, **gen)  # DSCache: dense prefill, label-cache sparse decode
        uninstall(model)
    assert (old_study - dense).abs().max() > 1e-3  # really sparse
    torch.testing.assert_close(study, old_study, atol=1e-5, rtol=0)
    assert type(old_gen.past_key_values).__name__ == "DynamicCache"
    assert type(new_gen.past_key_values).__name__ == "DSCache"
    assert torch.equal(new_gen.sequences, old_gen.sequences)
    torch.testing.assert_close(torch.stack(new_gen.logits), torch.stack(old_gen.logits), atol=1e-4, rtol=0)
    assert (torch.stack(old_gen.logits)[1:] - dense_gen[1:]).abs().max() > 1e-3  # decode steps really sparse
