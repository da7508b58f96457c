"""Checkpointing of the layer loop so an interrupted `ptq compress` resumes from the last finished layer.

Layout: the output is built in ``<out>.ptq-partial/`` (a name fixed by the output, so a rerun finds it). After
decoder layer ``i`` is written (its shard ``layer-0000i.safetensors`` is already in the folder) we save

* ``ptq-state-batches-0000i.safetensors``: the next layer's inputs ``hidden [b, L, H]`` for every calibration
  batch (``batch.{j}``), the torch RNG state (``rng``) and tensors of passes that keep cross-layer state;
* ``ptq-state.json`` (written last, atomically with ``os.replace``): the layer index, the fingerprint of the
  inputs, the writer's weight map, per-layer stats and JSON state of passes/writer.

A kill at any moment leaves either the previous or the new consistent state. The attention mask / rotary
keyword arguments of a `Batch` depend only on the token positions (one set per attention type, see
ptq.pipeline.AttnInputs); on resume they are recomputed by re-running the embeddings (`capture_inputs`), the
loop binds those of the resumed layer, and only ``hidden`` is taken from the state file. Passes with state that
spans layers may implement ``resume_state() -> dict`` and ``load_resume_state(dict)`` (tensors and
JSON-able values); writers with extra state likewise. The fingerprint (content hash of the model files, recipe,
options, calibration token hash) makes a resume with different inputs fail instead of mixing two runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "ptq-state.json"
BATCH_PREFIX = "ptq-state-batches-"
TEST_KILL_ENV = "PTQ_TEST_KILL_AFTER_LAYER"  # test hook: SIGKILL ourselves right after layer k's state is saved


def not_resumable(passes: list) -> list[str]:
    """Names of passes that keep state across layers (they override ``finalize``) without implementing
    ``resume_state``/``load_resume_state``: resuming them would silently lose that state."""
    from ptq.pipeline import Pass

    return [p.name for p in passes if type(p).finalize is not Pass.finalize
            and not (hasattr(p, "resume_state") and hasattr(p, "load_resume_state"))]


def partial_dir(out: Path) -> Path:
    """``<out>.ptq-partial`` beside the output (deterministic, so an interrupted run can be found again)."""
    out = Path(out)
    return out.with_name(out.name + ".ptq-partial")


def is_state_file(name: str) -> bool:
    return name == STATE_FILE or name.startswith(BATCH_PREFIX) or name.endswith(".ptq-tmp")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


FINGERPRINT_KIND = "sha256-content/1"  # recorded beside the fingerprint in manifests and gate baselines
HASH_CHUNK = 16 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def model_fingerprint(folder: Path | None) -> str:
    """Content fingerprint of a model folder: sha256 over the names and full bytes of every file in it (weights
    included, streamed in 16 MiB chunks; configs and tokenizer files too). Two folders with the same names and
    shapes but other weight values differ; a copy of a folder does not. Cost: one sequential read of the
    checkpoint; sha256 (SHA-NI) measured faster than blake2b here, see bench/fingerprint_speed.py for MB/s."""
    if folder is None:
        return "in-memory"
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        if f.suffix not in WEIGHT_SUFFIXES and f.stat().st_size > 64 << 20:
            h.update(f"{f.name}:skipped-large:{f.stat().st_size}:".encode())  # stray big non-weight file
            continue
        h.update(f"{f.name}:{f.stat().st_size}:".encode())
        with open(f, "rb") as fh:
            while b := fh.read(HASH_CHUNK):
                h.update(b)
    return h.hexdigest()


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class State:
    layer: int  # last finished layer
    n_layers: int
    fingerprint: str
    weight_map: dict
    qweights_written: list
    stats: list
    passes: list = field(default_factory=list)  # JSON part of each pass's resume_state()
    writer: dict | None = None
    batches_file: str = ""


_WRITER_SKIP = {"out", "sm", "spec", "meta", "dtype", "weight_map", "qweights_written"}
_UNSET = object()


def _encode(v):
    """JSON form of plain Python state (sets/tuples tagged); `_UNSET` if it holds anything else."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple, set, frozenset)):
        items = [_encode(x) for x in (sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v)]
        if any(x is _UNSET for x in items):
            return _UNSET
        return items if isinstance(v, list) else {"__" + type(v).__name__.replace("frozen", "") + "__": items}
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        d = {k: _encode(x) for k, x in v.items()}
        return _UNSET if any(x is _UNSET for x in d.values()) else d
    return _UNSET


def _decode(v):
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if isinstance(v, dict):
        if len(v) == 1 and next(iter(v)) in ("__set__", "__tuple__"):
            (k, items), = v.items()
            return (set if k == "__set__" else tuple)(_decode(x) for x in items)
        return {k: _decode(x) for k, x in v.items()}
    return v


def writer_state(writer) -> dict:
    """Bookkeeping a writer accumulates over layers (e.g. the quantization_config summary, ignore lists):
    ``writer.resume_state()`` if defined, else every plain-Python attribute beyond the constructor's;
    attributes that cannot be saved are listed under ``__unsaved__`` (resume is then refused)."""
    if hasattr(writer, "resume_state"):
        return {"custom": writer.resume_state()}
    out, bad = {}, []
    for k, v in vars(writer).items():
        if k in _WRITER_SKIP:
            continue
        e = _encode(v)
        (bad.append(k) if e is _UNSET else out.__setitem__(k, e))
    return {"attrs": out, "__unsaved__": bad}


def load_writer_state(writer, st: dict | None) -> None:
    if not st:
        return
    if "custom" in st:
        writer.load_resume_state(st["custom"])
        return
    if st.get("__unsaved__"):
        raise ValueError(f"the {type(writer).__name__} state ({', '.join(st['__unsaved__'])}) could not be saved, "
                         "so this run cannot resume; pass --force to start over")
    for k, v in st["attrs"].items():
        setattr(writer, k, _decode(v))


def _split(state: dict, prefix: str, tensors: dict) -> dict:
    """Move tensor values of ``state`` into ``tensors`` (keys ``prefix + name``); return the JSON rest."""
    rest = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            tensors[prefix + k] = v.detach().contiguous().cpu()
        else:
            rest[k] = v
    return rest


class Checkpointer:
    """Saves/loads the loop state in a partial output folder."""

    def __init__(self, folder: Path, fp: str):
        self.folder, self.fp = Path(folder), fp

    def has_state(self) -> bool:
        return (self.folder / STATE_FILE).is_file()

    def save(self, layer: int, n_layers: int, batches: list, writer, stats: list, passes: list) -> None:
        tensors = {f"batch.{j}": b.hidden for j, b in enumerate(batches)}
        tensors["rng"] = torch.get_rng_state()
        pstates = []
        for k, p in enumerate(passes):
            st = p.resume_state() if hasattr(p, "resume_state") else {}
            pstates.append(_split(st, f"pass.{k}.", tensors))
        wstate = writer_state(writer)
        name = f"{BATCH_PREFIX}{layer:05d}.safetensors"
        tmp = self.folder / (name + ".ptq-tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.folder / name)
        st = State(layer, n_layers, self.fp, dict(writer.weight_map), list(writer.qweights_written),
                   list(stats), pstates, wstate, name)
        tmp = self.folder / (STATE_FILE + ".ptq-tmp")
        tmp.write_text(json.dumps(st.__dict__, indent=1))
        os.replace(tmp, self.folder / STATE_FILE)
        for old in self.folder.glob(BATCH_PREFIX + "*"):  # older batch files are no longer referenced
            if old.name != name:
                old.unlink(missing_ok=True)
        kill_at = os.environ.get(TEST_KILL_ENV)
        if kill_at is not None and int(kill_at) == layer:
            os.kill(os.getpid(), signal.SIGKILL)

    def load(self) -> tuple[State, dict[str, torch.Tensor]]:
        """The saved state and its tensors; raises ValueError if it is unreadable or from other inputs."""
        try:
            st = State(**json.loads((self.folder / STATE_FILE).read_text()))
            tensors = load_file(str(self.folder / st.batches_file))
        except Exception as e:
            raise ValueError(f"cannot read the resume state in {self.folder} ({e}); pass --force to start over") from e
        if st.writer and st.writer.get("__unsaved__"):
            raise ValueError(f"the writer state ({', '.join(st.writer['__unsaved__'])}) of the unfinished run in "
                             f"{self.folder} could not be saved, so it cannot resume; pass --force to start over")
        if st.fingerprint != self.fp:
            raise ValueError(f"{self.folder} holds an unfinished run with different inputs (model, recipe, "
                             "options or calibration data); rerun with the same inputs, or pass --force to start over")
        return st, tensors

    def restore(self, st: State, tensors: dict, writer, passes: list, batches: list) -> list:
        """Put the saved state back: writer bookkeeping, pass state, RNG; returns ``batches`` with the saved
        hidden states (kwargs kept from the fresh capture)."""
        writer.weight_map.update(st.weight_map)
        writer.qweights_written[:] = st.qweights_written
        load_writer_state(writer, st.writer)
        for k, (p, js) in enumerate(zip(passes, st.passes)):
            if hasattr(p, "load_resume_state"):
                pre = f"pass.{k}."
                p.load_resume_state({**js, **{n[len(pre):]: t for n, t in tensors.items() if n.startswith(pre)}})
        torch.set_rng_state(tensors["rng"])
        from ptq.pipeline import Batch

        n = sum(1 for k in tensors if k.startswith("batch."))
        if n != len(batches):
            raise ValueError(f"resume state has {n} batches, this run has {len(batches)}; pass --force to start over")
        return [Batch(tensors[f"batch.{j}"], b.kwargs, b.attn) for j, b in enumerate(batches)]

    def clear(self) -> None:
        for f in list(self.folder.iterdir()):
            if is_state_file(f.name):
                f.unlink(missing_ok=True)
