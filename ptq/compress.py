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
import sys
import time
from pathlib import Path

from ptq.eval.pair import evaluate_pair
from ptq.export import writer_class
from ptq.identity import model_identity
from ptq.layermap import get_module
from ptq.manifest import build_manifest, ptq_version, write_manifest
from ptq.model_io import ModelInputError, StreamingModel, dir_size, tokenizer_for
from ptq.outlock import OutputLock, OutputLocked
from ptq.passes import get_pass_class
from ptq.pipeline import StageClock, compress_loop
from ptq.preflight import (FiniteSource, check_calibration, check_family, check_finite, check_store_options,
                           estimate_output_bytes, fmt_size, free_bytes, make_parent, remove_created, request_inputs)
from ptq.quant.primitives import QuantSpec
from ptq.recipes import Recipe
from ptq.resume import (FINGERPRINT_KIND, Checkpointer, fingerprint, is_state_file, model_fingerprint, not_resumable,
                        partial_dir)
from ptq.settings import DTYPES, CompressOptions, default_out_dir, mixed_target, resolve_settings
from ptq.validate import UsageError, check_compress_options, check_model, check_output_location, is_disk_full

__all__ = ["CompressOptions", "UsageError", "compress", "default_out_dir", "evaluate_pair", "resolve_settings"]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def build_passes(recipe: Recipe, spec: QuantSpec, defaults) -> list:
    passes = []
    for name, popts in recipe.passes:
        p = get_pass_class(name)(popts, spec)
        p.defaults = defaults
        passes.append(p)
    return passes


def compress(opts: CompressOptions, progress=None, on_layer=None) -> dict:
    """Run the converter; returns the report (also written to ``<out>/report.json``).

    All input checks run before any file is written. The output is built in ``<out>.ptq-partial`` with a
    resume state after each layer (ptq.resume) and renamed to ``<out>`` at the very end. Bad input
    (`UsageError`, including NaN/Inf weights found mid-run) removes the partial folder; an interruption or
    crash keeps it so ``--resume`` continues from the last finished layer. ``progress(i, n, pass_name)`` is
    called before each pass of layer i, ``on_layer(i, n)`` after layer i is written.
    """
    t0 = time.time()
    clock = StageClock()
    recipe, spec = resolve_settings(opts)
    if not opts.out:
        opts.out = str(default_out_dir(opts, recipe))
    check_compress_options(opts, recipe)
    try:
        with clock("load"):
            sm = StreamingModel.open(opts.model, dtype=DTYPES[opts.dtype], device=opts.device,
                                     allow_pickle=opts.allow_pickle, trust_remote_code=opts.trust_remote_code)
    except (ModelInputError, ValueError) as e:
        raise UsageError(str(e)) from e
    out = check_output_location(opts.out, request_inputs(opts, sm), opts.force)
    check_family(recipe, sm.lmap)
    from ptq import moe

    try:
        moe.check_passes(sm.lmap, [n for n, _ in recipe.passes])
    except ValueError as e:
        raise UsageError(str(e)) from e
    check_model(sm, recipe, spec, opts)
    for path in sm.lmap.embed:  # already materialized by open(); later reads go through FiniteSource
        for name, p in get_module(sm.model, path).named_parameters():
            check_finite(f"{path}.{name}", p.data)
    sm.source = FiniteSource(sm.source)
    calib_ids, calib_check = None, None
    mixed = mixed_target(opts)
    if recipe.needs_calibration or mixed:  # mixed precision scores every linear on the calibration set
        from calib.data import CalibrationError, load_calibration

        try:
            tok = tokenizer_for(sm.folder, opts.trust_remote_code)
            c = recipe.calibration
            with clock("load"):
                sampling: dict = {}
                calib_ids = load_calibration(c.path, tok, c.nsamples, c.seqlen, c.seed, c.bos, sampling)
        except (CalibrationError, ModelInputError) as e:
            raise UsageError(str(e)) from e
        calib_check = check_calibration(calib_ids, sm.config, recipe, sampling)
    if opts.eval_text:  # checked now, not after an hour of compression
        from calib.data import read_text, resolve_bos, tokenize
        from ptq.eval.metrics import eval_windows

        if not Path(opts.eval_text).exists():
            raise UsageError(f"--eval-text file {opts.eval_text} does not exist")
        try:
            tok = tokenizer_for(sm.folder, opts.trust_remote_code)
            eval_windows(tokenize(read_text(opts.eval_text), tok), opts.eval_seqlen, 1,
                         resolve_bos(tok, recipe.calibration.bos))
        except ModelInputError as e:
            raise UsageError(str(e)) from e
        except ValueError as e:  # CalibrationError is a ValueError
            raise UsageError(f"--eval-text: {e}") from e
    try:
        writer_cls = writer_class(recipe.defaults.format)
    except ValueError as e:
        raise UsageError(str(e)) from e
    check_store_options(opts, writer_cls, recipe.defaults.format)
    passes = build_passes(recipe, spec, recipe.defaults)
    plan = None
    if mixed:
        plan = mixed_plan(sm, calib_ids, spec, mixed, recipe.defaults.format, progress, clock)
    info = run_info(opts, recipe, spec, sm, calib_ids)
    info["mixed_precision"] = plan.manifest() if plan else None
    fp = fingerprint({k: info[k] for k in ("model_fingerprint", "recipe", "spec", "format", "dtype", "calibration",
                                           "mixed_precision")}
                     | {"device": opts.device, "ptq": ptq_version(), "store_dtype": opts.store_dtype,
                        "embed_bits": opts.embed_bits})

    created = make_parent(out)
    lock = OutputLock(out)
    try:
        lock.acquire()
    except OutputLocked as e:
        remove_created(created)
        raise UsageError(str(e)) from e
    except OSError as e:
        remove_created(created)
        raise UsageError(f"cannot lock {out}: {e.strerror}; choose another --out") from e
    try:
        return _run_locked(opts, out, created, t0, recipe, spec, sm, calib_ids, passes, info, fp, writer_cls,
                           progress, clock, calib_check, on_layer, plan)
    except UsageError:
        if not partial_dir(out).exists():  # refused before anything was written (a kept partial stays)
            remove_created(created)
        raise
    finally:
        lock.release()


def mixed_plan(sm, calib_ids, spec, mixed, fmt, progress, clock):
    """Score every linear and allocate widths (ptq.mixed_precision); says what it chose on stderr."""
    from ptq.mixed_precision import plan_mixed

    with clock("mixed precision scoring"):
        plan = plan_mixed(sm, calib_ids, spec, mixed[0], mixed[1],
                          progress=(lambda i, n: progress(i, n, "mixed-precision score")) if progress else None)
    m = plan.manifest()
    hist = ", ".join(f"{k}-bit: {v}" for k, v in sorted(m["modules_per_width"].items(), key=lambda kv: int(kv[0])))
    print(f"ptq: mixed precision: average {m['average_bits']:.4f} bits (target {mixed[0]:g}) over "
          f"{len(plan.bits)} linears ({hist})", file=sys.stderr)
    if fmt == "gptq":
        print("ptq: note: per-module bits are written as GPTQModel `dynamic` overrides, which GPTQModel and vLLM "
              "read; transformers' own GPTQ loader (optimum) ignores them: for transformers use --format "
              "compressed-tensors", file=sys.stderr)
    return plan


def _run_locked(opts, out, created, t0, recipe, spec, sm, calib_ids, passes, info, fp, writer_cls,
                progress, clock, calib_check, on_layer=None, plan=None) -> dict:
    """The part of `compress` that runs while holding the output lock (ptq.outlock)."""
    if out.exists() and not opts.force:  # another run finished it while we were validating
        raise UsageError(f"output folder {out} already exists; pass --force to replace it")
    tmp = partial_dir(out)
    ckpt = Checkpointer(tmp, fp)
    resume_state = None
    if tmp.exists():
        stuck = not_resumable(passes)
        if opts.resume and ckpt.has_state() and stuck and not opts.force:
            raise UsageError(f"pass(es) {', '.join(stuck)} keep state across layers and cannot resume; "
                             f"pass --force to start over (the unfinished run in {tmp} is kept)")
        if opts.resume and ckpt.has_state() and not stuck:
            try:
                resume_state = ckpt.load()
            except ValueError as e:
                if not opts.force:
                    raise UsageError(str(e)) from e
        elif not (opts.resume or opts.force):
            raise UsageError(f"found an unfinished run in {tmp}; pass --resume to continue it or --force to start over")
    need = estimate_output_bytes(sm, calib_ids, sm.config.hidden_size, DTYPES[opts.dtype])
    have = free_bytes(out.parent)
    if have < need:
        raise UsageError(f"not enough disk space for {out}: {fmt_size(have)} free, about {fmt_size(need)} "
                         "needed; free some space or choose another --out")

    if resume_state is None and tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(exist_ok=True)
    try:
        writer = writer_cls(tmp, sm, spec, meta={
            "recipe": recipe.name, "store_dtype": opts.store_dtype, "embed_bits": opts.embed_bits,
            "passes": {n: dataclasses.asdict(o) for n, o in recipe.passes}})
        stats: list[dict] = []
        start, restore = 0, None
        if resume_state is not None:
            st, tensors = resume_state
            stats, start = list(st.stats), st.layer + 1

            def restore(batches):
                return ckpt.restore(st, tensors, writer, passes, batches)

        n_layers = len(sm.layers)

        def on_layer_done(i, batches):
            ckpt.save(i, n_layers, batches, writer, stats, passes)
            if on_layer is not None:
                on_layer(i, n_layers)

        loop = compress_loop(sm, passes, calib_ids, spec, writer, progress=progress, start_layer=start,
                             on_layer_done=on_layer_done, layer_stats=stats, restore_batches=restore, clock=clock,
                             module_bits=plan.bits if plan else None)
        with clock("write"):
            writer.write_nonlayer()
            writer.finalize(loop.artifacts)
            write_manifest(tmp, build_manifest(tmp, layers=loop.layer_stats, **{k: info[k] for k in (
                "recipe", "spec", "format", "dtype", "model_name", "model_fingerprint", "calibration")},
                model_identity=info["model_identity"], mixed_precision=info["mixed_precision"]))
        t_compress = time.time() - t0
        report = {
            "recipe": recipe.name, "spec": dataclasses.asdict(spec),
            "defaults": dataclasses.asdict(recipe.defaults), "format": recipe.defaults.format,
            "passes": [{"name": n, **dataclasses.asdict(o)} for n, o in recipe.passes],
            "calibration": dataclasses.asdict(recipe.calibration) if calib_ids is not None else None,
            "calibration_check": calib_check,
            "mixed_precision": plan.report() if plan else None,
            "resumed_from_layer": start if resume_state is not None else None,
            "compress_seconds": round(t_compress, 2),
            "size_before_bytes": dir_size(sm.folder) if sm.folder else None,
            "size_after_bytes": sum(f.stat().st_size for f in tmp.rglob("*")
                                    if f.is_file() and not is_state_file(f.name)),
            "layers": loop.layer_stats,
        }
        if opts.eval_text:
            with clock("eval"):
                report["eval"] = evaluate_pair(str(tmp), opts.model, opts.eval_text, opts.eval_seqlen,
                                               opts.eval_windows, opts.dtype,
                                               bos=recipe.calibration.bos)
        report["stages"] = clock.to_dict()
        report["cpu_seconds"] = round(cpu_seconds(), 2)
        report["peak_rss_bytes"] = peak_rss_bytes()
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        ckpt.clear()
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except (UsageError, ModelInputError) as e:  # bad input found mid-run (NaN weights, unreadable tensor)
        shutil.rmtree(tmp, ignore_errors=True)
        remove_created(created)
        raise e if isinstance(e, UsageError) else UsageError(str(e)) from e
    except BaseException as e:
        if is_disk_full(e):  # an OSError, or a safetensors error wrapping ENOSPC
            _keep_or_remove(tmp, ckpt, created, quiet=True)
            raise UsageError(f"disk full while writing {tmp}; finished layers are kept there: free some space "
                             "and rerun with --resume") from e
        _keep_or_remove(tmp, ckpt, created)
        raise
    return report


def _keep_or_remove(tmp: Path, ckpt: Checkpointer, created: Path | None, quiet: bool = False) -> None:
    """Interrupted or crashed: keep finished layers for --resume, else leave nothing behind."""
    if ckpt.has_state():
        if not quiet:
            print(f"ptq: interrupted; finished layers are kept in {tmp}. Rerun the same command with --resume "
                  "to continue (or --force to start over).", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_created(created)


def run_info(opts: CompressOptions, recipe: Recipe, spec: QuantSpec, sm: StreamingModel, calib_ids) -> dict:
    """Deterministic description of the run (manifest content and resume fingerprint)."""
    from calib.data import bos_note, calibration_hash

    c = recipe.calibration
    cal = None
    if calib_ids is not None:
        bos = bos_note(tokenizer_for(sm.folder), c.bos)
        cal = {"source": Path(c.path).name if c.path else "embedded", "nsamples": c.nsamples,
               "seqlen": c.seqlen, "seed": c.seed, "tokens_sha256": calibration_hash(calib_ids),
               "bos": bos["bos"], "bos_source": bos["source"]}
    return {
        "recipe": {"name": recipe.name, "description": recipe.description,
                   "defaults": dataclasses.asdict(recipe.defaults),
                   "passes": [{"name": n, "options": dataclasses.asdict(o)} for n, o in recipe.passes]},
        "spec": dataclasses.asdict(spec), "format": recipe.defaults.format, "dtype": opts.dtype,
        "model_name": Path(sm.folder).name if sm.folder else None,
        "model_fingerprint": model_fingerprint(sm.folder), "calibration": cal,
        "model_identity": {"fingerprint_kind": FINGERPRINT_KIND, **model_identity(sm.config)},
    }


