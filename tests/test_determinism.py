"""Same inputs and seed -> byte-identical outputs (all files but report.json); the manifest records the run
(recipe, seed, calibration hash, per-layer errors, sha256 of each file) and `ptq inspect` prints/verifies it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from ptq.compress import CompressOptions, compress

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two GPTQ runs with the same inputs into different folders, and one with another calibration seed."""
    from conftest import make_tiny

    root = tmp_path_factory.mktemp("det")
    model = make_tiny("llama-gqa", root / "model")
    calib = root / "calib.txt"
    calib.write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 30)

    def run(name, seed=0):
        compress(CompressOptions(model=str(model), out=str(root / name), recipe="gptq", format="fp",
                                 calib=str(calib), nsamples=3, seqlen=40, seed=seed))
        return root / name

    return model, calib, run("a"), run("b"), run("c", seed=1)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(folder.iterdir()) if p.name != "report.json"}


def test_same_inputs_same_bytes(runs):
    _, _, a, b, c = runs
    assert tree(a) == tree(b)
    assert {"manifest.json", "config.json", "model.safetensors.index.json", "layer-00000.safetensors",
            "layer-00001.safetensors", "nonlayer.safetensors"} <= set(tree(a))
    # another seed draws other calibration windows -> other GPTQ weights and another manifest
    ta, tc = tree(a), tree(c)
    assert ta["layer-00000.safetensors"] != tc["layer-00000.safetensors"]
    assert ta["manifest.json"] != tc["manifest.json"]
    assert ta["nonlayer.safetensors"] == tc["nonlayer.safetensors"]  # embeddings are not quantized


def test_manifest_contents(runs):
    from calib.data import calibration_hash, load_calibration
    from ptq.model_io import tokenizer_for

    model, calib, a, _, c = runs
    m = json.loads((a / "manifest.json").read_text())
    assert m["schema"] == "ptq-manifest/1" and m["ptq_version"] not in ("", None)
    assert m["recipe"]["name"] == "gptq" and m["recipe"]["passes"][0]["name"] == "gptq"
    assert m["spec"] == {"bits": 4, "group_size": 128, "sym": False, "mse": False, "clip": "none"}
    assert m["seed"] == 0 and json.loads((c / "manifest.json").read_text())["seed"] == 1
    ids = load_calibration(str(calib), tokenizer_for(model), 3, 40, 0)
    assert m["calibration"]["tokens_sha256"] == calibration_hash(ids)
    assert m["calibration"]["source"] == "calib.txt"  # no absolute paths in the manifest
    assert [L["layer"] for L in m["layers"]] == [0, 1]
    assert m["layers"] == json.loads((a / "report.json").read_text())["layers"]
    assert 0 < m["layers"][0]["self_attn.q_proj.wmse"] < 1e-2
    files = {p.name: p for p in a.iterdir() if p.name not in ("manifest.json", "report.json")}
    assert set(m["files"]) == set(files)
    for name, p in files.items():
        assert m["files"][name] == {"bytes": p.stat().st_size, "sha256": sha(p)}


def test_inspect_prints_and_verifies(runs, tmp_path):
    import shutil

    a = runs[2]
    res = CliRunner().invoke(app, ["inspect", str(a), "--verify"])
    assert res.exit_code == 0, res.output
    assert "gptq" in res.output and "calib.txt" in res.output and "layer-00001.safetensors" in res.output
    assert "0 problem(s)" in res.output
    res = CliRunner().invoke(app, ["inspect", str(a), "--json"])
    assert json.loads(res.stdout) == json.loads((a / "manifest.json").read_text())

    bad = tmp_path / "bad"
    shutil.copytree(a, bad)
    with open(bad / "layer-00001.safetensors", "r+b") as f:  # flip one byte of the weights
        f.seek(-3, 2)
        x = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([x[0] ^ 1]))
    (bad / "notes.txt").write_text("added later")
    res = CliRunner().invoke(app, ["inspect", str(bad), "--verify"])
    assert res.exit_code == 1
    assert "layer-00001.safetensors: sha256 differs" in res.output and "1 problem(s)" in res.output
    assert "note: notes.txt is not in the manifest" in res.output
    (bad / "config.json").unlink()
    res = CliRunner().invoke(app, ["inspect", str(bad), "--verify"])
    assert res.exit_code == 1 and "config.json: missing" in res.output and "2 problem(s)" in res.output

    res = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert res.exit_code == 2 and "no manifest.json in" in res.output
