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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptq.export import writer_class
from ptq.layermap import get_module
from ptq.manifest import build_manifest, ptq_version, write_manifest
from ptq.model_io import ModelInputError, StreamingModel, WeightSource, dir_size, tokenizer_for
from ptq.passes import get_pass_class
from ptq.pipeline import StageClock, compress_loop
from ptq.quant.primitives import QuantSpec
from ptq.outlock import OutputLock, OutputLocked
from ptq.resume import (FINGERPRINT_KIND, Checkpointer, fingerprint, is_state_file, model_fingerprint, not_resumable,
                        partial_dir)
from ptq.recipes import Recipe, load_recipe, override_options
from ptq.validate import (UsageError, check_compress_options, check_model, check_output_location, is_disk_full,
                          model_identity)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class CompressOptions:
    model: str
    out: str | None = None  # None: `default_out_dir` (in the working directory)
    recipe: str = "gptq"
    bits: float | None = None  # a non-integer average (3.5) = mixed precision (ptq.mixed_precision)
    bit_widths: str | None = None  # mixed precision: allowed widths, e.g. "2,3,4,8" (default)
    group_size: int | None = None
    sym: bool | None = None
    clip: str | None = None  # none | mse | octav
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
    bos: bool | None = None  # BOS before each calibration / --eval-text window; None = the tokenizer's setting
    eval_seqlen: int = 512
    force: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    resume: bool = False  # continue an interrupted run from <out>.ptq-partial (ptq.resume)
    pass_options: dict = field(default_factory=dict)  # pass name -> {option: value} overrides
    store_dtype: str = "auto"  # unquantized tensors: "auto" = as in the checkpoint, or float32/float16/bfloat16
    embed_bits: int | None = None  # quantize embeddings / untied lm_head too (formats with EMBED_BITS)


def default_out_dir(opts: CompressOptions, recipe: Recipe | None = None) -> Path:
    """``<model>-<recipe>-w<bits>[a<act>][-g<group>][-<format>]`` in the working directory; group size and
    format appear only when they differ from the recipe's defaults (e.g. ``llama-7b-osplus-w4a8``)."""
    import re

    recipe = recipe or resolve_settings(opts)[0]
    base = load_recipe(opts.recipe).defaults  # before the CLI overrides
    d = recipe.defaults
    model = Path(opts.model.rstrip("/")).name or "model"
    rname = re.sub(r"[^A-Za-z0-9._-]", "", recipe.name.replace("+", "plus")) or "recipe"
    mixed = mixed_target(opts)
    name = f"{model}-{rname}-w{'fp' if opts.bits == 16 else f'{mixed[0]:g}' if mixed else d.bits}"
    if d.act_bits is not None:
        name += f"a{d.act_bits}"
    if d.group_size != base.group_size:
        name += "-pc" if d.group_size == -1 else f"-g{d.group_size}"
    if d.sym != base.sym:
        name += "-sym" if d.sym else "-asym"
    fmt = opts.format
    if fmt is not None and fmt != base.format:
        name += f"-{fmt}"
    return Path.cwd() / name


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def mixed_target(opts: CompressOptions) -> tuple[float, tuple[int, ...]] | None:
    """``(average bits, allowed widths)`` when the request asks for mixed precision (a non-integer ``--bits``,
    or ``--bit-widths``), else None; UsageError when they do not fit together."""
    from ptq.mixed_precision import MixedPrecisionError, check_target, parse_widths

    if opts.bits is None:
        if opts.bit_widths is not None:
            raise UsageError("--bit-widths needs an average --bits (e.g. --bits 3.5)")
        return None
    if float(opts.bits).is_integer() and opts.bit_widths is None:
        return None
    try:
        widths = parse_widths(opts.bit_widths)
        check_target(float(opts.bits), widths)
    except MixedPrecisionError as e:
        raise UsageError(str(e)) from e
    return float(opts.bits), widths


def check_mixed(recipe: Recipe) -> None:
    """Mixed precision needs every weight-quantizing pass to read per-linear widths (`Pass.mixed_bits`)."""
    bad = [n for n, _ in recipe.passes if get_pass_class(n).quantizes_weights and not get_pass_class(n).mixed_bits]
    if bad:
        raise UsageError(f"--bits with a fractional average (mixed precision) is not supported by pass(es) "
                         f"{', '.join(bad)}; use recipe gptq or rtn, or an integer --bits")
    if not any(get_pass_class(n).quantizes_weights for n, _ in recipe.passes):
        raise UsageError(f"recipe {recipe.name!r} quantizes no weights; mixed precision (--bits average) needs "
                         "gptq or rtn")
    if recipe.defaults.act_bits is not None:
        raise UsageError("mixed precision (--bits average) is weight-only; drop --act-bits")


def resolve_settings(opts: CompressOptions) -> tuple[Recipe, QuantSpec]:
    """Recipe with CLI overrides applied; raises UsageError on anything out of range. With mixed precision
    (`mixed_target`) the spec's bits are the largest allowed width not above the average."""
    from ptq.mixed_precision import base_width

    try:
        recipe = load_recipe(opts.recipe)
    except ValueError as e:
        raise UsageError(str(e)) from e
    d = recipe.defaults
    mixed = mixed_target(opts)
    for k in ("bits", "group_size", "sym", "clip", "act_bits", "format"):
        v = getattr(opts, k)
        if k == "bits" and v is not None:
            v = base_width(*mixed) if mixed else int(v)
        if v is not None:
            setattr(d, k, v)
    if mixed:
        check_mixed(recipe)
    c = recipe.calibration
    for k in ("nsamples", "seqlen", "seed"):
        v = getattr(opts, k)
        if v is not None:
            setattr(c, k, v)
    if opts.calib is not None:
        c.path = opts.calib
    if opts.bos is not None:
        c.bos = opts.bos
    if d.act_bits is not None and not 2 <= d.act_bits <= 16:
        raise UsageError(f"--act-bits must be in 2..16, got {d.act_bits}")
    if d.act_bits is not None and any(n == "act-quant" for n, _ in recipe.passes) and d.format != "compressed-tensors":
        raise UsageError(f"recipe {recipe.name!r} quantizes activations, which --format {d.format} cannot carry "
                         "(its loaders would run the model weight-only); use --format compressed-tensors "
                         "(transformers / vLLM run its input_activations) or --format onnx")
    try:
        if d.bits == 16:  # "16 bits" = no weight quantization, for passes with a `quantize` option (udfc)
            nq = [n for n, o in recipe.passes if not hasattr(o, "quantize")]
            if nq:
                raise UsageError(f"--bits 16 (no quantization) is not supported by pass(es) {', '.join(nq)}")
            if d.format not in ("fp",) and opts.format is not None:
                raise UsageError("--bits 16 keeps fp weights: use --format fp")
            for _, o in recipe.passes:
                o.quantize = False
            d.bits, d.format = 8, "fp"  # placeholder spec (QuantSpec needs 2..8); nothing is quantized
        spec = QuantSpec(bits=d.bits, group_size=d.group_size, sym=d.sym, mse=d.mse, clip=d.clip)
    except ValueError as e:
        raise UsageError(str(e)) from e
    for pname, popts in opts.pass_options.items():
        idx = [i for i, (n, _) in enumerate(recipe.passes) if n == pname]
        if not idx:
            raise UsageError(f"option for pass {pname!r}, which recipe {recipe.name!r} does not run")
        for k in popts:
            if not hasattr(recipe.passes[idx[0]][1], k):
                raise UsageError(f"pass {pname!r} has no option {k!r}")
        for i in idx:
            try:
                new = override_options(recipe.passes[i][1], popts, f"--set {pname}", pname)
            except ValueError as e:
                raise UsageError(str(e)) from e
            recipe.passes[i] = (pname, new)
    if opts.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA device is available; use --device cpu")
    return recipe, spec


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
        cov["warnings"].append(f"calibration windows overlap: {cov['tokens']} tokens drawn from ~{cov['unique_tokens']} "
                               f"distinct ones (each used ~{cov['reuse']:.1f}x); give more text (--calib) or fewer "
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


def build_passes(recipe: Recipe, spec: QuantSpec, defaults) -> list:
    passes = []
    for name, popts in recipe.passes:
        p = get_pass_class(name)(popts, spec)
        p.defaults = defaults
        passes.append(p)
    return passes


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


def _fmt_size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _make_parent(out: Path) -> Path | None:
    """Create ``out.parent`` if needed; return the topmost folder created (to remove it on failure)."""
    top = None
    p = out.parent
    while not p.exists():
        top, p = p, p.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    return top


def _remove_created(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


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

    created = _make_parent(out)
    lock = OutputLock(out)
    try:
        lock.acquire()
    except OutputLocked as e:
        _remove_created(created)
        raise UsageError(str(e)) from e
    except OSError as e:
        _remove_created(created)
        raise UsageError(f"cannot lock {out}: {e.strerror}; choose another --out") from e
    try:
        return _run_locked(opts, out, created, t0, recipe, spec, sm, calib_ids, passes, info, fp, writer_cls,
                           progress, clock, calib_check, on_layer, plan)
    except UsageError:
        if not partial_dir(out).exists():  # refused before anything was written (a kept partial stays)
            _remove_created(created)
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
        raise UsageError(f"not enough disk space for {out}: {_fmt_size(have)} free, about {_fmt_size(need)} "
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
        _remove_created(created)
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
        _remove_created(created)


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


def evaluate_pair(model: str, baseline: str | None, text: str, seqlen: int = 512, max_windows: int = 40,
                  dtype: str = "float32", progress=None, bos: bool | None = None) -> dict:
    """Perplexity of ``model`` (and of ``baseline`` plus KL / top-1 against it), streamed layer by layer;
    ``progress(i, n)`` after each layer of each model. ``bos``: BOS before each window (None: the BOS choice
    ``model`` was calibrated with if its run overrode the tokenizer, else the tokenizer's own setting,
    `calib.data.eval_bos`); the result says which (``bos``, ``bos_source``)."""
    from calib.data import eval_bos, read_text, resolve_bos, tokenize
    from ptq.eval.metrics import eval_windows, stream_metrics

    from ptq.validate import check_gate_inputs

    if max_windows is not None and max_windows < 1:
        raise UsageError(f"--windows must be >= 1, got {max_windows}")
    if seqlen < 2:
        raise UsageError(f"--seqlen must be >= 2, got {seqlen}")
    if not Path(text).is_file():
        raise UsageError(f"text file {text} does not exist")
    sm = StreamingModel.open(model, dtype=DTYPES[dtype])
    from ptq.passes.act_quant import install_streaming

    install_streaming(sm)  # activation quantizers recorded in config.json (OS+ / SmoothQuant / W8A8 recipes)
    ref = StreamingModel.open(baseline, dtype=DTYPES[dtype]) if baseline else None
    raw = read_text(text)
    tok = tokenizer_for(sm.folder)
    bos, note = eval_bos(sm.folder, tok, bos)
    bos_id = resolve_bos(tok, bos)
    windows = eval_windows(tokenize(raw, tok), seqlen, max_windows, bos_id)
    ref_w = eval_windows(tokenize(raw, tokenizer_for(ref.folder)), seqlen, max_windows, bos_id) if ref else None
    check_gate_inputs(sm, ref, None, windows, ref_w, allow_other=True)  # same architecture and tokenizer
    return {**stream_metrics(sm, windows, ref, progress=progress).to_dict(), "bos": note["bos"],
            "bos_source": note["source"]}
