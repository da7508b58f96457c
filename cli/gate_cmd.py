"""``ptq gate``: CI accuracy gate. Exit 0 = all thresholds met, 1 = regression (table says which), 2 = bad input.

    ptq gate out/ --baseline fp-model/ --text val.txt --max-ppl-ratio 1.05 --min-top1 0.9 --max-kl 0.05
    ptq gate out/ --baseline fp-model/ --text val.txt --save-baseline ci/baseline.json   # store reference numbers
    ptq gate out/ --baseline-json ci/baseline.json --text val.txt --max-ppl-ratio 1.05 --min-top1 0.9 --json
"""
from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table


def gate(
    compressed: str = typer.Argument(..., help="compressed model folder (written by ptq compress)"),
    text: str = typer.Option(..., "--text", help="evaluation text file"),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="reference (uncompressed) model folder"),
    baseline_json: Optional[str] = typer.Option(None, "--baseline-json",
                                                help="stored reference numbers (from --save-baseline) instead of a model"),
    save_baseline: Optional[str] = typer.Option(None, "--save-baseline",
                                                help="write the reference numbers of --baseline to this JSON file"),
    max_ppl_ratio: Optional[float] = typer.Option(None, "--max-ppl-ratio", help="fail if ppl / ppl_ref is above"),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="fail if top-1 agreement is below"),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", help="fail if KL (nats/token) is above"),
    seqlen: int = typer.Option(512, help="tokens per evaluation window"),
    windows: int = typer.Option(40, help="number of evaluation windows"),
    bos: Optional[bool] = typer.Option(None, "--bos/--no-bos",
                                       help="BOS before each window (default: as the tokenizer does)"),
    topk: int = typer.Option(8, help="reference tokens stored per position by --save-baseline (for KL)"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON on stdout"),
    allow_other_baseline: bool = typer.Option(False, "--allow-other-baseline",
                                              help="compare with a baseline that is not the artifact's source "
                                                   "model (same architecture and tokenizer still required)"),
):
    """Evaluate COMPRESSED against a baseline and fail (exit 1) when a threshold is crossed."""
    from cli.common import fail
    from ptq.gate import GateInputError, Thresholds, check, gate_report, load_baseline, measure
    from ptq.gate import save_baseline as write_baseline
    from ptq.model_io import ModelInputError

    th = Thresholds(max_ppl_ratio, min_top1, max_kl)
    try:
        if (baseline is None) == (baseline_json is None):
            raise GateInputError("pass exactly one of --baseline MODEL or --baseline-json FILE")
        if save_baseline and baseline is None:
            raise GateInputError("--save-baseline needs --baseline MODEL (the numbers come from that model)")
        if not 1 <= topk <= 64:
            raise GateInputError(f"--topk must be in 1..64, got {topk}")
        if seqlen < 2 or windows < 1:
            raise GateInputError("--seqlen must be >= 2 and --windows >= 1")
        if not save_baseline:
            th.validate()
        if save_baseline:
            _check_save_path(save_baseline, [compressed, baseline, text])
        stored = load_baseline(baseline_json) if baseline_json else None
        from cli.common import console
        from cli.progress import LayerProgress

        with LayerProgress(console, label="eval layer") as prog:
            metrics, base = measure(compressed, text, seqlen, windows, baseline=baseline, stored=stored,
                                    topk=topk if save_baseline else 0, progress=prog.on_layer,
                                    allow_other_baseline=allow_other_baseline, bos=bos)
        checks = check(metrics, th) if any(v is not None for v in vars(th).values()) else []
    except (GateInputError, ModelInputError) as e:
        fail(str(e))
    except ValueError as e:  # e.g. unsupported architecture from the loader, a binary --text file
        fail(str(e))
    except OSError as e:
        fail(f"cannot read an input: {e}")
    if save_baseline:
        write_baseline(save_baseline, base)
    report = gate_report(metrics, checks)
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        Console().print(_table(compressed, metrics, checks, report["passed"]))
    if save_baseline:
        Console(stderr=True).print(f"baseline written to {save_baseline}", highlight=False)
    if not report["passed"]:
        raise typer.Exit(1)


def _check_save_path(path: str, inputs: list) -> None:
    """--save-baseline: a new or replaceable file in an existing writable folder, not one of the inputs."""
    import os
    from pathlib import Path

    from ptq.gate import GateInputError

    p = Path(path)
    if p.is_dir() or p.is_symlink():
        raise GateInputError(f"--save-baseline {path} is a folder or a link; give a file path")
    parent = p.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise GateInputError(f"--save-baseline: cannot write in {parent} (missing, not a folder or read-only)")
    for i in inputs:
        if i and (Path(i).resolve() == p.resolve() or p.resolve().is_relative_to(Path(i).resolve())):
            raise GateInputError(f"--save-baseline {path} would overwrite or write inside an input ({i})")


def _table(name: str, metrics: dict, checks, passed: bool) -> Table:
    t = Table(title=f"ptq gate: {name}: {'PASS' if passed else 'FAIL'}")
    for col, just in (("metric", "left"), ("value", "right"), ("limit", "right"), ("status", "left")):
        t.add_column(col, justify=just)
    for c in checks:
        t.add_row(c.metric, f"{c.value:.4f}", f"{c.op} {c.limit:g}", "ok" if c.passed else "FAIL")
    for k in ("ppl", "ppl_ref", "tokens", "kl_kind", "bos", "bos_source"):
        if metrics.get(k) is not None:
            v = metrics[k]
            t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v), "", "")
    return t


def register(app: typer.Typer) -> None:
    app.command("gate")(gate)
