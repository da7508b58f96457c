"""Table-driven bad-input and fault battery for `compress / eval / gate / inspect / export` (issue: "nothing lost,
nothing silently wrong, nobody in").

Every row is one command line run in-process (typer's CliRunner) inside a fresh work folder that holds private
copies of every input. Each row states the expected exit code (0 ok, 1 regression / changed file, 2 bad input)
and a substring of the message, and the runner checks that

* exit 2 comes with exactly one ``error:`` line and no traceback;
* every file under the work folder is byte-identical before and after (inputs untouched, nothing written);
* no partial output (``*.ptq-partial``) or lock file (``*.ptq-lock``) is left anywhere.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app

torch.set_num_threads(1)


# -- fixtures: the inputs, built once -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """model/ (tiny Llama), other/ (same shapes, other weights), opt/ (tiny OPT), art/ (RTN fp artifact of
    model/), text.txt, calib.txt and base.json (a stored gate baseline of art/ against model/)."""
    from conftest import make_tiny

    root = tmp_path_factory.mktemp("battery")
    make_tiny("llama", root / "model")
    make_tiny("llama", root / "other", seed=1)
    make_tiny("opt", root / "opt")
    make_tiny("llama", root / "bigvocab", vocab_size=384)
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 30
    (root / "text.txt").write_text(text)
    (root / "calib.txt").write_text(text)
    r = CliRunner().invoke(app, ["compress", str(root / "model"), "--out", str(root / "art"), "--recipe", "rtn",
                                 "--format", "fp"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["gate", str(root / "art"), "--baseline", str(root / "model"), "--text",
                                 str(root / "text.txt"), "--seqlen", "64", "--windows", "4",
                                 "--save-baseline", str(root / "base.json")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["compress", str(root / "bigvocab"), "--out", str(root / "bigart"), "--recipe",
                                 "rtn", "--format", "fp"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["gate", str(root / "bigart"), "--baseline", str(root / "bigvocab"), "--text",
                                 str(root / "text.txt"), "--seqlen", "64", "--windows", "4",
                                 "--save-baseline", str(root / "bigbase.json")])
    assert r.exit_code == 0, r.output
    shutil.rmtree(root / "bigart")
    return root


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "special"
    return out


# -- setup helpers (each edits the private copies in the work folder) -------------------------------------------------
def write(rel: str, content: str | bytes):
    def f(w: Path):
        p = w / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    return f


def sparse(rel: str, size: int):
    """A file of ``size`` bytes that takes no disk space (bounded-read checks look at the size first)."""
    def f(w: Path):
        with open(w / rel, "wb") as fh:
            fh.truncate(size)
    return f


def edit_config(rel: str, **kw):
    def f(w: Path):
        p = w / rel / "config.json"
        cfg = json.loads(p.read_text())
        cfg.update(kw)
        p.write_text(json.dumps(cfg))
    return f


def edit_weights(rel: str, fn: Callable[[dict], None]):
    def f(w: Path):
        p = w / rel / "model.safetensors"
        sd = load_file(str(p))
        fn(sd)
        save_file(sd, str(p), metadata={"format": "pt"})
    return f


def edit_manifest(fn: Callable[[dict], None], rel: str = "art"):
    def f(w: Path):
        p = w / rel / "manifest.json"
        m = json.loads(p.read_text())
        fn(m)
        p.write_text(json.dumps(m))
    return f


def edit_json(rel: str, fn: Callable[[dict], None]):
    def f(w: Path):
        p = w / rel
        d = json.loads(p.read_text())
        fn(d)
        p.write_text(json.dumps(d))
    return f


def permute_tokenizer(rel: str):
    """Swap two byte tokens' ids in tokenizer.json (same vocabulary size, different token ids)."""
    def f(w: Path):
        p = w / rel / "tokenizer.json"
        tok = json.loads(p.read_text())
        v = tok["model"]["vocab"]
        a, b = "e", "t"
        v[a], v[b] = v[b], v[a]
        p.write_text(json.dumps(tok))
    return f


def symlink(rel: str, target: str):
    def f(w: Path):
        p = w / rel
        if p.exists() or p.is_symlink():
            p.unlink()
        p.symlink_to(target if target.startswith("/") else w / target)
    return f


def evil_pickle(w: Path):
    """A pickled checkpoint whose reduce would run os.system: the weights_only loader must refuse it."""
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch RAN",))

    m = w / "model"
    (m / "model.safetensors").unlink()
    with open(m / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"x": Evil()}, fh)


def remote_code_tokenizer(w: Path):
    m = w / "model"
    (m / "tok_code.py").write_text("import pathlib\npathlib.Path('RAN').write_text('x')\n")
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tok_code.EvilTokenizer", None]}
    cfg.pop("tokenizer_class", None)
    (m / "tokenizer_config.json").write_text(json.dumps(cfg))


def no_tokenizer(w: Path):
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (w / "model" / f).unlink(missing_ok=True)


def disk_full_on_first_shard(monkeypatch):
    """The error safetensors raises for ENOSPC (a SafetensorError wrapping the OS error, not an OSError) on
    the first layer shard, after part of the file was written."""
    import ptq.export.base as eb
    from safetensors import SafetensorError

    real = eb.save_file

    def full(tensors, path, metadata=None):
        if Path(path).name.startswith("layer-"):
            Path(path).write_bytes(b"\0" * 100)
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(eb, "save_file", full)


def hold_lock(monkeypatch):
    """Another run holds the output lock (a second open file description: flock conflicts like two processes)."""
    from ptq.outlock import OutputLock

    state = {}

    def setup(w: Path):
        state["lock"] = OutputLock(w / "out").acquire()
        monkeypatch.setattr("ptq.outlock._read_pid", lambda p: "4242")

    return setup, state


def interrupted_then_weights_changed(w: Path):
    """An interrupted GPTQ run (partial kept), then the model's weights change with the same names and shapes."""
    from ptq.compress import CompressOptions, compress

    def stop(i, n, p):
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress(CompressOptions(model=str(w / "model"), out=str(w / "out"), recipe="gptq", format="fp",
                                 calib=str(w / "calib.txt"), nsamples=2, seqlen=32), progress=stop)
    edit_weights("model", lambda sd: sd["model.layers.1.mlp.up_proj.weight"].mul_(1.01))(w)


# -- the table ------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    argv: list[str]  # "{w}" is replaced by the work folder
    code: int
    msg: str
    setup: Callable[[Path], None] | None = None
    special: str | None = None  # a hook needing monkeypatch: "disk_full", "lock"
    partial_ok: bool = False  # a pre-existing partial folder (made by setup) is expected to stay


M, OUT = "{w}/model", "{w}/out"
RTN = ["compress", M, "--out", OUT, "--recipe", "rtn", "--format", "fp"]
GPTQ = ["compress", M, "--out", OUT, "--recipe", "gptq", "--format", "fp", "--calib", "{w}/calib.txt",
        "--nsamples", "2", "--seqlen", "32"]
GATE = ["gate", "{w}/art", "--text", "{w}/text.txt", "--seqlen", "64", "--windows", "4"]
EVAL = ["eval", "{w}/art", "--text", "{w}/text.txt", "--seqlen", "64", "--windows", "4"]


def recipe(rel: str, body: str) -> Callable[[Path], None]:
    return write(rel, body)


CASES = [
    # --- data loss: the output may not contain, equal or sit inside an input ----------------------------------
    Case("out-contains-model-force", ["compress", M, "--out", "{w}", "--recipe", "rtn", "--force"], 2,
         "contains the input model"),
    Case("out-parent-of-model-force", ["compress", "{w}/models/m", "--out", "{w}/models", "--recipe", "rtn",
                                       "--force"], 2, "contains the input model",
         setup=lambda w: (w / "models").mkdir() or shutil.move(w / "model", w / "models" / "m")),
    Case("out-is-model-force", ["compress", M, "--out", M, "--recipe", "rtn", "--force"], 2,
         "contains the input model"),
    Case("out-inside-model", ["compress", M, "--out", "{w}/model/q", "--recipe", "rtn"], 2,
         "is inside the input model folder"),
    Case("out-contains-calib-force", [*GPTQ[:3], "{w}/data", *GPTQ[4:9], "{w}/data/c.txt", *GPTQ[10:], "--force"],
         2, "contains the calibration data", setup=write("data/c.txt", "hello world. " * 50)),
    Case("out-contains-eval-text", [*RTN, "--eval-text", "{w}/ev/t.txt", "--out", "{w}/ev", "--force"], 2,
         "contains the --eval-text file", setup=write("ev/t.txt", "hello world. " * 50)),
    Case("out-contains-recipe", ["compress", M, "--out", "{w}/rc", "--recipe", "{w}/rc/r.yaml", "--force"], 2,
         "contains the recipe file", setup=recipe("rc/r.yaml", "name: r\npasses: [rtn]\n")),
    Case("out-dot", ["compress", M, "--out", ".", "--recipe", "rtn", "--force"], 2, "does not name a new folder"),
    Case("out-cwd-by-path", ["compress", M, "--out", "{w}/sub/..", "--recipe", "rtn", "--force"], 2,
         "does not name a new folder", setup=lambda w: (w / "sub").mkdir()),
    Case("force-non-ptq-folder", [*RTN, "--force"], 2, "--force replaces only a folder written by ptq",
         setup=write("out/thesis.tex", "years of work")),
    Case("force-onto-file", [*RTN, "--force"], 2, "is a file; ptq writes a folder", setup=write("out", "x")),
    Case("force-onto-symlink", [*RTN, "--force"], 2, "is a symbolic link", setup=symlink("out", "art")),
    Case("partial-is-symlink", [*RTN, "--force"], 2, "is a symbolic link", partial_ok=True,
         setup=symlink("out.ptq-partial", "art")),
    Case("out-parent-is-file", ["compress", M, "--out", "{w}/text.txt/q", "--recipe", "rtn"], 2,
         "is a file, not a folder"),
    Case("out-read-only", ["compress", M, "--out", "/proc/ptq-battery-out", "--recipe", "rtn"], 2,
         "cannot write in /proc"),
    Case("out-exists-no-force", RTN, 2, "already exists; pass --force", setup=write("out/manifest.json", "{}")),
    Case("unfinished-run-present", RTN, 2, "found an unfinished run", partial_ok=True,
         setup=write("out.ptq-partial/ptq-state.json", "{}")),
    # --- nobody in: the lock --------------------------------------------------------------------------------------
    Case("concurrent-run-locked", [*RTN, "--force"], 2, "another ptq run (process 4242) is writing", special="lock"),
    Case("concurrent-resume-force-locked", [*GPTQ, "--resume", "--force"], 2, "another ptq run", special="lock"),
    # --- silently wrong output -------------------------------------------------------------------------------------
    Case("resume-after-weights-changed", [*GPTQ, "--resume"], 2, "holds an unfinished run with different inputs",
         setup=interrupted_then_weights_changed, partial_ok=True),
    Case("recipe-no-passes", ["compress", M, "--out", OUT, "--recipe", "{w}/r.yaml"], 2, "has no passes",
         setup=recipe("r.yaml", "name: empty\ndefaults: {bits: 2}\npasses: []\n")),
    Case("recipe-passes-missing", ["compress", M, "--out", OUT, "--recipe", "{w}/r.yaml"], 2, "has no passes",
         setup=recipe("r.yaml", "name: none\n")),
    Case("recipe-sym-string", ["compress", M, "--out", OUT, "--recipe", "{w}/r.yaml"], 2,
         "sym: expected true or false (bool), got 'false' (str)",
         setup=recipe("r.yaml", "name: s\ndefaults: {sym: \"false\"}\npasses: [rtn]\n")),
    Case("recipe-bits-word", ["compress", M, "--out", OUT, "--recipe", "{w}/r.yaml"], 2,
         "bits: expected an integer, got 'four' (str)",
         setup=recipe("r.yaml", "name: b\ndefaults: {bits: four}\npasses: [rtn]\n")),
    Case("recipe-bits-float", ["compress", M, "--out", OUT, "--recipe", "{w}/r.yaml"], 2,
         "bits: expected an integer, got 4.5",
         setup=recipe("r.yaml", "name: b\ndefaults: {bits: 4.5}\npasses: [rtn]\n")),
    Case("recipe-damp-word", ["compress", M, "--out", OUT, "--recipe", "{w}/r.yaml", "--calib", "{w}/calib.txt"], 2,
         "damp: expected a number, got 'high' (str)",
         setup=recipe("r.yaml", "name: d\npasses:\n  - gptq: {damp: high}\n")),
    Case("recipe-damp-negative", ["compress", M, "--out", OUT, "--recipe", "{w}/r.yaml"], 2,
         "damp must be in (0, 1], got -5", setup=recipe("r.yaml", "name: d\npasses:\n  - gptq: {damp: -5}\n")),
    Case("recipe-act-order-string", ["compress", M, "--out", OUT, "--recipe", "{w}/r.yaml"], 2,
         "act_order: expected true or false (bool), got 'no way'",
         setup=recipe("r.yaml", "name: d\npasses:\n  - gptq: {act_order: no way}\n")),
    Case("recipe-nsamples-string", ["compress", M, "--out", OUT, "--recipe", "{w}/r.yaml"], 2,
         "nsamples: expected an integer, got '10'",
         setup=recipe("r.yaml", "name: d\ncalibration: {nsamples: '10'}\npasses: [gptq]\n")),
    Case("recipe-nan-value", ["compress", M, "--out", OUT, "--recipe", "{w}/r.yaml"], 2,
         "expected a finite number", setup=recipe("r.yaml", "name: d\npasses:\n  - gptq: {damp: .nan}\n")),
    Case("recipe-passes-not-list", ["compress", M, "--out", OUT, "--recipe", "{w}/r.yaml"], 2,
         "passes must be a list", setup=recipe("r.yaml", "name: d\npasses: rtn\n")),
    Case("recipe-yaml-alias-bomb", ["compress", M, "--out", OUT, "--recipe", "{w}/r.yaml"], 2,
         "aliases", setup=recipe("r.yaml", "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\nname: bomb\npasses: [rtn]\n")),
    Case("recipe-too-large", ["compress", M, "--out", OUT, "--recipe", "{w}/r.yaml"], 2,
         "more than the 1 MiB", setup=recipe("r.yaml", "name: big\npasses: [rtn]\n" + "#" * (2 << 20))),
    Case("recipe-python-tag", ["compress", M, "--out", OUT, "--recipe", "{w}/r.yaml"], 2, "invalid YAML",
         setup=recipe("r.yaml", "name: !!python/object/apply:os.system ['touch RAN']\npasses: [rtn]\n")),
    Case("recipe-binary", ["compress", M, "--out", OUT, "--recipe", "{w}/r.yaml"], 2, "not UTF-8",
         setup=write("r.yaml", b"\xff\xfe\x00\x01name")),
    Case("set-block-size-zero", [*GPTQ, "--set", "gptq.block_size=0"], 2, "block_size must be in [1, 65536], got 0"),
    Case("set-damp-negative", [*GPTQ, "--set", "gptq.damp=-5"], 2, "damp must be in (0, 1], got -5"),
    Case("set-damp-word", [*GPTQ, "--set", "gptq.damp=high"], 2, "damp: expected a number, got 'high'"),
    Case("set-act-order-word", [*GPTQ, "--set", "gptq.act_order=maybe"], 2,
         "act_order: expected true or false (bool), got 'maybe'"),
    Case("set-unknown-option", [*GPTQ, "--set", "gptq.colour=red"], 2, "pass 'gptq' has no option 'colour'"),
    Case("set-pass-not-in-recipe", [*RTN, "--set", "gptq.damp=0.1"], 2, "which recipe 'rtn' does not run"),
    Case("set-malformed", [*RTN, "--set", "damp"], 2, "--set expects PASS.OPTION=VALUE"),
    Case("config-fewer-layers", RTN, 2, "tensor(s) config.json does not describe, e.g. model.layers.1.",
         setup=edit_config("model", num_hidden_layers=1)),
    Case("config-more-layers", RTN, 2, "the checkpoint lacks 9 tensor(s) the config needs, e.g. model.layers.2.",
         setup=edit_config("model", num_hidden_layers=3)),
    Case("unknown-tensor", RTN, 2, "does not describe, e.g. model.extra_adapter.weight",
         setup=edit_weights("model", lambda sd: sd.__setitem__("model.extra_adapter.weight", torch.ones(2, 2)))),
    Case("missing-tensor-last-layer", GPTQ, 2, "lacks 1 tensor(s) the config needs, e.g. model.layers.1.mlp.up_proj",
         setup=edit_weights("model", lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))),
    Case("wrong-shape-last-layer", GPTQ, 2, "model.layers.1.mlp.up_proj.weight has shape (160, 32)",
         setup=edit_weights("model", lambda sd: sd.__setitem__("model.layers.1.mlp.up_proj.weight",
                                                                torch.zeros(160, 32)))),
    Case("nan-weight-last-layer", GPTQ, 2, "model.layers.1.mlp.down_proj.weight has 1 NaN/Inf",
         setup=edit_weights("model", lambda sd: sd["model.layers.1.mlp.down_proj.weight"].view(-1).__setitem__(
             3, float("nan")))),
    # --- detectable up front ---------------------------------------------------------------------------------------
    Case("compress-eval-windows-zero", [*RTN, "--eval-text", "{w}/text.txt", "--eval-windows", "0"], 2,
         "--eval-windows must be >= 1"),
    Case("group-size-huge", [*RTN, "--group-size", "1000000000"], 2, "larger than every linear's input width"),
    Case("group-size-zero", [*RTN, "--group-size", "0"], 2, "group_size must be -1 (per channel) or >= 1"),
    Case("bits-out-of-range", [*RTN, "--bits", "9"], 2, "bits must be in 2..8"),
    Case("seqlen-beyond-positions-llama", [*GPTQ, "--seqlen", "4096"], 2, "longer than the model's 256 positions"),
    Case("seqlen-beyond-positions-opt", ["compress", "{w}/opt", "--out", OUT, "--recipe", "gptq", "--calib",
                                         "{w}/calib.txt", "--nsamples", "2", "--seqlen", "300"], 2,
         "--seqlen 300 is longer than the model's 256 positions"),
    Case("nsamples-zero", [*GPTQ, "--nsamples", "0"], 2, "--nsamples must be >= 1"),
    Case("calib-with-data-free-recipe", [*RTN, "--calib", "{w}/calib.txt"], 2, "reads no calibration data"),
    Case("act-bits-with-weight-only", [*RTN, "--act-bits", "8"], 2, "is weight-only"),
    Case("act-bits-out-of-range", ["compress", M, "--out", OUT, "--recipe", "w8a8", "--act-bits", "1"], 2,
         "--act-bits must be in 2..16"),
    Case("calib-binary", [*GPTQ[:9], "{w}/c.bin", *GPTQ[10:]], 2, "looks binary (NUL bytes)",
         setup=write("c.bin", bytes(range(256)) * 40)),
    Case("calib-not-utf8", [*GPTQ[:9], "{w}/c.txt", *GPTQ[10:]], 2, "is not UTF-8 text",
         setup=write("c.txt", "caf\xe9 ".encode("latin-1") * 400)),
    Case("calib-device-file", [*GPTQ[:9], "/dev/zero", *GPTQ[10:]], 2, "is not a regular file"),
    Case("calib-missing", [*GPTQ[:9], "{w}/nope.txt", *GPTQ[10:]], 2, "does not exist"),
    Case("eval-text-binary", [*RTN, "--eval-text", "{w}/e.bin"], 2, "looks binary",
         setup=write("e.bin", b"\x00\x01" * 500)),
    Case("model-without-tokenizer", GPTQ, 2, "has no tokenizer", setup=no_tokenizer),
    Case("tokenizer-remote-code", GPTQ, 2, "cannot load the tokenizer", setup=remote_code_tokenizer),
    Case("side-file-link-out-of-folder", RTN, 2, "chat_template.jinja is a link to",
         setup=symlink("model/chat_template.jinja", "text.txt")),
    Case("pickle-refused", RTN, 2, "holds only pickled weights", setup=evil_pickle),
    Case("pickle-blocked-allow-pickle", [*RTN, "--allow-pickle"], 2, "refused by the safe (weights_only) unpickler",
         setup=evil_pickle),
    Case("dtype-unknown", [*RTN, "--dtype", "float8"], 2, "--dtype must be one of"),
    Case("format-unknown", ["compress", M, "--out", OUT, "--recipe", "rtn", "--format", "tflite"], 2, "tflite"),
    Case("bits16-with-gptq", [*GPTQ, "--bits", "16"], 2, "--bits 16 (no quantization) is not supported"),
    Case("model-missing", ["compress", "{w}/nomodel", "--out", OUT, "--recipe", "rtn"], 2, "does not exist"),
    Case("model-is-file", ["compress", "{w}/text.txt", "--out", OUT, "--recipe", "rtn"], 2, "is a file"),
    Case("config-malformed", RTN, 2, "cannot read", setup=write("model/config.json", "{oops")),
    Case("disk-full-in-safetensors-write", RTN, 2, "disk full while writing", special="disk_full"),
    # --- eval ------------------------------------------------------------------------------------------------------
    Case("eval-windows-zero", [*EVAL[:-1], "0"], 2, "--windows must be >= 1"),
    Case("eval-text-missing", ["eval", "{w}/art", "--text", "{w}/none.txt"], 2, "does not exist"),
    Case("eval-text-binary-file", ["eval", "{w}/art", "--text", "{w}/e.bin"], 2, "looks binary",
         setup=write("e.bin", b"\x00" * 100)),
    Case("eval-baseline-other-arch", [*EVAL, "--baseline", "{w}/opt"], 2, "not its source model"),
    Case("eval-baseline-permuted-tokenizer", [*EVAL, "--baseline", "{w}/other"], 2, "tokenizers of art and baseline",
         setup=permute_tokenizer("other")),
    Case("eval-seqlen-beyond-positions", [*EVAL[:5], "1024", *EVAL[6:]], 2, "longer than the model's 256 positions"),
    # --- gate ------------------------------------------------------------------------------------------------------
    Case("gate-baseline-other-arch", [*GATE, "--baseline", "{w}/opt", "--min-top1", "0.5"], 2,
         "not its source model"),
    Case("gate-baseline-other-weights", [*GATE, "--baseline", "{w}/other", "--min-top1", "0.5"], 2,
         "is not the model art was compressed from"),
    Case("gate-baseline-other-vocab", [*GATE, "--baseline", "{w}/bigvocab", "--min-top1", "0.5"], 2,
         "vocab_size differ"),
    Case("gate-permuted-tokenizer", [*GATE, "--baseline", "{w}/model", "--min-top1", "0.5",
                                     "--allow-other-baseline"], 2, "tokenizers of art and baseline model disagree",
         setup=permute_tokenizer("model")),
    Case("gate-permuted-tokenizer-json", [*GATE, "--baseline-json", "{w}/base.json", "--min-top1", "0.5"], 2,
         "splits the text differently", setup=permute_tokenizer("art")),
    Case("gate-json-other-model", [*GATE, "--baseline-json", "{w}/bigbase.json", "--min-top1", "0.5"], 2,
         "vocab_size differ"),
    Case("gate-json-other-fingerprint", [*GATE, "--baseline-json", "{w}/base.json", "--min-top1", "0.5"], 2,
         "not the model art was compressed from",
         setup=edit_json("base.json", lambda d: d.__setitem__("reference_fingerprint", "0" * 64))),
    Case("gate-json-old-format", [*GATE, "--baseline-json", "{w}/base.json", "--min-top1", "0.5"], 2,
         "does not record its reference model",
         setup=edit_json("base.json", lambda d: d.pop("reference_identity"))),
    Case("gate-json-malformed", [*GATE, "--baseline-json", "{w}/base.json", "--min-top1", "0.5"], 2,
         "is not a ptq gate baseline file", setup=edit_json("base.json", lambda d: d["topk"].__setitem__("k", "x"))),
    Case("gate-json-not-json", [*GATE, "--baseline-json", "{w}/text.txt", "--min-top1", "0.5"], 2,
         "is not a ptq gate baseline file"),
    Case("gate-json-oversized", [*GATE, "--baseline-json", "{w}/huge.json", "--min-top1", "0.5"], 2,
         "more than the 256 MiB ptq reads", setup=sparse("huge.json", (256 << 20) + 1)),
    Case("gate-json-other-text", [*GATE[:3], "{w}/t2.txt", *GATE[4:], "--baseline-json", "{w}/base.json",
                                  "--min-top1", "0.5"], 2, "different --text file",
         setup=write("t2.txt", "Another text entirely, long enough for four windows of text. " * 30)),
    Case("gate-no-threshold", [*GATE, "--baseline", "{w}/model"], 2, "give at least one threshold"),
    Case("gate-both-baselines", [*GATE, "--baseline", "{w}/model", "--baseline-json", "{w}/base.json",
                                 "--min-top1", "0.5"], 2, "pass exactly one of"),
    Case("gate-seqlen-beyond-positions", [*GATE[:5], "1024", *GATE[6:], "--baseline", "{w}/model", "--min-top1",
                                          "0.5"], 2, "longer than the model's 256 positions"),
    Case("gate-text-binary", [*GATE[:3], "{w}/e.bin", *GATE[4:], "--baseline", "{w}/model", "--min-top1", "0.5"],
         2, "looks binary", setup=write("e.bin", b"\x00" * 100)),
    Case("gate-save-baseline-missing-dir", [*GATE, "--baseline", "{w}/model", "--save-baseline",
                                            "{w}/no/dir/b.json"], 2, "--save-baseline: cannot write in"),
    Case("gate-save-baseline-onto-input", [*GATE, "--baseline", "{w}/model", "--save-baseline", "{w}/text.txt"], 2,
         "would overwrite or write inside an input"),
    Case("gate-artifact-without-tokenizer", [*GATE, "--baseline", "{w}/model", "--min-top1", "0.5"], 2,
         "has no tokenizer", setup=lambda w: [(w / "art" / f).unlink() for f in ("tokenizer.json",
                                                                                  "tokenizer_config.json")]),
    Case("gate-regression-exit-1", [*GATE, "--baseline", "{w}/model", "--max-kl", "0"], 1, "FAIL"),
    # --- inspect ---------------------------------------------------------------------------------------------------
    Case("inspect-verify-emptied-table", ["inspect", "{w}/art", "--verify"], 1, "lists no files",
         setup=edit_manifest(lambda m: m.__setitem__("files", {}))),
    Case("inspect-verify-entry-removed", ["inspect", "{w}/art", "--verify"], 1,
         "layer-00001.safetensors: model file not listed",
         setup=edit_manifest(lambda m: m["files"].pop("layer-00001.safetensors"))),
    Case("inspect-verify-changed-file", ["inspect", "{w}/art", "--verify"], 1, "config.json: sha256 differs",
         setup=lambda w: (w / "art" / "config.json").write_text((w / "art" / "config.json").read_text() + " ")),
    Case("inspect-manifest-files-list", ["inspect", "{w}/art"], 2, "is malformed: 'files' is not a mapping",
         setup=edit_manifest(lambda m: m.__setitem__("files", []))),
    Case("inspect-manifest-model-string", ["inspect", "{w}/art"], 2, "is malformed: 'model' is not a mapping",
         setup=edit_manifest(lambda m: m.__setitem__("model", "x"))),
    Case("inspect-manifest-entry-escapes", ["inspect", "{w}/art", "--verify"], 2, "points outside the folder",
         setup=edit_manifest(lambda m: m["files"].__setitem__("../model/config.json", {"bytes": 1, "sha256": "0"}))),
    Case("inspect-manifest-bad-json", ["inspect", "{w}/art"], 2, "is not valid JSON",
         setup=write("art/manifest.json", "{\"schema\": ")),
    Case("inspect-manifest-passes-garbage", ["inspect", "{w}/art"], 2, "manifest.json is malformed",
         setup=edit_manifest(lambda m: m["recipe"].__setitem__("passes", [1, 2]))),
    Case("inspect-manifest-oversized", ["inspect", "{w}/art"], 2, "larger than 64 MiB",
         setup=sparse("art/manifest.json", (64 << 20) + 1)),
    Case("inspect-not-a-folder", ["inspect", "{w}/text.txt"], 2, "is not a folder"),
    # --- export ----------------------------------------------------------------------------------------------------
    Case("export-format-unknown", ["export", "{w}/art", "--format", "tflite"], 2, "is not supported"),
    Case("export-not-a-folder", ["export", "{w}/text.txt"], 2, "is not a folder"),
]


@pytest.fixture
def work(tmp_path, base, monkeypatch):
    w = tmp_path / "w"
    w.mkdir()
    for name in ("model", "other", "opt", "bigvocab", "art"):
        shutil.copytree(base / name, w / name)
    for name in ("text.txt", "calib.txt", "base.json", "bigbase.json"):
        shutil.copy(base / name, w / name)
    monkeypatch.chdir(w)
    return w


def leftovers(w: Path) -> list[str]:
    return sorted(p.name for p in w.rglob("*") if p.name.endswith((".ptq-partial", ".ptq-lock"))
                  or p.name.startswith(".ptq-probe-"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_battery(case: Case, work: Path, monkeypatch):
    held = None
    if case.special == "disk_full":
        disk_full_on_first_shard(monkeypatch)
    if case.special == "lock":
        setup, state = hold_lock(monkeypatch)
        setup(work)
        held = state["lock"]
    if case.setup:
        case.setup(work)
    before = snapshot(work)
    argv = [a.replace("{w}", str(work)) for a in case.argv]
    try:
        res = CliRunner().invoke(app, argv)
    finally:
        if held is not None:
            held.release()
    out = res.output
    assert res.exit_code == case.code, out
    assert case.msg in " ".join(out.split()), out
    assert "Traceback" not in out
    if case.code == 2:
        errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, out
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    after = snapshot(work)
    if held is not None:  # the lock file is the test's own
        before = {k: v for k, v in before.items() if not k.endswith(".ptq-lock")}
    assert after == before  # inputs byte-identical, nothing written
    if not case.partial_ok:
        assert leftovers(work) == []
    assert not (work / "RAN").exists() and not (Path.cwd() / "RAN").exists()  # no foreign code ran


def test_battery_size():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


# -- beyond single command lines ------------------------------------------------------------------------------------
def test_lock_held_by_another_process_then_stale(work):
    """A second process holding the lock makes compress fail fast (exit 2, nothing written); once that process
    is killed (-9, its lock file left behind) the next run is not blocked and removes the stale file."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("import sys, time; from ptq.outlock import OutputLock; OutputLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(work / "out")], cwd=root, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert proc.stdout.readline().strip() == "locked"
        before = snapshot(work)
        res = CliRunner().invoke(app, [a.replace("{w}", str(work)) for a in RTN])
        assert res.exit_code == 2 and f"another ptq run (process {proc.pid}) is writing out" in res.output
        assert snapshot(work) == before
    finally:
        proc.kill()
        proc.wait()
    assert (work / "out.ptq-lock").exists()  # stale: the holder died without cleaning up
    res = CliRunner().invoke(app, [a.replace("{w}", str(work)) for a in RTN])
    assert res.exit_code == 0, res.output
    assert (work / "out" / "manifest.json").is_file() and leftovers(work) == []


def test_disk_full_after_first_layer_resumes(work, monkeypatch):
    """ENOSPC inside the second layer's safetensors write: exit 2 with the documented resume message, the first
    layer kept; after "freeing space" --resume finishes with the same bytes as an uninterrupted run."""
    import ptq.export.base as eb
    from safetensors import SafetensorError

    real = eb.save_file

    def full(tensors, path, metadata=None):
        if Path(path).name == "layer-00001.safetensors":
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                  'message: "No space left on device" })')
        return real(tensors, path, metadata=metadata)

    argv = [a.replace("{w}", str(work)) for a in GPTQ]
    monkeypatch.setattr(eb, "save_file", full)
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, res.output
    msg = " ".join(res.output.split())
    assert "disk full while writing" in msg and "rerun with --resume" in msg and "Traceback" not in msg
    assert (work / "out.ptq-partial" / "layer-00000.safetensors").is_file() and not (work / "out").exists()
    monkeypatch.setattr(eb, "save_file", real)
    res = CliRunner().invoke(app, argv + ["--resume"])
    assert res.exit_code == 0, res.output
    assert json.loads((work / "out" / "report.json").read_text())["resumed_from_layer"] == 1
    res = CliRunner().invoke(app, [a.replace("{w}/out", str(work / "ref")).replace("{w}", str(work)) for a in GPTQ])
    assert res.exit_code == 0, res.output
    for f in (work / "ref").iterdir():
        if f.name != "report.json":
            assert f.read_bytes() == (work / "out" / f.name).read_bytes(), f.name
    assert leftovers(work) == []


def test_controls_succeed(work):
    """The same inputs used correctly pass, so the rows above fail for the reason they name."""
    w = str(work)
    run = lambda *a: CliRunner().invoke(app, [x.replace("{w}", w) for x in a])  # noqa: E731
    r = run(*GATE, "--baseline", "{w}/model", "--max-ppl-ratio", "10", "--json")
    assert r.exit_code == 0, r.output
    r = run(*GATE, "--baseline-json", "{w}/base.json", "--max-ppl-ratio", "10")
    assert r.exit_code == 0, r.output
    r = run(*GATE, "--baseline", "{w}/other", "--max-ppl-ratio", "1000", "--allow-other-baseline")
    assert r.exit_code == 0, r.output
    r = run(*EVAL, "--baseline", "{w}/model", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["top1"] > 0.5, r.output
    r = run("inspect", "{w}/art", "--verify")
    assert r.exit_code == 0 and "0 problem(s)" in r.output, r.output
    before = snapshot(work / "model")
    r = run("compress", "{w}/model", "--out", "{w}/art", "--recipe", "rtn", "--format", "fp", "--force")
    assert r.exit_code == 0, r.output  # --force replaces a folder ptq wrote
    assert snapshot(work / "model") == before and leftovers(work) == []


def test_content_fingerprint(work):
    """Resume / gate fingerprint: a copy has the same fingerprint; one changed weight value changes it."""
    from ptq.resume import model_fingerprint

    shutil.copytree(work / "model", work / "copy")
    assert model_fingerprint(work / "copy") == model_fingerprint(work / "model")
    edit_weights("copy", lambda sd: sd["model.layers.1.mlp.up_proj.weight"].view(-1).__setitem__(0, 0.5))(work)
    assert model_fingerprint(work / "copy") != model_fingerprint(work / "model")
    m = json.loads((work / "art" / "manifest.json").read_text())["model"]
    assert m["fingerprint"] == model_fingerprint(work / "model") and m["model_type"] == "llama"
    assert m["num_hidden_layers"] == 2 and m["vocab_size"] == 320


def test_side_file_link_inside_folder_is_copied(work):
    """A link that stays inside the model folder is fine (copied as the file's bytes, not as a link)."""
    (work / "model" / "templates").mkdir()
    (work / "model" / "templates" / "chat.jinja").write_text("{{ messages }}")
    (work / "model" / "chat_template.jinja").symlink_to(work / "model" / "templates" / "chat.jinja")
    r = CliRunner().invoke(app, [a.replace("{w}", str(work)) for a in RTN])
    assert r.exit_code == 0, r.output
    out = work / "out" / "chat_template.jinja"
    assert not out.is_symlink() and out.read_text() == "{{ messages }}"
