"""What a `ptq compress` request asks for: `CompressOptions` (the CLI's flags), the recipe with those flags
applied (`resolve_settings`: every range checked before any work), mixed-precision targets and the default
output folder name. Pure: reads recipes, touches no model and no file of the user's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptq.passes import get_pass_class
from ptq.quant.primitives import QuantSpec
from ptq.recipes import Recipe, load_recipe, override_options
from ptq.validate import UsageError

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
