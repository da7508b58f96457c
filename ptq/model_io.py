"""Model loading that never holds the whole model: a meta-device skeleton plus a `WeightSource` from which
one decoder layer at a time is materialized.

* `resolve_model(src)`: a local folder, a built-in alias (`BUILTIN_MODELS`), a hub id already in the local
  Hugging Face cache (found offline), or a hub id fetched with `huggingface_hub.snapshot_download`
  (safetensors, configs and tokenizer files only); the error lists the forms and what was tried.
* Pickled checkpoints (``*.bin``, ``*.pt``, ``*.pth``) are refused unless ``allow_pickle=True``; then they are
  read with ``torch.load(weights_only=True)``.
* `SafetensorsSource` reads tensors lazily from (possibly sharded) ``*.safetensors``; `StateDictSource` wraps
  an in-memory dict (tests, converted checkpoints).
"""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ptq.layermap import LayerMap, get_module, layer_map_for

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
BUILTIN_MODELS = ("smollm2-135m",)  # shipped by a pip package, converted once to a local safetensors cache
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class ModelInputError(ValueError):
    """Bad user input about a model (missing, corrupt, unsupported); the CLI maps it to exit code 2."""


# config.json ``quantization_config.quant_method`` -> loader of the reader class (a `WeightSource` built as
# ``Reader(dense_source, quantization_config)`` that dequantizes on the fly). Each format registers its own
# (ptq/export/__init__.py, imported by ptq/__init__.py), so this module never imports an exporter.
_READERS: dict[str, Callable[[], type]] = {}


def register_reader(quant_method: str, load: Callable[[], type]) -> None:
    _READERS[quant_method] = load


def reader_class(quant_method: str) -> type:
    if quant_method not in _READERS:
        raise ModelInputError(f"cannot read checkpoints quantized with {quant_method!r}; "
                              f"known: {', '.join(sorted(_READERS)) or 'none registered'}")
    return _READERS[quant_method]()


class WeightSource:
    """Name -> tensor mapping, read on demand."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in set(self.keys())


class StateDictSource(WeightSource):
    def __init__(self, sd: dict[str, torch.Tensor]):
        self.sd = sd

    def keys(self):
        return list(self.sd)

    def get(self, name):
        return self.sd[name]


class SafetensorsSource(WeightSource):
    """Lazy reader over every ``*.safetensors`` file in a folder (sharded or not)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelInputError(f"no *.safetensors files in {self.folder}")
        self._where: dict[str, Path] = {}
        self._dtype: dict[str, str] = {}  # key -> safetensors dtype tag ("F16", "BF16", "F32", ...)
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
                for k in h.keys():
                    self._where[k] = f
                    self._dtype[k] = h.get_slice(k).get_dtype()
            except Exception as e:  # truncated / corrupt header
                raise ModelInputError(f"corrupt safetensors file {f.name}: {e}. Re-download or re-export it.") from e
            del h  # see `get`: no handle (and so no mmap) outlives the tensors read through it

    def keys(self):
        return list(self._where)

    def __contains__(self, name):
        return name in self._where

    def stored_dtype(self, name: str) -> torch.dtype | None:
        """dtype of ``name`` as stored in the file (read from the header, no data loaded)."""
        return SAFETENSORS_DTYPES.get(self._dtype.get(name, ""))

    def get(self, name):
        # A fresh handle per read: safetensors tensors are views of the file's mmap, and a long-lived handle keeps
        # every page ever touched resident (RssFile grew by the whole checkpoint, 13 GiB for a 7B fp16 model;
        # bench/rss_7b.py). With a per-read handle the mapping dies with the last tensor that uses it.
        from safetensors import safe_open

        try:
            with safe_open(str(self._where[name]), framework="pt") as h:
                return h.get_tensor(name)
        except KeyError:
            raise
        except Exception as e:
            raise ModelInputError(f"cannot read tensor {name} from {self._where[name].name}: {e}") from e


class PickleSource(StateDictSource):
    def __init__(self, folder: Path):
        sd = {}
        for f in sorted(p for p in Path(folder).iterdir() if p.suffix in PICKLE_SUFFIXES):
            try:
                sd.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:  # the safe unpickler refused a global, or the file is not a checkpoint
                first = " ".join(str(e).split())[:200]
                raise ModelInputError(f"{f.name}: refused by the safe (weights_only) unpickler: {first}. "
                                      "Convert the checkpoint to safetensors") from e
        super().__init__(sd)


MODEL_FORMS = ("a local model folder (config.json + *.safetensors)",
               "a hub id ORG/NAME already in the Hugging Face cache (or downloadable)",
               "a built-in alias: " + ", ".join(BUILTIN_MODELS))


def resolve_model(src: str, allow_pickle: bool = False) -> Path:
    """Local folder for ``src``, tried in order: an existing folder, a built-in alias, a hub id (or a bare repo
    name) already in the local Hugging Face cache, a hub download. Raises `ModelInputError` naming the
    accepted forms and what was tried."""
    p = Path(src)
    if p.exists():
        if not p.is_dir():
            raise ModelInputError(f"{src} is a file; pass the model folder (config.json + *.safetensors)")
        return p
    if src in BUILTIN_MODELS:
        from ptq.models import smollm2

        try:
            return smollm2.ensure_cache()
        except FileNotFoundError as e:
            raise ModelInputError(str(e)) from e
    tried = [f"no folder {p.resolve()}", f"not a built-in alias ({', '.join(BUILTIN_MODELS)})"]
    looks_like_id = src.count("/") == 1 and not src.startswith((".", "/", "~"))
    repo = src if looks_like_id else _cached_repo_by_name(src)
    if repo is not None:
        found = _hf_cached_snapshot(repo, allow_pickle)
        if found is not None:
            return found
        tried.append(f"no snapshot of {repo} in the Hugging Face cache ({_hf_cache_dir()})")
    elif "/" not in src:
        tried.append(f"no cached hub repo named {src!r} in {_hf_cache_dir()}")
    if looks_like_id and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False"):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(src, allow_patterns=_hub_patterns(allow_pickle), cache_dir=_hf_cache_dir()))
        except Exception as e:
            tried.append(f"download from the hub failed ({type(e).__name__})")
    raise ModelInputError(f"model folder {src} does not exist; tried: {'; '.join(tried)}. MODEL can be "
                          f"{'; '.join(MODEL_FORMS)}")


def _hub_patterns(allow_pickle: bool) -> list[str]:
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
    return patterns + ["*.bin"] if allow_pickle else patterns


def _hf_cache_dir() -> str:
    """The hub cache folder (``HF_HUB_CACHE`` read now, not at import, so a test or caller can point it)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or str(constants.HF_HUB_CACHE)


def _hf_cached_snapshot(repo: str, allow_pickle: bool) -> Path | None:
    """Snapshot folder of ``repo`` from the local cache only (no network), or None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=_hub_patterns(allow_pickle), local_files_only=True,
                                      cache_dir=_hf_cache_dir()))
    except Exception:
        return None


def _cached_repo_by_name(name: str) -> str | None:
    """``ORG/NAME`` of the one cached model repo whose NAME equals ``name`` (case-insensitive), else None."""
    try:
        from huggingface_hub import scan_cache_dir

        repos = [r.repo_id for r in scan_cache_dir(_hf_cache_dir()).repos if r.repo_type == "model"]
    except Exception:  # no cache folder, unreadable cache
        return None
    hits = [r for r in repos if r.split("/")[-1].lower() == name.lower()]
    return hits[0] if len(hits) == 1 else None


def open_weights(folder: Path, allow_pickle: bool = False) -> WeightSource:
    """Dense view of a checkpoint's weights; quantized checkpoints (config ``quantization_config``) are
    dequantized on the fly by the reader of their format."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        src = SafetensorsSource(folder)
        qc = _quant_config(folder)
        if qc:
            return reader_class(qc.get("quant_method"))(src, qc)
        return src
    pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        if not allow_pickle:
            raise ModelInputError(f"{folder} holds only pickled weights ({pickled[0]}); pickle can run code. "
                                  "Convert to safetensors, or pass --allow-pickle if you trust the file")
        return PickleSource(folder)
    raise ModelInputError(f"no weights (*.safetensors) in {folder}")


def _quant_config(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError):
        return None


def load_config(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    cfg_file = Path(folder) / "config.json"
    if not cfg_file.exists():
        raise ModelInputError(f"{folder} has no config.json; is it a transformers model folder?")
    if cfg_file.stat().st_size > 16 << 20:
        raise ModelInputError(f"{cfg_file} is larger than 16 MiB; is it really a config?")
    try:
        json.loads(cfg_file.read_text())
        cfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelInputError(f"cannot read {cfg_file}: {e}") from e
    if hasattr(cfg, "quantization_config"):  # we dequantize ourselves; the skeleton is a plain model
        del cfg.quantization_config
    return cfg


def build_skeleton(config) -> nn.Module:
    """CausalLM with every parameter on the meta device (no memory); eval mode. Attention: the config's, else
    transformers' default for the family (sdpa; eager where sdpa cannot express it, e.g. Gemma 2's
    attention-logit soft-capping)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    from ptq import moe

    moe.install(model, config)  # MoE experts as per-expert Linears under the checkpoint's names
    return model.eval()


def materialize(module: nn.Module, prefix: str, source: WeightSource, dtype: torch.dtype,
                device: str = "cpu", tied: dict[str, str] | None = None) -> nn.Module:
    """Give ``module`` real tensors read from ``source`` (keys ``prefix + local name``), cast to ``dtype``.

    Non-persistent buffers (rotary inv_freq) are recomputed by re-running the module's own init logic.
    """
    tied = tied or {}
    module.to_empty(device=device)
    for name, p in list(module.named_parameters(recurse=True)):
        key = prefix + name
        key = tied.get(key, key)
        if key not in source:
            raise ModelInputError(f"weight {key} missing from the checkpoint")
        t = source.get(key)
        if tuple(t.shape) != tuple(p.shape):
            raise ModelInputError(f"weight {key} has shape {tuple(t.shape)}, config expects {tuple(p.shape)}")
        p.data = t.to(device=device, dtype=dtype)
    for name, b in list(module.named_buffers(recurse=True)):
        key = prefix + name
        if key in source:
            b.data = source.get(key).to(device=device)
    _rebuild_buffers(module, device)
    return module


def _rebuild_buffers(module: nn.Module, device: str) -> None:
    """Recompute non-persistent buffers (not in checkpoints, garbage after ``to_empty``):

    * rotary modules (``inv_freq``, or Gemma 3's per-layer-type ``{type}_inv_freq``): re-run the module's own
      ``__init__(config)`` (parameter-free, cheap) and copy its buffers and plain attributes;
    * scaled embeddings (Gemma 2/3 ``embed_scale = sqrt(hidden)``): from the module's ``scalar_embed_scale``.
    """
    for m in module.modules():
        names = [n for n, _ in m.named_buffers(recurse=False)]
        if any(n.endswith("inv_freq") for n in names) and hasattr(m, "config"):
            with torch.device(device):
                fresh = type(m)(m.config)
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(m, name, buf)
            for k, v in vars(fresh).items():
                if not k.startswith("_") and isinstance(v, (int, float)):
                    setattr(m, k, v)
        elif "embed_scale" in names and hasattr(m, "scalar_embed_scale"):
            m.embed_scale = torch.tensor(m.scalar_embed_scale, device=device)


def release(module: nn.Module) -> None:
    """Drop a materialized module's tensors back to meta (frees memory) and hand freed heap pages back to the
    OS (glibc ``malloc_trim``; without it, RSS crept up ~50 MB per layer on a 7B-shaped model)."""
    module.to("meta")
    _trim_heap()


_LIBC = None  # glibc handle for malloc_trim: None = not looked up yet, False = unavailable


def _trim_heap() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


class StreamingModel:
    """A model whose decoder layers are materialized one at a time from a `WeightSource`.

    ``model`` stays on meta except for the pre-layer modules (embeddings, rotary), which are loaded at once;
    `head()` loads the final norm and lm_head on demand.
    """

    def __init__(self, folder: Path | None, config, source: WeightSource, dtype=torch.float32,
                 device: str = "cpu"):
        from ptq import moe

        source = moe.per_expert_source(config, source)  # fused-expert checkpoints: per-expert view
        self.folder, self.config, self.source = folder, config, source
        self.dtype, self.device = dtype, device
        self.lmap: LayerMap = layer_map_for(config)
        self.model = build_skeleton(config)
        self.tied = {}
        if getattr(config, "tie_word_embeddings", False) and f"{self.lmap.lm_head}.weight" not in source:
            self.tied[f"{self.lmap.lm_head}.weight"] = f"{self.lmap.embed[0]}.weight"
        for path in self.lmap.embed:
            materialize(get_module(self.model, path), path + ".", source, dtype, device)
        self._head_loaded = False

    @classmethod
    def open(cls, src: str, dtype=torch.float32, device="cpu", allow_pickle=False, trust_remote_code=False):
        folder = resolve_model(src, allow_pickle)
        config = load_config(folder, trust_remote_code)
        layer_map_for(config)  # fail fast on unsupported archs
        return cls(folder, config, open_weights(folder, allow_pickle), dtype, device)

    @property
    def layers(self) -> nn.ModuleList:
        return get_module(self.model, self.lmap.layers)

    def layer_prefix(self, i: int) -> str:
        return f"{self.lmap.layers}.{i}."

    def load_layer(self, i: int) -> nn.Module:
        return materialize(self.layers[i], self.layer_prefix(i), self.source, self.dtype, self.device)

    def head(self) -> tuple[nn.Module, nn.Module]:
        norm, lm_head = get_module(self.model, self.lmap.final_norm), get_module(self.model, self.lmap.lm_head)
        if not self._head_loaded:
            materialize(norm, self.lmap.final_norm + ".", self.source, self.dtype, self.device)
            materialize(lm_head, self.lmap.lm_head + ".", self.source, self.dtype, self.device, self.tied)
            self._head_loaded = True
        return norm, lm_head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Streamed head: final norm, lm_head and the family's final soft-capping (Gemma 2:
        ``z <- c * tanh(z / c)``) on the last layer's output ``hidden [b, L, H]`` -> ``[b, L, V]``."""
        norm, lm_head = self.head()
        z = lm_head(norm(hidden))
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            z = torch.tanh(z / cap) * cap
        return z

    def nonlayer_keys(self) -> list[str]:
        lp = self.lmap.layers + "."
        return [k for k in self.source.keys() if not k.startswith(lp)]


def full_model(src: str | Path, dtype=torch.float32, allow_pickle=False):
    """Whole model in memory (for small models, eval and tests), loaded through our own loader."""
    sm = StreamingModel.open(str(src), dtype=dtype, allow_pickle=allow_pickle)
    for i in range(len(sm.layers)):
        sm.load_layer(i)
    sm.head()
    if sm.tied:
        sm.model.tie_weights() if hasattr(sm.model, "tie_weights") else None
    return sm.model, sm.config


TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tokenizer_for(folder: Path | str, trust_remote_code: bool = False):
    """The folder's tokenizer; its own Python code (``auto_map``) runs only with ``trust_remote_code=True``.
    Raises `ModelInputError` (one line) when there is none or it cannot be loaded."""
    from transformers import AutoTokenizer

    if not any((Path(folder) / f).is_file() for f in TOKENIZER_MARKERS):
        raise ModelInputError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_MARKERS[:2])}); copy the base "
                              "model's tokenizer files into it")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        hint = " (pass --trust-remote-code if you trust its code)" if "trust_remote_code" in msg else ""
        raise ModelInputError(f"cannot load the tokenizer in {folder}: {msg}{hint}") from e


def dir_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
