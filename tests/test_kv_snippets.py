"""The generate() snippets of docs/double_sparsity.md and docs/cskv.md, run verbatim on a tiny compressed model
(only the folder name is replaced)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def snippet(doc: str, name: str) -> str:
    text = (DOCS / doc).read_text()
    m = re.search(r"<!-- snippet: " + re.escape(name) + r" [^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, f"snippet {name} not found in docs/{doc}"
    return m.group(1)


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    from conftest import make_tiny

    return make_tiny("llama-gqa", tmp_path_factory.mktemp("snip") / "llama-gqa")


@pytest.mark.parametrize("doc,name,recipe,folder", [
    ("double_sparsity.md", "ds-generate", "double-sparsity", "smollm2-ds"),
    ("cskv.md", "cskv-generate", "cskv", "smollm2-cskv"),
])
def test_doc_generate_snippet_runs(gqa_dir, tmp_path, capsys, doc, name, recipe, folder):
    from ptq.compress import CompressOptions, compress
    from ptq.kv.cskv_cache import CSKVCache
    from ptq.sparse.ds_runtime import DSCache

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and text {i}." for i in range(400)))
    out = tmp_path / folder
    compress(CompressOptions(model=str(gqa_dir), out=str(out), recipe=recipe, calib=str(text), nsamples=4, seqlen=32))
    code = snippet(doc, name)
    assert f'"{folder}"' in code
    env: dict = {}
    exec(compile(code.replace(f'"{folder}"', repr(str(out))), f"docs/{doc}", "exec"), env)
    cache = env["out"].past_key_values
    assert isinstance(cache, DSCache if recipe == "double-sparsity" else CSKVCache)
    assert env["out"].sequences.shape[1] == env["ids"].shape[1] + 16
    assert str(cache.nbytes()) in capsys.readouterr().out
    if recipe == "cskv":  # the prompt fills at least one window: the compressed branch holds quantized features
        layer = cache.layers[0]
        assert layer.t["k_codes"].shape[1] >= layer.window and layer.t["v_codes"].shape[1] >= layer.window
