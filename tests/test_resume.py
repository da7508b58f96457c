"""Resume: a compress killed (SIGKILL, subprocess) or interrupted (Ctrl-C) after a finished layer continues from
the next layer with ``--resume`` and produces the same bytes as an uninterrupted run."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli.main import app
from ptq.compress import CompressOptions, compress
from ptq.resume import STATE_FILE, TEST_KILL_ENV, partial_dir

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny Llama, a calibration text and the uninterrupted reference output (GPTQ, fp export)."""
    from conftest import make_tiny

    root = tmp_path_factory.mktemp("resume")
    model = make_tiny("llama", root / "llama")
    (root / "calib.txt").write_text("It is a truth universally acknowledged, that a single man. " * 30)
    ref = root / "ref"
    compress(opts(model, ref, root / "calib.txt"))
    return model, root / "calib.txt", ref


def opts(model, out, calib, **kw):
    return CompressOptions(model=str(model), out=str(out), recipe="gptq", format="fp", calib=str(calib),
                           nsamples=3, seqlen=48, **kw)


def cli_args(model, out, calib):
    return ["compress", str(model), "--out", str(out), "--recipe", "gptq", "--format", "fp", "--calib",
            str(calib), "--nsamples", "3", "--seqlen", "48"]


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every output file except report.json (timings; see ptq.manifest)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "report.json"}


def test_sigkill_then_resume_is_byte_identical(setup, tmp_path):
    model, calib, ref = setup
    out = tmp_path / "q"
    # same thread count as this process: float reductions (and so the bytes) depend on it
    env = {**os.environ, TEST_KILL_ENV: "0", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cli.main", *cli_args(model, out, calib)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # really killed, no cleanup ran
    part = partial_dir(out)
    assert not out.exists()
    state = json.loads((part / STATE_FILE).read_text())
    assert state["layer"] == 0 and state["n_layers"] == 2
    assert sorted(p.name for p in part.glob("layer-*")) == ["layer-00000.safetensors"]
    saved = load_file(str(part / state["batches_file"]))
    assert sum(k.startswith("batch.") for k in saved) == 3 and saved["batch.0"].shape == (1, 48, 64)

    res = CliRunner().invoke(app, cli_args(model, out, calib) + ["--resume"])
    assert res.exit_code == 0, res.output
    assert not part.exists()
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_layer"] == 1
    assert [L["layer"] for L in report["layers"]] == [0, 1]
    assert hashes(out) == hashes(ref)
    assert len(hashes(out)) >= 8  # shards, index, config, tokenizer, manifest


def test_interrupt_keeps_work_and_refuses_other_inputs(setup, tmp_path):
    model, calib, ref = setup
    out = tmp_path / "q"

    def ctrl_c(i, n, pname):
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress(opts(model, out, calib), progress=ctrl_c)
    part = partial_dir(out)
    assert json.loads((part / STATE_FILE).read_text())["layer"] == 0
    before = {p.name: p.read_bytes() for p in part.iterdir()}

    res = CliRunner().invoke(app, cli_args(model, out, calib) + ["--resume", "--seed", "5"])
    assert res.exit_code == 2
    assert "holds an unfinished run with different inputs" in res.output
    assert {p.name: p.read_bytes() for p in part.iterdir()} == before  # refused resume destroys nothing

    report = compress(opts(model, out, calib, resume=True))
    assert report["resumed_from_layer"] == 1
    assert hashes(out) == hashes(ref)


def test_resume_after_last_layer_and_force(setup, tmp_path, monkeypatch):
    """Interrupted after the last layer, during the export of embeddings: --resume runs no layer again and only
    finishes the export; --force instead discards the partial run and starts over."""
    from ptq.export.base import DenseWriter

    model, calib, ref = setup
    orig = DenseWriter.write_nonlayer

    def boom(self):
        raise KeyboardInterrupt

    for out, flag in ((tmp_path / "a", "--resume"), (tmp_path / "b", "--force")):
        monkeypatch.setattr(DenseWriter, "write_nonlayer", boom)
        with pytest.raises(KeyboardInterrupt):
            compress(opts(model, out, calib))
        assert json.loads((partial_dir(out) / STATE_FILE).read_text())["layer"] == 1
        monkeypatch.setattr(DenseWriter, "write_nonlayer", orig)
        layers_run = []
        import ptq.compress as pc

        real_loop = pc.compress_loop

        def spy(*a, **kw):
            kw["progress"] = lambda i, n, p: layers_run.append(i)
            return real_loop(*a, **kw)

        monkeypatch.setattr(pc, "compress_loop", spy)
        res = CliRunner().invoke(app, cli_args(model, out, calib) + [flag])
        monkeypatch.setattr(pc, "compress_loop", real_loop)
        assert res.exit_code == 0, res.output
        assert layers_run == ([] if flag == "--resume" else [0, 1])
        assert hashes(out) == hashes(ref) and not partial_dir(out).exists()


def test_resume_without_partial_starts_fresh(setup, tmp_path):
    model, calib, ref = setup
    report = compress(opts(model, tmp_path / "q", calib, resume=True))
    assert report["resumed_from_layer"] is None
    assert hashes(tmp_path / "q") == hashes(ref)


def test_pass_with_cross_layer_state_refuses_resume(setup, tmp_path, monkeypatch):
    """A pass that overrides finalize() (state across layers) without resume_state() cannot resume: exit 2,
    partial kept; --resume --force starts over."""
    from ptq.passes.rtn import RTNPass
    from ptq.resume import not_resumable

    model, calib, _ = setup
    monkeypatch.setattr(RTNPass, "finalize", lambda self, sm: {}, raising=False)
    assert not_resumable([RTNPass()]) == ["rtn"]
    out = tmp_path / "q"
    args = ["compress", str(model), "--out", str(out), "--recipe", "rtn", "--format", "fp"]
    with pytest.raises(KeyboardInterrupt):
        compress(CompressOptions(model=str(model), out=str(out), recipe="rtn", format="fp"),
                 progress=lambda i, n, p: (_ for _ in ()).throw(KeyboardInterrupt) if i == 1 else None)
    res = CliRunner().invoke(app, args + ["--resume"])
    assert res.exit_code == 2 and "rtn keep state across layers and cannot resume" in res.output
    assert (partial_dir(out) / STATE_FILE).is_file()
    res = CliRunner().invoke(app, args + ["--resume", "--force"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "report.json").read_text())["resumed_from_layer"] is None


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_resume_keeps_writer_bookkeeping(setup, tmp_path, monkeypatch, fmt):
    """Quantized formats summarize all layers in config.json (act-order, ignore lists): after a resume that
    runs no layer at all, the config must still match an uninterrupted run byte for byte. (With group size 16
    the GPTQ run uses act-order groups, so without the saved writer state ``desc_act`` would come out False.)"""
    import ptq.export

    model, calib, _ = setup
    # CT cannot store act-order groups; for the GPTQ format ask for them (the default is static groups)
    po = {"gptq": {"act_order": False}} if fmt == "compressed-tensors" else {"gptq": {"static_groups": False}}
    gs = dict(group_size=16)
    ref = tmp_path / "ref"
    compress(CompressOptions(
        model=str(model), out=str(ref), recipe="gptq", format=fmt, calib=str(calib), nsamples=3, seqlen=48,
        pass_options=po, **gs))
    wcls = ptq.export.writer_class(fmt)
    orig = wcls.write_nonlayer

    def boom(self):
        raise KeyboardInterrupt

    out = tmp_path / "q"
    monkeypatch.setattr(wcls, "write_nonlayer", boom)
    with pytest.raises(KeyboardInterrupt):
        compress(CompressOptions(model=str(model), out=str(out), recipe="gptq", format=fmt, calib=str(calib),
                                 nsamples=3, seqlen=48, pass_options=po, **gs))
    monkeypatch.setattr(wcls, "write_nonlayer", orig)
    report = compress(CompressOptions(model=str(model), out=str(out), recipe="gptq", format=fmt,
                                      calib=str(calib), nsamples=3, seqlen=48, resume=True, pass_options=po,
                                      **gs))
    assert report["resumed_from_layer"] == 2
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    if fmt == "gptq":
        assert qc["desc_act"] is True and qc["group_size"] == 16
    assert hashes(out) == hashes(ref)


def test_writer_state_roundtrip():
    from ptq.resume import load_writer_state, writer_state

    class W:
        pass

    w = W()
    w.out, w.weight_map = "x", {}
    w._seen = {"bits": {4}, "sym": {False}, "gs": {16}, "act_order": True, "meta": {"damp": 0.01}}
    w.ignore = ["model.layers.0.mlp.gate_proj"]
    st = json.loads(json.dumps(writer_state(w)))  # must survive JSON
    assert st["__unsaved__"] == [] and "out" not in st["attrs"]
    w2 = W()
    load_writer_state(w2, st)
    assert w2._seen == w._seen and w2.ignore == w.ignore and not hasattr(w2, "out")
    w.handle = object()  # not JSON-able: recorded, and resume from it is refused
    assert writer_state(w)["__unsaved__"] == ["handle"]
    with pytest.raises(ValueError, match="cannot resume"):
        load_writer_state(W(), writer_state(w))
