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
                   model_fingerprint: str, calibration: dict | None, layers: list[dict],
                   model_identity: dict | None = None, mixed_precision: dict | None = None) -> dict:
    """``model_identity``: architecture/shape fields and ``fingerprint_kind`` of the source model, which
    `ptq gate` checks its baseline against (ptq.identity.check_gate_inputs). ``mixed_precision``: the bits
    chosen per linear (ptq.mixed_precision.MixedPlan.manifest), only for mixed-precision runs."""
    m = {
        "schema": SCHEMA,
        "ptq_version": ptq_version(),
        "versions": library_versions(),
        "model": {"name": model_name, "fingerprint": model_fingerprint, **(model_identity or {})},
        "recipe": recipe,
        "spec": spec,
        "format": format,
        "dtype": dtype,
        "seed": calibration["seed"] if calibration else None,
        "calibration": calibration,
        "layers": layers,
        "files": file_table(folder),
    }
    if mixed_precision is not None:
        m["mixed_precision"] = mixed_precision
    return m


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
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ValueError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a ptq manifest")
    try:
        m = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        where = f" ({e.msg} at line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"{path} is not valid JSON{where}") from e
    if not isinstance(m, dict) or m.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a ptq manifest (schema {SCHEMA!r} expected)")
    problem = _shape_problem(m)
    if problem:
        raise ValueError(f"{path} is malformed: {problem}; rewrite it with ptq compress")
    return m


MAX_MANIFEST_BYTES = 64 << 20


def _shape_problem(m: dict) -> str | None:
    """What is structurally wrong with a manifest (None = fine): the fields inspect and gate read."""
    if not isinstance(m.get("model"), dict):
        return "'model' is not a mapping"
    files = m.get("files")
    if not isinstance(files, dict):
        return "'files' is not a mapping"
    for rel, f in files.items():
        if not (isinstance(f, dict) and isinstance(f.get("sha256"), str) and isinstance(f.get("bytes"), int)):
            return f"file entry {rel!r} lacks bytes/sha256"
        if rel.startswith("/") or ".." in Path(rel).parts:
            return f"file entry {rel!r} points outside the folder"
    for key, typ in (("layers", list), ("recipe", dict), ("spec", dict), ("versions", dict)):
        if key in m and not isinstance(m[key], typ):
            return f"{key!r} is not a {typ.__name__}"
    if not all(isinstance(L, dict) for L in m.get("layers", [])):
        return "'layers' entries are not mappings"
    if m.get("calibration") is not None and not isinstance(m["calibration"], dict):
        return "'calibration' is not a mapping"
    return None


def verify(folder: Path, manifest: dict) -> list[str]:
    """Problems found when re-hashing the files listed in ``manifest``: missing or changed (empty = intact)."""
    problems = []
    actual = file_table(folder)
    if not manifest.get("files"):
        problems.append("the manifest lists no files (its file table was emptied?)")
    for rel in extras(folder, manifest):
        if _is_model_file(rel):
            problems.append(f"{rel}: model file not listed in the manifest")
    for rel, want in manifest.get("files", {}).items():
        got = actual.get(rel)
        if got is None:
            problems.append(f"{rel}: missing")
        elif got["sha256"] != want["sha256"]:
            problems.append(f"{rel}: sha256 differs ({got['bytes']} bytes, expected {want['bytes']})")
    return problems


def _is_model_file(rel: str) -> bool:
    """Top-level weights, configs and tokenizer files: part of the artifact, so never an unlisted extra."""
    return "/" not in rel and (rel.endswith((".safetensors", ".json", ".model", ".bin", ".pt"))
                               or rel in ("merges.txt", "vocab.txt", "chat_template.jinja"))


def extras(folder: Path, manifest: dict) -> list[str]:
    """Files present but not listed (e.g. an ``onnx/`` folder added after compress); reported, not errors."""
    return sorted(set(file_table(folder)) - set(manifest.get("files", {})))
