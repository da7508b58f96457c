"""`ptq export <compressed-dir> --format onnx`: a compressed checkpoint -> ONNX with integer kernels, validated in
onnxruntime against the PyTorch fake-quant model (report in ``<out>/onnx_report.json``).

Steps (`export_onnx`): the fused decoder graph (``graph="fused"``, default: GroupQueryAttention with the KV cache,
SkipSimplifiedLayerNorm, packed q/k/v MatMulNBits, `ptq.export.onnx_fused`) for the families it covers, written with
a ``genai_config.json`` so onnxruntime-genai runs the folder; otherwise (``graph="plain"``, QDQ / W8A8 /
activation-quantized exports, other families) the fp32 KV-cache graph of the fake-quant model
(`ptq.export.onnx_graph`) with quantized linears / embeddings rewritten (`ptq.export.onnx_quant`). Saved (external
data above ~1.8 GB), then `ptq.export.onnx_validate.validate`.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ptq.head_quant import embedding_paths as _embedding_paths
from ptq.quant.qweight import QuantizedWeight

MODEL_FILE = "model.onnx"
EMBED_CALIB_WINDOWS = 16  # x 512 tokens: the lm_head Hessian of --embed-method gptq (d x d, d = hidden size)
COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


def export_onnx(model: nn.Module, qweights: dict[str, QuantizedWeight], out_dir: Path, mode: str = "nbits",
                accuracy_level: int = 4, validate: bool = True, ids: torch.Tensor | None = None,
                tied: dict[str, str] | None = None, n_new: int = 20, w8a8_weight_type: str = "uint8",
                proto=None, act_spec: dict | None = None, act_tensors=None, graph: str = "fused") -> dict:
    """Export the fake-quant ``model`` (weights = dequantized ``qweights``) to ``out_dir/model.onnx``.

    ``qweights``: module path -> QuantizedWeight (exact codes). ``proto``: an fp graph already exported from this
    model (`export_graph`; rewritten in place), else it is exported here. ``act_spec`` (config.json
    ``ptq_act_quant``; ``act_tensors[key]`` its input shifts): the calibrated activation quantizers, put into the
    graph (ptq.export.onnx_act) and installed on ``model`` as the validation reference. Returns (and writes) the
    report dict.
    """
    from ptq.passes.act_quant import install_act_quant, remove_act_quant

    act = None
    if act_spec:
        from ptq.export.onnx_act import act_map

        act = act_map(act_spec, act_tensors)
        remove_act_quant(model)  # the fp graph is traced without them; the rewrite inserts them
    from ptq.export.onnx_graph import export_graph, save_model, weight_sites
    from ptq.export.onnx_quant import quantize_graph
    from ptq.export.onnx_validate import sample_ids
    from ptq.export.onnx_validate import validate as run_validation

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if tied is None:
        emb_path, head_path = _embedding_paths(model)
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = {emb_path: head_path} if head.weight.data_ptr() == emb.weight.data_ptr() else {}
    why = _fused_unsupported(model, mode, act_spec, proto) if graph == "fused" else None
    used = "fused" if graph == "fused" and why is None else "plain"
    if used == "fused":
        from ptq.export.onnx_fused import build_fused

        proto, rw = build_fused(model, qweights, accuracy_level, tied)
        missing = sorted(set(qweights) - set(rw["replaced"]) - set(rw["fallback_fp"]))
        if missing:
            raise ValueError(f"quantized modules not in the fused ONNX graph: {missing[:5]}")
    else:
        proto = export_graph(model) if proto is None else proto
        sites = weight_sites(proto, model)
        mapped = {s.module for s in sites}
        missing = sorted(set(qweights) - mapped)
        if missing:
            raise ValueError(f"quantized modules not found in the ONNX graph: {missing[:5]}")
        rw = quantize_graph(proto, sites, qweights, mode=mode, accuracy_level=accuracy_level, tied=tied,
                            w8a8_weight_type=w8a8_weight_type, act=act)
    if act_spec:
        missing_act = sorted(set(act) - set(rw.get("act_quant", {})))
        if missing_act:
            raise ValueError(f"activation-quantized linears not found in the ONNX graph: {missing_act[:5]}")
        install_act_quant(model, act_spec, act_tensors)  # validation reference = ptq's fake-quant model
    files = save_model(proto, out_dir / MODEL_FILE, external=used == "fused")  # fused: the weights in model.onnx.data
    del proto
    report = {"mode": mode, "graph": used, "accuracy_level": accuracy_level, "opset": 21,
              "files": {f.name: f.stat().st_size for f in files},
              "size_bytes": sum(f.stat().st_size for f in files), "export_seconds": round(time.time() - t0, 2),
              **rw}
    if why is not None:
        report["graph_fallback"] = why
    if validate:
        ids = ids if ids is not None else sample_ids(model.config)
        w8 = [m for m, op in rw["replaced"].items() if op == "DynamicQuantizeMatMul"]
        t1 = time.time()
        report["validation"] = run_validation(out_dir / MODEL_FILE, model, ids, n_new=n_new, qdq=mode == "qdq",
                                              w8a8_modules=w8)
        report["validation"]["seconds"] = round(time.time() - t1, 2)
    (out_dir / "onnx_report.json").write_text(json.dumps(report, indent=2))
    return report


def _fused_unsupported(model: nn.Module, mode: str, act_spec, proto) -> str | None:
    """Why the fused graph cannot be used (None: it can)."""
    from ptq.export.onnx_fused import unsupported_reason

    if proto is not None:
        return "a plain fp graph was given"
    if mode != "nbits":
        return f"{mode} graphs are plain"
    if act_spec:
        return "activation-quantized recipe (the fused graph has no activation quantizers)"
    return unsupported_reason(model)


def load_compressed(compressed_dir: Path) -> tuple[nn.Module, dict[str, QuantizedWeight], dict]:
    """Fake-quant model (through ptq's reader, which dequantizes) + the exact QuantizedWeights of every module the
    reader knows (``reader.qweight(path)``) + the compress report (``report.json``) if any."""
    from ptq.model_io import full_model, open_weights

    model, _ = full_model(compressed_dir)
    src = open_weights(Path(compressed_dir))
    if not hasattr(src, "qweight"):
        raise ValueError(f"{compressed_dir} has no quantized weights ptq can read (compress with "
                         "--format gptq or compressed-tensors)")
    qweights = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            qw = src.qweight(name)
            if qw is not None:
                qweights[name] = qw
    rep_file = Path(compressed_dir) / "report.json"
    rep = json.loads(rep_file.read_text()) if rep_file.exists() else {}
    return model.eval(), qweights, rep


def export_onnx_dir(compressed_dir: Path, out_dir: Path, accuracy_level: int = 4, qdq: bool = False,
                    validate: bool = True, embed_bits: int | None = None, graph: str = "fused",
                    embed_method: str = "rtn", embed_calib: str | None = None, embed_sym: bool = False) -> dict:
    """`ptq compress --format onnx` / `ptq export`: compressed folder -> ONNX folder (+ config/tokenizer files)."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    _refuse_moe(Path(compressed_dir))
    model, qweights, rep = load_compressed(Path(compressed_dir))
    cfg = json.loads((Path(compressed_dir) / "config.json").read_text())
    from ptq.passes.act_quant import SPEC_KEY, _Getter

    act_spec = cfg.get(SPEC_KEY)
    act_tensors = None
    if act_spec:
        from ptq.model_io import SafetensorsSource

        act_tensors = _Getter(SafetensorsSource(Path(compressed_dir)))
    mode = "qdq" if qdq else "nbits"
    tied, extra = None, []
    tok = None
    try:
        from ptq.model_io import tokenizer_for

        tok = tokenizer_for(compressed_dir)
    except Exception:  # tokenizer files are optional for validation
        pass
    if embed_bits:
        from ptq.head_quant import quantize_embeddings

        calib = None
        if embed_method == "gptq":
            if tok is None:
                raise ValueError(f"--embed-method gptq needs calibration text: {compressed_dir} has no tokenizer "
                                 "(copy the base model's tokenizer files into it)")
            from calib.data import load_calibration

            calib = load_calibration(embed_calib, tok, nsamples=EMBED_CALIB_WINDOWS, seqlen=512)
        tied, extra = quantize_embeddings(model, qweights, embed_bits, method=embed_method, calib_ids=calib,
                                           sym=embed_sym)
    from ptq.export.onnx_validate import sample_ids

    report = export_onnx(model, qweights, out_dir, mode=mode, accuracy_level=accuracy_level, validate=validate,
                         ids=sample_ids(model.config, tok), tied=tied, act_spec=act_spec, act_tensors=act_tensors,
                         graph=graph)
    report["source"] = str(compressed_dir)
    report["quantized_at_export"] = extra
    if extra:
        report["embed_quant"] = {"bits": embed_bits, "group_size": 32, "sym": embed_sym, "method": embed_method}
    if act_spec:
        report["act_quant_scheme"] = {k: act_spec[k] for k in ("bits", "granularity", "sym")}
    from ptq.validate import side_file

    for f in COPY_FILES:
        p = side_file(Path(compressed_dir), f)  # never through a link that leaves the folder
        if p is not None:
            shutil.copyfile(p, Path(out_dir) / f)
    if report["graph"] == "fused":
        from ptq.export.onnx_genai import write_genai_config

        write_genai_config(Path(out_dir), model.config, Path(compressed_dir))
    (Path(out_dir) / "onnx_report.json").write_text(json.dumps(report, indent=2))
    return report


def _refuse_moe(compressed_dir: Path) -> None:
    """The graph export cannot trace data-dependent expert routing (docs/architectures.md)."""
    from ptq import moe

    try:
        mt = json.loads((compressed_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return
    if mt in moe.ARCHS:
        raise ValueError(f"ONNX export does not support mixture-of-experts models ({mt}); use the gptq or "
                         "compressed-tensors checkpoint (see docs/architectures.md)")


def register(app) -> None:
    import typer

    @app.command("export")
    def export(
        compressed_dir: Path = typer.Argument(..., help="folder written by `ptq compress` (gptq / compressed-tensors)"),
        fmt: str = typer.Option("onnx", "--format", help="onnx"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default <dir>/onnx)"),
        accuracy_level: int = typer.Option(4, "--accuracy-level", help="MatMulNBits accuracy_level: 0 exact fp32 "
                                           "compute, 4 int8 activations (fast on CPU)"),
        qdq: bool = typer.Option(False, "--qdq", help="portable DequantizeLinear(int4, block) + MatMul graph"),
        embed_bits: Optional[int] = typer.Option(None, "--embed-bits", help="also quantize the fp embedding / "
                                                 "lm_head at export (2, 4 or 8 bits, group 32)"),
        embed_method: str = typer.Option("rtn", "--embed-method", help="quantizer of --embed-bits: rtn | mse | "
                                         "octav (clipped RTN) | gptq (lm_head GPTQ on final-norm outputs of "
                                         "calibration text; a tied embedding shares its codes)"),
        embed_calib: Optional[str] = typer.Option(None, "--embed-calib", help="calibration text of --embed-method "
                                                  "gptq (default: the built-in text)"),
        embed_sym: bool = typer.Option(False, "--embed-sym", help="--embed-bits symmetric (no zero points, as the "
                                       "onnxruntime-genai builder's int4; default asymmetric)"),
        no_validate: bool = typer.Option(False, "--no-validate", help="skip the onnxruntime check"),
        graph: str = typer.Option("fused", "--graph", help="fused: GroupQueryAttention / SkipSimplifiedLayerNorm "
                                  "graph + genai_config.json (llama, mistral, qwen2; others fall back to plain); "
                                  "plain: the torch.onnx graph with integer kernels"),
    ):
        """Export a compressed model to ONNX (MatMulNBits / GatherBlockQuantized / DynamicQuantizeMatMul)."""
        from rich.console import Console

        from cli.common import fail

        if fmt != "onnx":
            fail(f"--format {fmt!r} is not supported by `ptq export`; use onnx")
        if not compressed_dir.is_dir():
            fail(f"{compressed_dir} is not a folder")
        if embed_bits not in (None, 2, 4, 8):
            fail("--embed-bits must be 2, 4 or 8")
        if accuracy_level not in range(5):
            fail("--accuracy-level must be 0..4")
        from ptq.head_quant import embed_method_error

        if err := embed_method_error(embed_method, embed_bits, sym=embed_sym):
            fail(err)
        if embed_calib is not None and not Path(embed_calib).exists():
            fail(f"--embed-calib {embed_calib} does not exist")
        if graph not in ("fused", "plain"):
            fail(f"--graph must be fused or plain, got {graph!r}")
        try:
            rep = export_onnx_dir(compressed_dir, out or compressed_dir / "onnx", accuracy_level, qdq,
                                  not no_validate, embed_bits, graph, embed_method, embed_calib, embed_sym)
        except ValueError as e:
            fail(str(e))
        v = rep.get("validation", {})
        Console().print(json.dumps({k: rep[k] for k in ("mode", "graph", "accuracy_level", "size_bytes", "fallback_fp")}
                                   | {k: v[k] for k in v if k.startswith(("max_abs", "greedy_match"))}, indent=2))
