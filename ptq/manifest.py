"""``manifest.json``: what produced a compressed model and how to check it is intact.

Written by `ptq compress` into every output; `ptq inspect <dir>` prints it (``--verify`` re-hashes the files).
Fields: ptq and library versions, the resolved recipe (defaults, calibration, pass options), the quantization
spec, output format and dtype, the calibration seed and the sha256 of the calibration token ids actually used,
a fingerprint of the input model, per-layer error statistics (e.g. ``q_proj.wmse = mean (W_hat - W)^2``,
``gptq_loss``) and the size and sha256 of every output file.

The manifest is deterministic (same inputs and seed -> same bytes): no timestamps, no absolute paths, sorted
keys. Timings, peak memory and evaluation results live only in ``report.json``, which is therefore the one file
the manifest does not hash (it is not byte-reproducible).
"""
from __future__ import annotations

import json
from pathlib import Path

from ptq.resume import is_state_file, sha256_file

MANIFEST = "manifest.json"
REPORT = "report.json"
SCHEMA = "ptq-manifest/1"
UNHASHED = (MANIFEST, REPORT)


def ptq_version() -> str:
    try:
        from importlib.metadata import version

        return version("ptq")
    except Exception:
        return "unknown"


def library_versions() -> dict:
    import safetensors
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}


def file_table(folder: Path) -> dict[str, dict]:
    """``{relative path: {"bytes", "sha256"}}`` for every file except the manifest, report and resume state."""
    folder = Path(folder)
    out = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if not f.is_file() or rel in UNHASHED or is_state_file(f.name):
            continue
        out[rel] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    return out


def build_manifest(folder: Path, *, recipe: dict, spec: dict, format: str, dtype: str, model_name: str,
                   model_fingerprint: str, calibration: dict | None, layers: list[dict]) -> dict:
    return {
        "schema": SCHEMA,
        "ptq_version": ptq_version(),
        "versions": library_versions(),
        "model": {"name": model_name, "fingerprint": model_fingerprint},
        "recipe": recipe,
        "spec": spec,
        "format": format,
        "dtype": dtype,
        "seed": calibration["seed"] if calibration else None,
        "calibration": calibration,
        "layers": layers,
        "files": file_table(folder),
    }


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(folder: Path) -> dict:
    """The manifest of ``folder``; ValueError with a one-line reason if absent or unreadable."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise ValueError(f"{folder} is not a folder")
    if not path.is_file():
        raise ValueError(f"no {MANIFEST} in {folder}; was it written by `ptq compress`?")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(m, dict) or m.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a ptq manifest (schema {SCHEMA!r} expected)")
    return m


def verify(folder: Path, manifest: dict) -> list[str]:
    """Problems found when re-hashing the files listed in ``manifest``: missing or changed (empty = intact)."""
    problems = []
    actual = file_table(folder)
    for rel, want in manifest.get("files", {}).items():
        got = actual.get(rel)
        if got is None:
            problems.append(f"{rel}: missing")
        elif got["sha256"] != want["sha256"]:
            problems.append(f"{rel}: sha256 differs ({got['bytes']} bytes, expected {want['bytes']})")
    return problems


def extras(folder: Path, manifest: dict) -> list[str]:
    """Files present but not listed (e.g. an ``onnx/`` folder added after compress); reported, not errors."""
    return sorted(set(file_table(folder)) - set(manifest.get("files", {})))
