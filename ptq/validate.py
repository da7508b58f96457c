"""One validation of a whole request before any work starts (docs/ci.md, "checked before work starts").

Everything here is cheap (file metadata, config, safetensors headers, tokenizer files); each problem raises
`UsageError` with one line saying what is wrong and what to do, which the CLI prints and exits 2 on.

* value types and ranges of recipe / ``--set`` values (`check_types`, `check_ranges`): ``sym: "false"`` is
  an error naming the key, the expected type and the value, never a truthy string;
* request options (`check_compress_options`): windows, sample counts, flags the recipe would ignore;
* paths (`check_output_location`): the output may not contain, equal or sit inside any input, be a file, a
  link, the working directory or an unwritable place; ``--force`` only replaces a folder ptq wrote;
* model against config and recipe (`check_model`): every tensor the config needs is present with the right
  shape and no tensor is left unexplained (a config with fewer layers would drop layers), group size and
  sequence lengths fit the model, no file of the model folder is a link leaving it;
* bounded reads of user files (`read_bounded`, `read_text_file`, `load_yaml`, `load_json_file`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import stat
from pathlib import Path

MiB = 1 << 20
MAX_RECIPE_BYTES = 1 * MiB
MAX_JSON_BYTES = 256 * MiB  # gate baselines (~2 MB for 40 x 512 tokens, top-8) and manifests
MAX_TEXT_BYTES = 1024 * MiB  # calibration / evaluation text, read whole then tokenized


class UsageError(ValueError):
    """Bad user input; the CLI prints it on one line and exits 2."""


# -- bounded reads ----------------------------------------------------------------------------------------------
def read_bounded(path: str | Path, limit: int, what: str) -> bytes:
    """Bytes of a regular file of at most ``limit`` bytes (FIFOs, devices and oversized files are refused)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise UsageError(f"{what} {p} does not exist") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {p}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {p} is a folder; pass a file")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{what} {p} is not a regular file")
    if st.st_size > limit:
        raise UsageError(f"{what} {p} is {st.st_size / MiB:.1f} MiB, more than the {limit / MiB:.0f} MiB ptq reads; "
                         "pass a smaller file")
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UsageError(f"cannot read {what} {p}: {e.strerror}") from None
    if len(data) > limit:
        raise UsageError(f"{what} {p} grew beyond {limit / MiB:.0f} MiB while being read")
    return data


def read_text_file(path: str | Path, what: str, limit: int = MAX_TEXT_BYTES) -> str:
    """UTF-8 text of a file; binary content (NUL bytes, invalid UTF-8) is an error, not silently replaced."""
    data = read_bounded(path, limit, what)
    if b"\x00" in data[: 1 << 16]:
        raise UsageError(f"{what} {path} looks binary (NUL bytes); pass a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path} is not UTF-8 text (invalid byte at offset {e.start}); "
                         "pass a UTF-8 text file") from None


def load_yaml(text: str, where: str):
    """``yaml.safe_load`` without anchors/aliases (no billion-laughs expansion) and no ``!!python`` tags."""
    import yaml

    class _NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise yaml.YAMLError(f"{where}: YAML aliases (*name) are not allowed in recipes")
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (SafeLoader subclass)


def load_json_file(path: str | Path, what: str, limit: int = MAX_JSON_BYTES):
    import json

    raw = read_bounded(path, limit, what)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} {path} is not valid JSON ({getattr(e, 'msg', e)})") from None
    except RecursionError:
        raise UsageError(f"{what} {path} is nested too deeply") from None


# -- value types and ranges --------------------------------------------------------------------------------------
_TYPE_WORDS = {"bool": "true or false (bool)", "int": "an integer", "float": "a number", "str": "a string",
               "list": "a list", "dict": "a mapping"}


def _accepts(tname: str, v) -> bool:
    if tname == "bool":
        return isinstance(v, bool)
    if tname == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if tname == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tname == "str":
        return isinstance(v, str)
    if tname == "list":
        return isinstance(v, list)
    if tname == "dict":
        return isinstance(v, dict)
    return True  # annotation we do not know: the dataclass itself decides


def check_types(cls, data: dict, where: str) -> None:
    """Each value of ``data`` has the type its dataclass field declares (``int | None`` etc.)."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for k, v in data.items():
        ann = types.get(k)
        if ann is None:
            continue
        alts = [a.strip() for a in ann.replace("Optional[", "").rstrip("]").split("|")]
        if v is None and "None" in alts:
            continue
        known = [a for a in alts if a in _TYPE_WORDS]
        if not known or any(_accepts(a, v) for a in known):
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"{where}: {k}: expected a finite number, got {v!r}")
            continue
        want = " or ".join(_TYPE_WORDS[a] for a in known) + (" or null" if "None" in alts else "")
        raise UsageError(f"{where}: {k}: expected {want}, got {v!r} ({type(v).__name__})")


# (section, key) -> (low, high, low_inclusive, high_inclusive); None = unbounded. Sections: "defaults",
# "calibration" or a pass name. Checked for recipe files and --set overrides alike.
RANGES: dict[tuple[str, str], tuple] = {
    ("defaults", "act_bits"): (2, 16, True, True),
    ("calibration", "nsamples"): (1, 100_000, True, True),
    ("calibration", "seqlen"): (2, None, True, True),
    ("calibration", "seed"): (0, None, True, True),
    ("gptq", "damp"): (0, 1, False, True),
    ("gptq", "block_size"): (1, 65536, True, True),
    ("smoothquant", "alpha"): (0, 1, True, True),
    ("udfc", "prune_ratio"): (0, 1, True, False),
    ("udfc", "round_to"): (1, None, True, True),
    ("os+", "grid"): (1, 100_000, True, True),
    ("os+", "max_steps"): (1, None, True, True),
    ("os+", "search_samples"): (1, None, True, True),
    ("nupes", "grid"): (2, 100_000, True, True),
    ("nupes", "steps"): (0, None, True, True),
    ("nupes", "max_tokens"): (1, None, True, True),
    ("nupes", "golden_iters"): (0, 1000, True, True),
    ("nupes-df", "grid"): (2, 100_000, True, True),
    ("nupes-df", "golden_iters"): (0, 1000, True, True),
    ("cskv", "k_density"): (0, 1, False, True),
    ("cskv", "v_density"): (0, 1, False, True),
    ("cskv", "window"): (0, None, True, True),
    ("cskv", "fit_steps"): (0, None, True, True),
    ("cskv", "fit_tokens"): (1, None, True, True),
}


def check_ranges(section: str, data: dict, where: str) -> None:
    for k, v in data.items():
        r = RANGES.get((section, k))
        if r is None or v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        lo, hi, lo_inc, hi_inc = r
        ok = (lo is None or (v >= lo if lo_inc else v > lo)) and (hi is None or (v <= hi if hi_inc else v < hi))
        if not ok:
            left = "-inf" if lo is None else f"{'[' if lo_inc else '('}{lo}"
            right = "inf)" if hi is None else f"{hi}{']' if hi_inc else ')'}"
            raise UsageError(f"{where}: {k} must be in {left}, {right}, got {v!r}")


# -- request options ---------------------------------------------------------------------------------------------
ACT_BITS_PASSES = ("act-quant", "os+")  # passes that read defaults.act_bits


def check_compress_options(opts, recipe) -> None:
    """Options the recipe would ignore or that are out of range (no model needed)."""
    names = [n for n, _ in recipe.passes]
    if not names:
        raise UsageError(f"recipe {recipe.name!r} has no passes; it would write unquantized weights. "
                         "List at least one pass")
    if opts.eval_windows < 1:
        raise UsageError(f"--eval-windows must be >= 1, got {opts.eval_windows}")
    if opts.eval_seqlen < 2:
        raise UsageError(f"evaluation sequence length must be >= 2, got {opts.eval_seqlen}")
    if opts.nsamples is not None and opts.nsamples < 1:
        raise UsageError(f"--nsamples must be >= 1, got {opts.nsamples}")
    if opts.seqlen is not None and opts.seqlen < 2:
        raise UsageError(f"--seqlen must be >= 2, got {opts.seqlen}")
    if opts.seed is not None and opts.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {opts.seed}")
    mixed = getattr(opts, "bits", None) is not None and (not float(opts.bits).is_integer()
                                                         or getattr(opts, "bit_widths", None) is not None)
    if not recipe.needs_calibration and opts.calib is not None and not mixed:
        raise UsageError(f"recipe {recipe.name!r} reads no calibration data; --calib would be ignored. Drop it "
                         "or choose a calibrated recipe (e.g. gptq)")
    if opts.act_bits is not None and not any(n in ACT_BITS_PASSES for n in names):
        raise UsageError(f"--act-bits: recipe {recipe.name!r} is weight-only (passes: {', '.join(names)}); "
                         "drop --act-bits or use an activation recipe (w8a8, smoothquant, os+)")
    if recipe.defaults.act_granularity not in ("token", "tensor"):
        raise UsageError(f"act_granularity must be token or tensor, got {recipe.defaults.act_granularity!r}")
    if recipe.needs_calibration and recipe.calibration.path is not None:
        read_text_probe(recipe.calibration.path, "calibration file")
    if opts.eval_text is not None:
        read_text_probe(opts.eval_text, "--eval-text file")


def read_text_probe(path: str, what: str) -> None:
    """A calibration / evaluation path exists, is bounded and is text (folders: their .txt files)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise UsageError(f"{what} folder {p} has no .txt files")
        total = sum(f.stat().st_size for f in files)
        if total > MAX_TEXT_BYTES:
            raise UsageError(f"{what} folder {p} holds {total / MiB:.0f} MiB of text, more than the "
                             f"{MAX_TEXT_BYTES / MiB:.0f} MiB ptq reads")
        for f in files:
            read_text_file(f, what)
        return
    read_text_file(p, what)


# -- output location ---------------------------------------------------------------------------------------------
def check_output_location(out: str | Path, inputs: dict[str, Path], force: bool) -> Path:
    """Where ``out`` may be written: returns its absolute path. ``inputs``: label -> path of every input."""
    from ptq.resume import partial_dir

    raw = Path(out)
    if raw.name in ("", ".", ".."):
        raise UsageError(f"--out {str(out)!r} does not name a new folder; pass e.g. --out ./artifacts/q4")
    for p, label in ((raw, "--out"), (partial_dir(raw), "the partial output")):
        if p.is_symlink():
            raise UsageError(f"{label} {p} is a symbolic link; ptq writes only to a real path "
                             "(remove the link or choose another --out)")
    o = raw.resolve()
    anc = o.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"cannot create {o}: {anc} is a file, not a folder")
    if not _writable(anc):
        raise UsageError(f"cannot write in {anc} (read-only or no permission); choose another --out")
    for label, p in inputs.items():
        if p is None:
            continue
        pr = Path(p).resolve()
        if pr == o or pr.is_relative_to(o):
            raise UsageError(f"--out {o} contains the {label} {pr}; writing there would delete it. "
                             "Choose another --out")
        if pr.is_dir() and o.is_relative_to(pr):
            raise UsageError(f"output {o} is inside the {label} folder {pr}; choose another --out")
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if o == cwd or cwd.is_relative_to(o) or o == home or o == Path(o.anchor):
        raise UsageError(f"--out {o} is the working directory, the home folder or one of their parents; "
                         "choose a new folder")
    if o.exists() or raw.is_symlink():
        if not o.is_dir():
            raise UsageError(f"--out {o} is a file; ptq writes a folder (remove it or choose another --out)")
        if not force:
            raise UsageError(f"output folder {o} already exists; pass --force to replace it")
        if not _is_ptq_output(o):
            sample = next(iter(sorted(p.name for p in o.iterdir())), "")
            raise UsageError(f"--force replaces only a folder written by ptq (with manifest.json); {o} holds "
                             f"other files (e.g. {sample}): remove it yourself or choose another --out")
    return o


def _writable(folder: Path) -> bool:
    """Can we create entries in ``folder``? (a real probe: ``os.access`` says yes to root on read-only mounts)"""
    import tempfile

    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ptq-probe-", dir=folder))
    except OSError:
        return False
    return True


def _is_ptq_output(folder: Path) -> bool:
    try:
        return (folder / "manifest.json").is_file() or not any(folder.iterdir())
    except OSError:
        return False


# -- model folder ------------------------------------------------------------------------------------------------
def link_allowed(folder: Path, path: Path) -> bool:
    """Is ``path`` (a file of the model folder) a real file of the folder, or a link that stays inside it?
    Hugging Face cache snapshots (``models--x/snapshots/<rev>/f -> ../../blobs/<sha>``) may point into their
    repository's ``blobs`` folder."""
    folder = Path(folder).resolve()
    if not path.is_symlink():
        return path.resolve().is_relative_to(folder)
    target = path.resolve()
    if target.is_relative_to(folder):
        return True
    if folder.parent.name == "snapshots":
        return target.is_relative_to(folder.parent.parent / "blobs")
    return False


def side_file(folder: Path, name: str, warn=None) -> Path | None:
    """``folder/name`` if it is a regular file that may be copied into an artifact, else None (a link that
    leaves the folder is skipped and reported through ``warn``)."""
    p = Path(folder) / name
    if not (p.is_file() or p.is_symlink()):
        return None
    if not link_allowed(Path(folder), p) or not p.is_file():
        msg = f"ptq: not copying {name}: it is a link leaving {folder}"
        if warn is not None:
            warn(msg)
        else:
            import sys

            print(msg, file=sys.stderr)
        return None
    return p


def check_model_links(folder: Path) -> None:
    """No file of the model folder is a link leaving it (it would be read, and side files copied, through it)."""
    bad = [p for p in sorted(Path(folder).iterdir()) if p.is_symlink() and not link_allowed(folder, p)]
    if bad:
        raise UsageError(f"model folder {folder}: {bad[0].name} is a link to {bad[0].resolve()}, outside the "
                         "folder; ptq never reads through links that leave the model folder (copy the file in)")


def check_tensors(sm) -> None:
    """Checkpoint tensors against the config: every parameter present with the config's shape, and no tensor
    the config does not describe (a config with fewer layers than the checkpoint would silently drop them)."""
    params = dict(sm.model.named_parameters(remove_duplicate=False))
    buffers = {n for n, _ in sm.model.named_buffers(remove_duplicate=False)}
    src = sm.source
    keys = set(src.keys())
    missing = [n for n in params if n not in keys and n not in sm.tied]
    n_cfg = getattr(sm.config, "num_hidden_layers", None)
    lp = sm.lmap.layers + "."
    ck_layers = sorted({int(k[len(lp):].split(".", 1)[0]) for k in keys
                        if k.startswith(lp) and k[len(lp):].split(".", 1)[0].isdigit()})
    span = f"the checkpoint has {len(ck_layers)} layers" if ck_layers else "the checkpoint has no layers"
    if missing:
        raise UsageError(f"the checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[0]} "
                         f"(config.json: num_hidden_layers={n_cfg}, {span}); fix config.json or the checkpoint")
    extra = sorted(k for k in keys if k not in params and k not in buffers)
    if extra:
        raise UsageError(f"the checkpoint has {len(extra)} tensor(s) config.json does not describe, e.g. {extra[0]} "
                         f"(config.json: num_hidden_layers={n_cfg}, {span}); they would be dropped. Fix config.json "
                         "or remove them from the checkpoint")
    shapes = header_shapes(src)
    for n, p in params.items():
        got = shapes.get(n)
        if got is not None and tuple(got) != tuple(p.shape):
            raise UsageError(f"tensor {n} has shape {tuple(got)} in the checkpoint, config.json expects "
                             f"{tuple(p.shape)}; the config does not belong to these weights")


def header_shapes(src) -> dict[str, tuple]:
    """Tensor shapes from safetensors headers (no data read); {} for other sources."""
    where = getattr(src, "_where", None)
    if not where:
        return {}
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for k, f in where.items():
        by_file.setdefault(f, []).append(k)
    out = {}
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as h:
            for k in names:
                out[k] = tuple(h.get_slice(k).get_shape())
    return out


def max_positions(config) -> int | None:
    for k in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(config, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_seqlen(config, seqlen: int, flag: str) -> None:
    mp = max_positions(config)
    if mp is not None and seqlen > mp:
        raise UsageError(f"{flag} {seqlen} is longer than the model's {mp} positions (config.json "
                         f"max_position_embeddings); use {flag} {mp} or less")


def check_model(sm, recipe, spec, opts) -> None:
    """Model folder against config, recipe and request (after `StreamingModel.open`, before any work)."""
    from torch import nn

    if sm.folder is not None:
        check_model_links(sm.folder)
    check_tensors(sm)
    widths = [m.in_features for m in sm.model.modules() if isinstance(m, nn.Linear)]
    if spec.group_size != -1 and widths and spec.group_size > max(widths):
        raise UsageError(f"--group-size {spec.group_size} is larger than every linear's input width (largest "
                         f"{max(widths)}); use -1 (per channel) or a value <= {max(widths)}")
    if recipe.needs_calibration:
        check_seqlen(sm.config, recipe.calibration.seqlen, "--seqlen")
    mp = max_positions(sm.config)
    if opts.eval_text and mp is not None and opts.eval_seqlen > mp:  # not a CLI flag: fit it to the model
        opts.eval_seqlen = mp


def is_disk_full(e: BaseException) -> bool:
    """True for ENOSPC, also when wrapped (safetensors reports it as a SafetensorError message)."""
    import errno

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        s = str(e)
        if "No space left on device" in s or "StorageFull" in s or "os error 28" in s:
            return True
        e = e.__cause__ or e.__context__
    return False
