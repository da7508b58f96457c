"""`compress()`: the converter end to end. Validate everything cheap first (recipe, ranges, paths, model
config, calibration text), then stream the model layer by layer through the recipe's passes into a temp folder
next to the output, evaluate the written artifact against the original, write report.json, and rename the temp
folder to the output only when all of it succeeded (nothing half-written on failure).
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptq.export import writer_class
from ptq.model_io import ModelInputError, StreamingModel, dir_size, tokenizer_for
from ptq.passes import get_pass_class
from ptq.pipeline import compress_loop
from ptq.quant.primitives import QuantSpec
from ptq.recipes import Recipe, load_recipe

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class UsageError(ValueError):
    """Bad user input; the CLI prints it on one line and exits 2."""


@dataclass
class CompressOptions:
    model: str
    out: str
    recipe: str = "gptq"
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    act_bits: int | None = None
    format: str | None = None
    calib: str | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    eval_text: str | None = None
    eval_windows: int = 40
    eval_seqlen: int = 512
    force: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    pass_options: dict = field(default_factory=dict)  # pass name -> {option: value} overrides


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resolve_settings(opts: CompressOptions) -> tuple[Recipe, QuantSpec]:
    """Recipe with CLI overrides applied; raises UsageError on anything out of range."""
    try:
        recipe = load_recipe(opts.recipe)
    except ValueError as e:
        raise UsageError(str(e)) from e
    d = recipe.defaults
    for k in ("bits", "group_size", "sym", "act_bits", "format"):
        v = getattr(opts, k)
        if v is not None:
            setattr(d, k, v)
    c = recipe.calibration
    for k in ("nsamples", "seqlen", "seed"):
        v = getattr(opts, k)
        if v is not None:
            setattr(c, k, v)
    if opts.calib is not None:
        c.path = opts.calib
    if d.act_bits is not None and not 2 <= d.act_bits <= 16:
        raise UsageError(f"--act-bits must be in 2..16, got {d.act_bits}")
    try:
        spec = QuantSpec(bits=d.bits, group_size=d.group_size, sym=d.sym, mse=d.mse)
    except ValueError as e:
        raise UsageError(str(e)) from e
    for pname, popts in opts.pass_options.items():
        match = [o for n, o in recipe.passes if n == pname]
        if not match:
            raise UsageError(f"option for pass {pname!r}, which recipe {recipe.name!r} does not run")
        for k, v in popts.items():
            if not hasattr(match[0], k):
                raise UsageError(f"pass {pname!r} has no option {k!r}")
            setattr(match[0], k, v)
    if opts.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA device is available; use --device cpu")
    return recipe, spec


def check_output(out: Path, model_dir: Path | None, force: bool) -> None:
    out = out.resolve()
    if model_dir is not None:
        md = model_dir.resolve()
        if out == md or out.is_relative_to(md):
            raise UsageError(f"output {out} is inside the input model folder {md}; choose another --out")
    if out.exists() and not force:
        raise UsageError(f"output folder {out} already exists; pass --force to replace it")


def build_passes(recipe: Recipe, spec: QuantSpec, defaults) -> list:
    passes = []
    for name, popts in recipe.passes:
        p = get_pass_class(name)(popts, spec)
        p.defaults = defaults
        passes.append(p)
    return passes


def compress(opts: CompressOptions, progress=None) -> dict:
    """Run the converter; returns the report (also written to ``<out>/report.json``)."""
    t0 = time.time()
    recipe, spec = resolve_settings(opts)
    out = Path(opts.out)
    try:
        sm = StreamingModel.open(opts.model, dtype=DTYPES[opts.dtype], device=opts.device,
                                 allow_pickle=opts.allow_pickle, trust_remote_code=opts.trust_remote_code)
    except (ModelInputError, ValueError) as e:
        raise UsageError(str(e)) from e
    check_output(out, sm.folder, opts.force)
    calib_ids = None
    if recipe.needs_calibration:
        from calib.data import CalibrationError, load_calibration

        try:
            tok = tokenizer_for(sm.folder)
            c = recipe.calibration
            calib_ids = load_calibration(c.path, tok, c.nsamples, c.seqlen, c.seed)
        except CalibrationError as e:
            raise UsageError(str(e)) from e
    writer_cls = writer_class(recipe.defaults.format)
    passes = build_passes(recipe, spec, recipe.defaults)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.ptq-tmp-", dir=out.parent))
    try:
        writer = writer_cls(tmp, sm, spec, meta={"recipe": recipe.name})
        loop = compress_loop(sm, passes, calib_ids, spec, writer, progress=progress)
        writer.write_nonlayer()
        writer.finalize(loop.artifacts)
        t_compress = time.time() - t0
        report = {
            "recipe": recipe.name, "spec": dataclasses.asdict(spec),
            "defaults": dataclasses.asdict(recipe.defaults), "format": recipe.defaults.format,
            "passes": [{"name": n, **dataclasses.asdict(o)} for n, o in recipe.passes],
            "calibration": dataclasses.asdict(recipe.calibration) if calib_ids is not None else None,
            "compress_seconds": round(t_compress, 2),
            "size_before_bytes": dir_size(sm.folder) if sm.folder else None,
            "size_after_bytes": dir_size(tmp),
            "layers": loop.layer_stats,
        }
        if opts.eval_text:
            report["eval"] = evaluate_pair(str(tmp), opts.model, opts.eval_text, opts.eval_seqlen,
                                           opts.eval_windows, opts.dtype)
        report["peak_rss_bytes"] = peak_rss_bytes()
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def evaluate_pair(model: str, baseline: str | None, text: str, seqlen: int = 512, max_windows: int = 40,
                  dtype: str = "float32") -> dict:
    """Perplexity of ``model`` (and of ``baseline`` plus KL / top-1 against it), streamed layer by layer."""
    from calib.data import read_text, tokenize
    from ptq.eval.metrics import eval_windows, stream_metrics

    sm = StreamingModel.open(model, dtype=DTYPES[dtype])
    ref = StreamingModel.open(baseline, dtype=DTYPES[dtype]) if baseline else None
    tok = tokenizer_for(sm.folder)
    windows = eval_windows(tokenize(read_text(text), tok), seqlen, max_windows)
    return stream_metrics(sm, windows, ref).to_dict()
