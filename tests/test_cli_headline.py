"""The headline command as a new user types it (`ptq compress MODEL --bits 4 --recipe os+`: no --out, MODEL a
folder / cached hub id / alias), what the output stores (checkpoint dtype kept, never larger than an fp16 source,
config.json and quantization_config consistent with the run) and progress in a non-terminal log."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from cli.main import app
from ptq.model_io import dir_size

torch.set_num_threads(1)


def make_7b_shaped(folder: Path, hidden: int = 256, layers: int = 2, vocab: int = 320,
                   dtype=torch.float16, architectures: bool = True) -> Path:
    """Random-init Llama with Llama-7B proportions (head_dim 128, intermediate = hidden * 11008 / 4096) at
    reduced width / depth, saved as ``dtype`` safetensors with a byte-level tokenizer."""
    from conftest import byte_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11008 // 4096, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=vocab,
                      max_position_embeddings=512, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    if not architectures:
        c = json.loads((folder / "config.json").read_text())
        c.pop("architectures", None)
        (folder / "config.json").write_text(json.dumps(c))
    return folder


@pytest.fixture(scope="module")
def llama_7b(tmp_path_factory):
    return make_7b_shaped(tmp_path_factory.mktemp("src") / "llama-7b")


def invoke(args, env=None):
    return CliRunner().invoke(app, ["compress", *args], env=env)


def test_headline_command_without_out(tmp_path, llama_7b, monkeypatch):
    """`ptq compress llama-7b --bits 4 --recipe os+` in a folder holding `llama-7b` (calibration trimmed to
    keep the test fast; the literal command is measured in the report)."""
    import shutil

    shutil.copytree(llama_7b, tmp_path / "llama-7b")
    monkeypatch.chdir(tmp_path)
    res = invoke(["llama-7b", "--bits", "4", "--recipe", "os+", "--nsamples", "2", "--seqlen", "32",
                  "--set", "os+.grid=8"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "llama-7b-osplus-w4a8"
    assert (out / "config.json").is_file() and (out / "manifest.json").is_file()
    lines = res.output.splitlines()
    assert lines[0] == f"ptq compress: llama-7b -> {out}"  # where it goes, before any work
    assert f"output written to {out}" in res.output
    # non-terminal output: one line per finished layer, no progress bar
    done = [ln for ln in lines if re.fullmatch(r"layer \d/2 done in [\d.]+ s \(total [\d.]+ s\)", ln)]
    assert [d.split()[1] for d in done] == ["1/2", "2/2"]
    assert "None" not in res.output
    assert dir_size(out) < dir_size(tmp_path / "llama-7b")
    # a second run refuses to overwrite the default folder (exit 2) and says how to proceed
    again = invoke(["llama-7b", "--bits", "4", "--recipe", "os+", "--nsamples", "2", "--seqlen", "32"])
    assert again.exit_code == 2 and "--force" in again.output


def test_default_out_names(tmp_path, monkeypatch):
    from ptq.compress import CompressOptions, default_out_dir

    monkeypatch.chdir(tmp_path)
    name = lambda **kw: default_out_dir(CompressOptions(**kw)).name  # noqa: E731
    assert name(model="some/where/llama-7b/", recipe="os+", bits=4) == "llama-7b-osplus-w4a8"
    assert name(model="org/SmolLM2", recipe="gptq", bits=3, group_size=64) == "SmolLM2-gptq-w3-g64"
    assert name(model="m", recipe="gptq", group_size=-1, format="compressed-tensors") == \
        "m-gptq-w4-pc-compressed-tensors"
    assert name(model="m", recipe="rtn", sym=True) == "m-rtn-w4-sym"
    assert name(model="m", recipe="gptq", format="onnx") == "m-gptq-w4-onnx"
    assert default_out_dir(CompressOptions(model="m", recipe="rtn")).parent == tmp_path


def test_unknown_model_lists_forms_and_no_progress(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    res = invoke(["llama-7b", "--bits", "4", "--recipe", "os+"], env=env)
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1
    for part in ("llama-7b does not exist", "tried:", "local model folder", "hub id", "built-in alias",
                 "smollm2-135m", "Hugging Face cache"):
        assert part in errors[0], errors[0]
    assert "layers" not in res.output and "None" not in res.output and "done in" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created


def _fake_hub_cache(root: Path, repo: str, src: Path) -> Path:
    """The layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/<rev>/files}."""
    import shutil

    base = root / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / "0123abc"
    shutil.copytree(src, snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0123abc")
    return snap


def test_hub_id_and_bare_name_from_local_cache(tmp_path, monkeypatch, tiny_models):
    from ptq.model_io import resolve_model

    snap = _fake_hub_cache(tmp_path / "hub", "org/Tiny-Llama", tiny_models["llama"])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/Tiny-Llama") == snap
    assert resolve_model("tiny-llama") == snap  # bare repo name, unique in the cache
    res = invoke(["org/Tiny-Llama", "--recipe", "rtn", "--format", "fp"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "Tiny-Llama-rtn-w4-fp" / "config.json").is_file()


def _tensor_dtypes(folder: Path) -> dict[str, torch.dtype]:
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k).dtype
    return out


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_fp16_source_never_larger_and_keeps_dtype(tmp_path, llama_7b, fmt):
    out = tmp_path / "out"
    res = invoke([str(llama_7b), "--out", str(out), "--recipe", "rtn", "--bits", "8", "--group-size", "32",
                  "--format", fmt])
    assert res.exit_code == 0, res.output
    assert dir_size(out) < dir_size(llama_7b), (dir_size(out), dir_size(llama_7b))
    dt = _tensor_dtypes(out)
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
              "model.layers.0.input_layernorm.weight"):
        assert dt[k] == torch.float16, k
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    # --store-dtype overrides, --dtype (compute) does not leak into the files
    out32 = tmp_path / "out32"
    res = invoke([str(llama_7b), "--out", str(out32), "--recipe", "rtn", "--format", fmt, "--dtype", "float32",
                  "--store-dtype", "float32"])
    assert res.exit_code == 0, res.output
    assert _tensor_dtypes(out32)["model.embed_tokens.weight"] == torch.float32
    res = invoke([str(llama_7b), "--out", str(tmp_path / "o3"), "--recipe", "rtn", "--format", fmt,
                  "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
    assert _tensor_dtypes(tmp_path / "o3")["model.norm.weight"] == torch.float16


def test_quantization_config_matches_the_run(tmp_path, monkeypatch):
    src = make_7b_shaped(tmp_path / "src", hidden=128, dtype=torch.float32, architectures=False)
    (src / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 7}))
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    common = ["--calib", str(calib), "--nsamples", "2", "--seqlen", "32", "--format", "gptq"]
    for static in (True, False):
        out = tmp_path / f"gptq-{static}"
        res = invoke([str(src), "--out", str(out), "--recipe", "gptq", *common,
                      "--set", f"gptq.static_groups={str(static).lower()}"])
        assert res.exit_code == 0, res.output
        cfg = json.loads((out / "config.json").read_text())
        qc = cfg["quantization_config"]
        man = json.loads((out / "manifest.json").read_text())
        opts = next(p["options"] for p in man["recipe"]["passes"] if p["name"] == "gptq")
        assert qc["static_groups"] is static is opts["static_groups"]
        assert qc["damp_percent"] == opts["damp"] and qc["true_sequential"] == opts["true_sequential"]
        assert cfg["architectures"] == ["LlamaForCausalLM"]  # source config had none
        assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7
    out = tmp_path / "rtn"
    assert invoke([str(src), "--out", str(out), "--recipe", "rtn", "--format", "gptq"]).exit_code == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert not {"damp_percent", "true_sequential", "static_groups"} & set(qc)
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["desc_act"] is False


def test_embed_bits_refused_where_no_loader_reads_it(tmp_path, tiny_models):
    res = invoke([str(tiny_models["llama"]), "--out", str(tmp_path / "o"), "--recipe", "rtn", "--format", "gptq",
                  "--embed-bits", "8"])
    assert res.exit_code == 2
    err = [ln for ln in res.output.splitlines() if ln.startswith("error:")][0]
    assert "--embed-bits 8" in err and "format gptq" in err and "--format onnx" in err
    assert not (tmp_path / "o").exists()


def test_plain_progress_lines(capsys):
    from rich.console import Console

    from cli.progress import LayerProgress

    with LayerProgress(Console(stderr=True, force_terminal=False)) as prog:
        prog.on_pass(0, 3, "rtn")
        prog.on_layer(0, 3)
        prog.on_layer(1, 3)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("layer 1/3 done in ") and err[1].startswith("layer 2/3 done in ")


@pytest.mark.slow  # ONNX export + validation: ~40 s on 2 loaded cores
def test_onnx_embed_bits_from_compress(tmp_path, tiny_models):
    """`ptq compress --format onnx --embed-bits 8`: the embedding becomes GatherBlockQuantized in the ONNX graph
    (the one runtime that reads quantized embeddings), validated against PyTorch."""
    pytest.importorskip("onnxruntime")
    import onnx

    out = tmp_path / "o"
    res = invoke([str(tiny_models["llama"]), "--out", str(out), "--recipe", "rtn", "--group-size", "32",
                  "--format", "onnx", "--embed-bits", "8"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "onnx" / "onnx_report.json").read_text())
    assert rep["quantized_at_export"] and rep["validation"]["max_abs_logit_diff_acc0"] < 1e-4
    ops = {n.op_type for n in onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False).graph.node}
    assert "GatherBlockQuantized" in ops
