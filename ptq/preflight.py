"""Checks `compress` runs before (and, for weights, while) streaming a model: store options against the
format's loaders, calibration coverage, pass-family support, NaN/Inf weights, free disk space; and the helpers
that create / remove the output's parent folder. Each raises `UsageError` with what to do next.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ptq.model_io import StreamingModel, WeightSource
from ptq.recipes import Recipe
from ptq.validate import UsageError

if TYPE_CHECKING:
    from ptq.settings import CompressOptions

def check_store_options(opts: CompressOptions, writer_cls, fmt: str) -> None:
    """``--store-dtype`` and ``--embed-bits`` against what the format's loaders read."""
    from ptq.export.base import STORE_DTYPES

    if opts.store_dtype not in ("auto", *STORE_DTYPES):
        raise UsageError(f"--store-dtype must be auto or one of {', '.join(STORE_DTYPES)}, got {opts.store_dtype!r}")
    if opts.embed_bits is not None:
        ok = getattr(writer_cls, "EMBED_BITS", ())
        if opts.embed_bits not in ok:
            where = f"format {fmt} takes --embed-bits {'/'.join(map(str, ok))}" if ok else \
                f"no loader of format {fmt} reads quantized embeddings"
            raise UsageError(f"--embed-bits {opts.embed_bits}: {where}; use --format onnx (onnxruntime "
                             "GatherBlockQuantized, 4 or 8 bits), see docs/formats.md")


MIN_DAMP_FEW_TOKENS = 0.1  # damping used when the calibration set has fewer unique tokens than a linear's width


def check_calibration(calib_ids: torch.Tensor, config, recipe: Recipe, sampling: dict | None = None) -> dict:
    """Warn when the calibration windows repeat text or hold fewer unique tokens than the widest linear input
    (its Hessian is then rank-deficient); in that case raise Hessian damping to ``MIN_DAMP_FEW_TOKENS`` in every
    pass that has a ``damp`` option. ``sampling``: what `calib.data.sample_windows` did (text tokens, distinct
    and overlapping windows). Returns what was found and done (recorded in report.json)."""
    from calib.data import calibration_coverage

    cov = calibration_coverage(calib_ids)
    cov.update(sampling or {})
    widths = [getattr(config, k, None) for k in ("hidden_size", "intermediate_size", "ffn_dim")]
    width = max(w for w in widths if isinstance(w, int))
    cov["widest_linear_input"] = width
    cov["warnings"] = []
    n, seqlen = calib_ids.shape
    if cov.get("overlapping_windows"):
        cov["warnings"].append(f"the calibration text has {cov['text_tokens']} tokens, fewer than --nsamples {n} x "
                               f"--seqlen {seqlen}: used its {cov['distinct_windows']} non-overlapping windows once "
                               f"each and drew the other {cov['overlapping_windows']} at random offsets, overlapping "
                               f"them (each token used ~{cov['reuse']:.1f}x); give more text (--calib) or use "
                               f"--nsamples {cov['distinct_windows']}")
    elif cov["reuse"] > 1.05:
        cov["warnings"].append(f"calibration windows overlap: {cov['tokens']} tokens drawn from "
                               f"~{cov['unique_tokens']} distinct ones (each used ~{cov['reuse']:.1f}x); give more text (--calib) or fewer "
                               "--nsamples")
    if cov["unique_tokens"] < width:
        raised = {}
        for name, o in recipe.passes:
            if hasattr(o, "damp") and o.damp < MIN_DAMP_FEW_TOKENS:
                raised[name] = (o.damp, MIN_DAMP_FEW_TOKENS)
                o.damp = MIN_DAMP_FEW_TOKENS
        cov["damp_raised"] = {k: v[1] for k, v in raised.items()}
        cov["warnings"].append(f"only ~{cov['unique_tokens']} unique calibration tokens for linears {width} wide: "
                               "their Hessians are rank-deficient"
                               + (f"; damping raised to {MIN_DAMP_FEW_TOKENS}" if raised else "")
                               + "; give more calibration text")
    for w in cov["warnings"]:
        print(f"ptq: warning: {w}", file=sys.stderr)
    return cov


def request_inputs(opts: CompressOptions, sm: StreamingModel) -> dict:
    """Every input path of the request (label -> path): the output may neither contain nor sit inside them."""
    ins = {"input model": sm.folder, "calibration data": opts.calib, "--eval-text file": opts.eval_text}
    if Path(opts.recipe).is_file():
        ins["recipe file"] = opts.recipe
    return {k: Path(v) for k, v in ins.items() if v is not None}


def check_family(recipe: Recipe, lmap) -> None:
    """Refuse, before any work, a pass the model family cannot run (ptq.layermap: ``LayerMap.unsupported``)."""
    for name, _ in recipe.passes:
        why = lmap.refusal(name)
        if why:
            raise UsageError(f"pass {name!r} does not support {lmap.arch}: {why}. Supported combinations: "
                             "docs/architectures.md")


class FiniteSource(WeightSource):
    """Wraps a `WeightSource`: every floating tensor read is checked for NaN/Inf (so a corrupt layer 17 is
    reported by name the moment it loads, not as a NaN perplexity after the export)."""

    def __init__(self, inner: WeightSource):
        self.inner = inner

    def keys(self):
        return self.inner.keys()

    def __contains__(self, name):
        return name in self.inner

    def get(self, name):
        t = self.inner.get(name)
        check_finite(name, t)
        return t

    def __getattr__(self, attr):  # anything else (folder, reader internals) comes from the wrapped source
        return getattr(self.inner, attr)


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise UsageError(f"weight {name} has {bad} NaN/Inf value(s) of {t.numel()}; the checkpoint is corrupt")


def free_bytes(folder: Path) -> int:
    """Free space where ``folder`` will be created (``PTQ_TEST_FREE_BYTES`` simulates a full disk in tests)."""
    fake = os.environ.get("PTQ_TEST_FREE_BYTES")
    if fake is not None:
        return int(fake)
    p = Path(folder).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def estimate_output_bytes(sm: StreamingModel, calib_ids, hidden: int, dtype: torch.dtype) -> int:
    """Upper estimate of the disk the run needs: the dense weights (an fp export is at most the input size),
    two resume-state files of calibration activations ``[n, L, H]`` and 16 MiB for configs/tokenizer."""
    weights = sum(f.stat().st_size for f in Path(sm.folder).glob("*.safetensors")) if sm.folder else 0
    acts = 0 if calib_ids is None else 2 * calib_ids.numel() * hidden * torch.finfo(dtype).bits // 8
    return weights + acts + (16 << 20)


def fmt_size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def make_parent(out: Path) -> Path | None:
    """Create ``out.parent`` if needed; return the topmost folder created (to remove it on failure)."""
    top = None
    p = out.parent
    while not p.exists():
        top, p = p, p.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    return top


def remove_created(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
