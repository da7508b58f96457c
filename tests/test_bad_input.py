"""Every kind of bad input to `ptq compress` gives exit code 2, one `error:` line naming the problem, and leaves
the work folder exactly as it was (no output, no partial folder, inputs unchanged)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app

torch.set_num_threads(1)


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 (folders as 'dir') of everything under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from conftest import make_tiny

    return make_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def work(tmp_path, tiny_llama):
    """tmp work folder holding a private copy of the tiny Llama (``model``) and calibration texts."""
    shutil.copytree(tiny_llama, tmp_path / "model")
    (tmp_path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return tmp_path


def run_bad(work: Path, args: list[str], message: str, env: dict | None = None):
    """Run ``ptq compress`` args; assert exit 2, exactly one error line containing ``message``, no changes."""
    before = snapshot(work)
    res = CliRunner().invoke(app, ["compress", *args], env=env)
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2, res.output
    assert len(errors) == 1, res.output
    assert message in errors[0], errors[0]
    assert snapshot(work) == before  # nothing written, nothing overwritten, inputs unchanged
    return errors[0]


def args(work, *extra, recipe="rtn"):
    return [str(work / "model"), "--out", str(work / "out"), "--recipe", recipe, "--format", "fp", *extra]


def gptq_args(work, calib, *extra):
    return args(work, "--calib", str(calib), "--nsamples", "2", "--seqlen", "32", *extra, recipe="gptq")


def test_missing_model_folder(work):
    run_bad(work, ["/nonexistent/ptq/model", "--out", str(work / "out")], "model folder /nonexistent/ptq/model does not exist")


def test_corrupt_config(work):
    (work / "model" / "config.json").write_text("{not json")
    run_bad(work, args(work), "cannot read")


def test_model_folder_without_weights(work):
    (work / "model" / "model.safetensors").unlink()
    run_bad(work, args(work), "no weights (*.safetensors)")


def test_truncated_safetensors(work):
    f = work / "model" / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    run_bad(work, args(work), "corrupt safetensors file model.safetensors")


def test_unsupported_architecture(work):
    cfg = json.loads((work / "model" / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (work / "model" / "config.json").write_text(json.dumps(cfg))
    run_bad(work, args(work), "unsupported architecture 'gpt2'")


def test_unknown_recipe(work):
    run_bad(work, args(work, recipe="no-such-recipe"), "unknown recipe 'no-such-recipe'")


def test_unknown_recipe_key(work):
    (work / "bad.yaml").write_text("name: bad\ndefaults: {bits: 4, colour: red}\npasses:\n  - rtn: {}\n")
    run_bad(work, args(work, recipe=str(work / "bad.yaml")), "unknown key(s) colour")


def test_unknown_pass_option(work):
    (work / "bad.yaml").write_text("name: bad\npasses:\n  - rtn: {strength: 3}\n")
    run_bad(work, args(work, recipe=str(work / "bad.yaml")), "pass rtn: unknown key(s) strength")
    run_bad(work, args(work, "--set", "rtn.strength=3"), "pass 'rtn' has no option 'strength'")


@pytest.mark.parametrize("bits", ["1", "9"])
def test_bits_out_of_range(work, bits):
    run_bad(work, args(work, "--bits", bits), f"bits must be in 2..8, got {bits}")


@pytest.mark.parametrize("gs", ["0", "-2"])
def test_group_size_out_of_range(work, gs):
    run_bad(work, args(work, "--group-size", gs), f"group_size must be -1 (per channel) or >= 1, got {gs}")


def test_empty_calibration_text(work):
    (work / "empty.txt").write_text("  \n\n")
    run_bad(work, gptq_args(work, work / "empty.txt"), "is empty")


def test_too_short_calibration_text(work):
    (work / "short.txt").write_text("tiny")
    run_bad(work, gptq_args(work, work / "short.txt"), "calibration text is too short: 4 tokens")


def _poison(model: Path, name: str, value: float) -> None:
    f = model / "model.safetensors"
    sd = load_file(str(f))
    sd[name].view(-1)[7] = value
    save_file(sd, str(f), metadata={"format": "pt"})


def test_nan_weight_in_last_layer(work):
    """The NaN sits in the last layer: layer 0 is already written when it is found, and still nothing remains."""
    _poison(work / "model", "model.layers.1.mlp.down_proj.weight", float("nan"))
    run_bad(work, gptq_args(work, work / "calib.txt"),
            "weight model.layers.1.mlp.down_proj.weight has 1 NaN/Inf value(s) of 10240")


def test_inf_weight_in_embeddings(work):
    _poison(work / "model", "model.embed_tokens.weight", float("inf"))
    run_bad(work, args(work), "weight model.embed_tokens.weight has 1 NaN/Inf value(s)")


def test_output_exists(work):
    (work / "out").mkdir()
    (work / "out" / "keep.txt").write_text("precious")
    run_bad(work, args(work), f"output folder {work / 'out'} already exists; pass --force")


def test_output_inside_input(work):
    run_bad(work, [str(work / "model"), "--out", str(work / "model" / "q"), "--recipe", "rtn"],
            "is inside the input model folder")


def test_no_disk_space(work):
    run_bad(work, args(work), "not enough disk space", env={"PTQ_TEST_FREE_BYTES": "1000000"})


def test_unfinished_run_needs_resume_or_force(work):
    (work / "out.ptq-partial").mkdir()
    (work / "out.ptq-partial" / "ptq-state.json").write_text("{}")
    run_bad(work, args(work), "found an unfinished run in")


def test_pickle_refused_by_default(work):
    model = work / "model"
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    run_bad(work, args(work), "holds only pickled weights (pytorch_model.bin)")


def test_remote_code_not_run_by_default(work):
    """A config asking for custom code is refused without --trust-remote-code; the code never runs."""
    model = work / "model"
    (model / "evil.py").write_text("import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('x')\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="evil-arch", auto_map={"AutoConfig": "evil.EvilConfig"})
    (model / "config.json").write_text(json.dumps(cfg))
    run_bad(work, args(work), "cannot read")
    assert not (model / "RAN").exists()


def test_recipe_path_cannot_escape_cwd(work, monkeypatch):
    monkeypatch.chdir(work)
    (work / "esc.yaml").write_text("name: esc\ncalibration: {path: ../../etc/passwd}\npasses:\n  - gptq: {}\n")
    run_bad(work, args(work, recipe="esc.yaml"), "points outside the working directory")


def test_good_input_still_works(work):
    """Control: the same fixture with valid input succeeds (so the tests above fail for the stated reason)."""
    res = CliRunner().invoke(app, ["compress", *gptq_args(work, work / "calib.txt")])
    assert res.exit_code == 0, res.output
    assert (work / "out" / "manifest.json").is_file() and not (work / "out.ptq-partial").exists()


def test_eval_text_checked_before_work(work):
    (work / "short.txt").write_text("ab")
    run_bad(work, args(work, "--eval-text", str(work / "short.txt")), "--eval-text: evaluation text too short")
    run_bad(work, args(work, "--eval-text", str(work / "nope.txt")), f"--eval-text file {work / 'nope.txt'} does not exist")
