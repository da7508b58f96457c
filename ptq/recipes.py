"""Strict YAML recipes: which passes run, in which order, with which options and quantization defaults.

    name: gptq
    description: GPTQ W4 g128 asym, act-order, true-sequential
    defaults: {bits: 4, group_size: 128, sym: false}
    calibration: {nsamples: 128, seqlen: 512}     # optional; `path` must stay inside the working directory
    passes:
      - gptq: {act_order: true, damp: 0.01}

Unknown keys anywhere (top level, defaults, calibration, pass options) are errors, found before any work.
Built-in recipes live in ``recipes/*.yaml`` (repo root; also shipped inside the package as ptq/_recipes).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ptq.passes import PASSES, get_pass_class
from ptq.validate import MAX_RECIPE_BYTES, UsageError, check_ranges, check_types, load_yaml, read_bounded


class RecipeError(ValueError):
    pass


@dataclass
class Defaults:
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    mse: bool = False
    clip: str = "none"  # none | mse | octav (ptq.quant.clipping)
    act_bits: int | None = None  # None = weight-only
    act_granularity: str = "token"  # token | tensor
    format: str = "gptq"  # export format


@dataclass
class Calibration:
    path: str | None = None
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    bos: bool | None = None  # prepend BOS to each window; None = the tokenizer's own setting (calib.data)


@dataclass
class Recipe:
    name: str
    description: str = ""
    defaults: Defaults = field(default_factory=Defaults)
    calibration: Calibration = field(default_factory=Calibration)
    passes: list[tuple[str, object]] = field(default_factory=list)  # (pass name, Options instance)

    @property
    def needs_calibration(self) -> bool:
        return any(get_pass_class(n).needs_calibration for n, _ in self.passes)


def _strict(cls, data, where: str, section: str = ""):
    """``cls(**data)`` after checking keys, value types (`ptq.validate.check_types`) and ranges."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    try:
        check_types(cls, data, where)
        check_ranges(section, data, where)
    except UsageError as e:
        raise RecipeError(str(e)) from None
    try:
        return cls(**data)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: {e}") from e


def override_options(opts, overrides: dict, where: str, section: str):
    """A copy of the dataclass ``opts`` with ``overrides`` (``--set`` / CLI flags) applied through the same
    key, type and range checks as a recipe file."""
    return _strict(type(opts), {**dataclasses.asdict(opts), **overrides}, where, section)


def builtin_dir() -> Path:
    here = Path(__file__).resolve().parent
    for d in (here / "_recipes", here.parent / "recipes"):
        if d.is_dir():
            return d
    return here.parent / "recipes"


def list_builtin() -> dict[str, Path]:
    return {p.stem: p for p in sorted(builtin_dir().glob("*.yaml"))}


def parse_recipe(data: dict, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a YAML mapping")
    allowed = {"name", "description", "defaults", "calibration", "passes"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    if not data.get("passes"):
        raise RecipeError(f"{where}: the recipe has no passes; it would write unquantized weights under a "
                          "quantization config. List at least one pass, e.g. `passes: [rtn]`")
    if not isinstance(data["passes"], list):
        raise RecipeError(f"{where}: passes must be a list of `- name: {{options}}`")
    passes = []
    for i, item in enumerate(data["passes"]):
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(f"{where}: passes[{i}] must be `- name: {{options}}`")
        (pname, opts), = item.items()
        if pname not in PASSES:
            raise RecipeError(f"{where}: unknown pass {pname!r}; known: {', '.join(PASSES)}")
        cls = get_pass_class(pname)
        passes.append((pname, _strict(cls.Options, opts or {}, f"{where}: pass {pname}", pname)))
    cal = _strict(Calibration, data.get("calibration"), f"{where}: calibration", "calibration")
    if cal.path is not None:
        check_inside_cwd(cal.path, f"{where}: calibration.path")
    return Recipe(name=str(data.get("name", "custom")), description=str(data.get("description", "")),
                  defaults=_strict(Defaults, data.get("defaults"), f"{where}: defaults", "defaults"),
                  calibration=cal, passes=passes)


def check_inside_cwd(path: str, where: str) -> Path:
    p = (Path.cwd() / path).resolve()
    if not p.is_relative_to(Path.cwd().resolve()):
        raise RecipeError(f"{where}: {path!r} points outside the working directory; recipes may only name files inside it")
    return p


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe name (`ptq recipes` lists them) or a path to a YAML file."""
    builtin = list_builtin()
    if name_or_path in builtin:
        path = builtin[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise RecipeError(f"unknown recipe {name_or_path!r}; built-in: {', '.join(builtin) or 'none'}, "
                              "or pass a path to a .yaml file")
    try:
        text = read_bounded(path, MAX_RECIPE_BYTES, "recipe").decode("utf-8")
        data = load_yaml(text, path.name)
    except UsageError as e:
        raise RecipeError(str(e)) from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    return parse_recipe(data, where=str(path.name))
