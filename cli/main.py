"""`ptq` command line: a thin typer layer over ptq.compress / ptq.eval. Bad input -> one line on stderr, exit 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from cli.common import console, fail  # noqa: F401  (console: re-exported for callers of cli.main)
from cli.progress import LayerProgress

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Post-training compression of LLMs.")


def _parse_set(items: list[str]) -> dict:
    """``--set gptq.damp=0.1`` -> {"gptq": {"damp": 0.1}} (values parsed as YAML scalars)."""
    import yaml

    out: dict = {}
    for it in items:
        if "=" not in it or "." not in it.split("=", 1)[0]:
            fail(f"--set expects PASS.OPTION=VALUE, got {it!r}")
        key, val = it.split("=", 1)
        pname, opt = key.split(".", 1)
        out.setdefault(pname, {})[opt] = yaml.safe_load(val)
    return out


def _fmt_bytes(n):
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


@app.command()
def compress(
    model: str = typer.Argument(..., help="model folder, hub id ORG/NAME in the local HF cache, or built-in "
                                          "alias (smollm2-135m)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (must not exist unless --force); "
                                       "default: MODEL-RECIPE-wBITS[...] in the working directory"),
    recipe: str = typer.Option("gptq", help="built-in recipe name (see `ptq recipes`) or a YAML path"),
    bits: Optional[float] = typer.Option(None, help="weight bits 2..8 (16 = unquantized, udfc only; default from the "
                                         "recipe); a fractional average such as 3.5 = mixed precision (gptq/rtn: "
                                         "bits per linear by sensitivity, docs/mixed_precision.md)"),
    bit_widths: Optional[str] = typer.Option(None, "--bit-widths", help="mixed precision: allowed widths "
                                             "(default 2,3,4,8)"),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="group size along K, -1 = per channel"),
    sym: Optional[bool] = typer.Option(None, "--sym/--asym", help="symmetric or asymmetric weights"),
    clip: Optional[str] = typer.Option(None, "--clip", help="weight clipping search: none | mse | octav (default from the recipe)"),
    act_bits: Optional[int] = typer.Option(None, "--act-bits", help="activation bits (OS+/SmoothQuant recipes)"),
    prune_ratio: Optional[float] = typer.Option(None, "--prune-ratio", help="UDFC: fraction of MLP channels pruned"),
    fmt: Optional[str] = typer.Option(None, "--format", help="gptq | compressed-tensors | fp | onnx"),
    calib: Optional[str] = typer.Option(None, help="calibration text file, .jsonl or folder of .txt (default: embedded)"),
    nsamples: Optional[int] = typer.Option(None, help="calibration samples"),
    seqlen: Optional[int] = typer.Option(None, help="tokens per calibration sample"),
    seed: Optional[int] = typer.Option(None, help="calibration sampling seed"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    dtype: str = typer.Option("float32", help="compute dtype: float32 | float16 | bfloat16"),
    store_dtype: str = typer.Option("auto", "--store-dtype", help="dtype of unquantized tensors in the output "
                                    "(embeddings, norms, biases): auto = as in the checkpoint | float16 | ..."),
    accuracy_level: int = typer.Option(4, "--accuracy-level", help="--format onnx: MatMulNBits accuracy_level; "
                                       "4 (default) = int8 activations in the kernel, fast, changes the output; "
                                       "0 = fp32, the quantized model exactly (docs/onnx.md)"),
    embed_bits: Optional[int] = typer.Option(None, "--embed-bits", help="also quantize embeddings / lm_head "
                                             "(8 or 4; compressed-tensors and onnx only, see docs/formats.md)"),
    embed_method: str = typer.Option("rtn", "--embed-method", help="--format onnx: quantizer of --embed-bits: rtn | "
                                     "mse | octav | gptq (GPTQ of the lm_head on --calib text; docs/onnx.md)"),
    embed_sym: bool = typer.Option(False, "--embed-sym", help="--format onnx: --embed-bits symmetric (no zero "
                                   "points, as the onnxruntime-genai builder's int4; default asymmetric)"),
    eval_text: Optional[str] = typer.Option(None, "--eval-text", help="text file for perplexity/KL/top-1 after export"),
    eval_windows: int = typer.Option(40, help="evaluation windows"),
    bos: Optional[bool] = typer.Option(None, "--bos/--no-bos",
                                       help="BOS before each calibration and --eval-text window (default: as the "
                                            "tokenizer does)"),
    set_: list[str] = typer.Option([], "--set", help="pass option override PASS.OPTION=VALUE (repeatable)"),
    force: bool = typer.Option(False, help="replace an existing output folder"),
    resume: bool = typer.Option(False, help="continue an interrupted run from <out>.ptq-partial (last finished layer)"),
    allow_pickle: bool = typer.Option(False, help="allow loading pickled *.bin checkpoints (runs code!)"),
    trust_remote_code: bool = typer.Option(False, help="allow the model's own Python code"),
):
    """Compress MODEL with a recipe and export it; optionally evaluate it against the original."""
    from ptq.compress import CompressOptions, UsageError
    from ptq.compress import compress as run

    overrides = _parse_set(set_)
    if prune_ratio is not None:
        overrides.setdefault("udfc", {})["prune_ratio"] = prune_ratio
    onnx = fmt == "onnx"
    opts = CompressOptions(model=model, out=str(out) if out is not None else None, recipe=recipe,
                           bits=None if bits is None else int(bits) if bits.is_integer() and bit_widths is None
                           else bits, bit_widths=bit_widths,
                           group_size=group_size, sym=sym, clip=clip, act_bits=act_bits,
                           format=None if onnx else fmt, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                           device=device, dtype=dtype, eval_text=eval_text, eval_windows=eval_windows, bos=bos,
                           force=force, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code, pass_options=overrides, resume=resume,
                           store_dtype=store_dtype, embed_bits=None if onnx else embed_bits)
    if onnx and embed_bits not in (None, 4, 8):
        fail(f"--embed-bits for ONNX must be 4 or 8, got {embed_bits}")
    from ptq.head_quant import embed_method_error

    if err := embed_method_error(embed_method, embed_bits if onnx else None, "--format onnx and --embed-bits",
                                 sym=embed_sym):
        fail(err)
    if accuracy_level not in range(5):
        fail(f"--accuracy-level must be 0..4, got {accuracy_level}")
    if accuracy_level != 4 and not onnx:
        fail("--accuracy-level applies to --format onnx only")
    try:
        if out is None:
            from ptq.compress import default_out_dir

            import dataclasses

            out = default_out_dir(dataclasses.replace(opts, format="onnx") if onnx else opts)
            opts.out = str(out)
        console.print(f"ptq compress: {model} -> {out}", highlight=False, soft_wrap=True)
        with LayerProgress(console) as prog:
            report = run(opts, progress=prog.on_pass, on_layer=prog.on_layer)
    except UsageError as e:
        fail(str(e))
    except KeyboardInterrupt:
        raise typer.Exit(130)
    if onnx:
        from cli.export_cmd import export_onnx_dir

        import shutil

        tmp_onnx = out / ".onnx-partial"
        try:
            export_onnx_dir(out, tmp_onnx, accuracy_level=accuracy_level, embed_bits=embed_bits,
                            embed_method=embed_method, embed_calib=calib, embed_sym=embed_sym)
        except (ValueError, RuntimeError, NotImplementedError) as e:
            shutil.rmtree(tmp_onnx, ignore_errors=True)
            fail(f"ONNX export failed: {e} (the compressed checkpoint is complete in {out}; "
                 "`ptq export` retries the ONNX step)")
        shutil.rmtree(out / "onnx", ignore_errors=True)
        tmp_onnx.rename(out / "onnx")
    console.print(f"output written to {out}", highlight=False, soft_wrap=True)
    t = Table(title=f"ptq compress: {out}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("recipe", report["recipe"])
    t.add_row("time", f"{report['compress_seconds']:.1f} s")
    t.add_row("peak RSS", _fmt_bytes(report["peak_rss_bytes"]))
    t.add_row("size before", _fmt_bytes(report["size_before_bytes"]))
    t.add_row("size after", _fmt_bytes(report["size_after_bytes"]))
    ev = report.get("eval")
    if ev:
        t.add_row("perplexity before", f"{ev['ppl_ref']:.3f}")
        t.add_row("perplexity after", f"{ev['ppl']:.3f}")
        t.add_row("KL (nats/token)", f"{ev['kl']:.4f}")
        t.add_row("top-1 agreement", f"{ev['top1']:.3%}")
        t.add_row("BOS", f"{'yes' if ev.get('bos') else 'no'} ({ev.get('bos_source')})")
    Console().print(t)


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="model folder (plain or compressed by ptq)"),
    text: str = typer.Option(..., "--text", help="text file"),
    baseline: Optional[str] = typer.Option(None, help="reference model for KL / top-1"),
    seqlen: int = typer.Option(512, help="window length"),
    windows: int = typer.Option(40, help="number of windows"),
    bos: Optional[bool] = typer.Option(None, "--bos/--no-bos",
                                       help="BOS before each window (default: as the tokenizer does)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Perplexity of MODEL on TEXT (and KL / top-1 agreement against --baseline)."""
    from ptq.eval.pair import evaluate_pair
    from ptq.model_io import ModelInputError

    try:
        with LayerProgress(console, label="eval layer") as prog:
            res = evaluate_pair(model, baseline, text, seqlen, windows, progress=prog.on_layer, bos=bos)
    except (ModelInputError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    if json_out:
        print(json.dumps(res, indent=2))
        return
    t = Table(title=f"ptq eval: {model}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in res.items():
        if v is not None:
            t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(t)


@app.command()
def recipes():
    """List the built-in recipes."""
    from ptq.recipes import list_builtin, load_recipe

    t = Table(title="built-in recipes")
    t.add_column("name")
    t.add_column("passes")
    t.add_column("description")
    for name in list_builtin():
        r = load_recipe(name)
        t.add_row(name, " -> ".join(n for n, _ in r.passes), r.description)
    Console().print(t)


def _register_optional():
    """Sub-commands living in their own modules (export, gate, inspect)."""
    import importlib

    for mod in ("cli.export_cmd", "cli.gate_cmd", "cli.inspect_cmd"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        m.register(app)


_register_optional()


def main() -> None:
    """Console entry point. Exit codes: 0 ok, 1 regression / changed file, 2 bad input (one ``error:`` line),
    3 internal error (a bug: traceback, then a note), 130 interrupted. Never 1 for a crash, which CI would
    read as an accuracy regression."""
    import traceback

    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        print("ptq: internal error (exit 3); please report it with the traceback above", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
