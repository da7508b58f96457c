"""``ptq inspect <dir>``: print the manifest of a compressed model (recipe, seed, calibration hash, per-layer
errors, files with sha256). ``--verify`` re-hashes every file (exit 1 if anything differs), ``--json`` prints
the raw manifest."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def inspect(
    folder: Path = typer.Argument(..., help="output folder of ptq compress"),
    verify: bool = typer.Option(False, "--verify", help="re-hash the files; exit 1 on any mismatch"),
    json_out: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
):
    """Show how FOLDER was produced and (with --verify) check that its files are intact."""
    from cli.common import fail
    from ptq.manifest import extras, read_manifest
    from ptq.manifest import verify as verify_files

    try:
        m = read_manifest(folder)
    except ValueError as e:
        fail(str(e))
    try:
        problems = verify_files(folder, m) if verify else []
        tables = [] if json_out else [_summary(folder, m), _layers(m), _files(m)]
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        fail(f"{folder}/manifest.json is malformed ({type(e).__name__}: {e}); rewrite it with ptq compress")
    except OSError as e:
        fail(f"cannot read {folder}: {e}")
    con = Console()
    if json_out:
        print(json.dumps(m, indent=2, sort_keys=True))
    else:
        for t in tables:
            con.print(t)
    if verify:
        err = Console(stderr=True)
        for p in problems:
            err.print(f"[red]mismatch:[/red] {p}", highlight=False, soft_wrap=True)
        for p in extras(folder, m):
            err.print(f"note: {p} is not in the manifest (added after compress?)", highlight=False, soft_wrap=True)
        err.print(f"verify: {len(m.get('files', {}))} files, {len(problems)} problem(s)", highlight=False)
        if problems:
            raise typer.Exit(1)


def _summary(folder, m: dict) -> Table:
    t = Table(title=f"ptq inspect: {folder}", show_header=False)
    t.add_column("key")
    t.add_column("value")
    r = m.get("recipe", {})
    cal = m.get("calibration") or {}
    rows = [("ptq version", m.get("ptq_version")),
            ("versions", ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())),
            ("model", f"{m['model'].get('name')} (fingerprint {m['model'].get('fingerprint', '')[:16]})"),
            ("recipe", f"{r.get('name')}: " + " -> ".join(p["name"] for p in r.get("passes", []))),
            ("spec", ", ".join(f"{k}={v}" for k, v in m.get("spec", {}).items())),
            ("format / dtype", f"{m.get('format')} / {m.get('dtype')}"),
            ("seed", str(m.get("seed"))),
            ("calibration", f"{cal.get('source')}: {cal.get('nsamples')} x {cal.get('seqlen')} tokens, "
                            f"sha256 {cal.get('tokens_sha256', '')[:16]}" if cal else "none (data-free)")]
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def _layers(m: dict) -> Table:
    """Per-layer error stats: one row per layer, columns = stat kinds (suffix after the last dot), each
    summarized as the mean over the layer's linears, plus the worst linear by weight MSE."""
    layers = m.get("layers", [])
    kinds = sorted({k.rsplit(".", 1)[-1] for L in layers for k in L if k != "layer"})
    t = Table(title="per-layer errors (mean over linears)")
    t.add_column("layer", justify="right")
    for k in kinds:
        t.add_column(k, justify="right")
    t.add_column("worst (wmse)")
    for L in layers:
        vals = {k: [v for n, v in L.items() if n != "layer" and n.rsplit(".", 1)[-1] == k
                    and isinstance(v, (int, float))] for k in kinds}
        wm = {n.rsplit(".", 1)[0]: v for n, v in L.items() if n.endswith(".wmse")}
        worst = max(wm, key=wm.get) if wm else ""
        t.add_row(str(L.get("layer")), *[f"{sum(v) / len(v):.3e}" if v else "-" for v in vals.values()], worst)
    return t


def _files(m: dict) -> Table:
    t = Table(title="files")
    t.add_column("file")
    t.add_column("bytes", justify="right")
    t.add_column("sha256")
    for name, f in m.get("files", {}).items():
        t.add_row(name, str(f["bytes"]), f["sha256"])
    return t


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
