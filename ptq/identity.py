"""What a compressed artifact shares with its source model, and the checks `ptq gate` / `ptq eval` run
before comparing them: same architecture and shapes (`model_identity`, recorded in manifests and gate baseline
files), same content fingerprint unless allowed otherwise, same tokenization of the text. Each mismatch raises
`UsageError` saying which model to pass instead.
"""
from __future__ import annotations

from pathlib import Path

from ptq.validate import UsageError, max_positions

IDENTITY_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")


def model_identity(config) -> dict:
    """What a compressed artifact must share with its baseline: architecture and the shapes metrics depend on
    (recorded under ``model`` in the manifest and in gate baseline files)."""
    return {"model_type": getattr(config, "model_type", None),
            "architectures": list(getattr(config, "architectures", None) or []),
            **{k: getattr(config, k, None) for k in IDENTITY_KEYS[1:]}}


def _describe(ident: dict) -> str:
    return (f"{ident.get('model_type')} (vocab {ident.get('vocab_size')}, hidden {ident.get('hidden_size')}, "
            f"{ident.get('num_hidden_layers')} layers)")


def check_same_model(artifact: str, ident_a: dict, baseline: str, ident_b: dict) -> None:
    diff = [k for k in IDENTITY_KEYS if ident_a.get(k) != ident_b.get(k) and ident_b.get(k) is not None]
    if diff:
        raise UsageError(f"baseline {baseline} is a {_describe(ident_b)}, {artifact} a {_describe(ident_a)}: "
                         f"not its source model ({', '.join(diff)} differ); pass the model it was compressed from")


def artifact_source(folder: Path) -> dict | None:
    """``model`` section of a ptq artifact's manifest (None for a plain model folder)."""
    if not (Path(folder) / "manifest.json").exists():
        return None
    from ptq.manifest import read_manifest

    try:
        return read_manifest(folder)["model"]
    except ValueError as e:
        raise UsageError(str(e)) from e


def check_gate_inputs(sm, ref, stored: dict | None, w, ref_w, allow_other: bool = False) -> None:
    """Gate / eval: the baseline (model or stored file) describes the artifact's source model, and both sides
    tokenize the text identically. ``w``/``ref_w``: the ``[n, L]`` windows from each side's tokenizer."""
    from ptq.resume import FINGERPRINT_KIND, model_fingerprint

    name = Path(sm.folder).name if sm.folder else "the model"
    ident = model_identity(sm.config)
    src = artifact_source(sm.folder) if sm.folder else None
    mp = max_positions(sm.config)
    if mp is not None and w.shape[1] > mp:
        raise UsageError(f"--seqlen {w.shape[1]} is longer than the model's {mp} positions; use --seqlen {mp} or less")
    own_fp = src.get("fingerprint") if src and src.get("fingerprint_kind") == FINGERPRINT_KIND else None
    if ref is not None:
        rname = Path(ref.folder).name if ref.folder else "baseline"
        check_same_model(name, ident, rname, model_identity(ref.config))
        if own_fp and not allow_other and model_fingerprint(ref.folder) != own_fp:
            raise UsageError(f"baseline {rname} is not the model {name} was compressed from (content fingerprint "
                             "differs from the manifest); pass the source model, or --allow-other-baseline to "
                             "compare anyway")
        if ref_w is not None and (ref_w.shape != w.shape or not bool((ref_w == w).all())):
            raise UsageError(f"the tokenizers of {name} and baseline {rname} disagree on the text; the gate "
                             "compares next-token predictions, so both must use the same tokenizer")
    if stored is not None:
        sid = stored.get("reference_identity")
        tsha = stored.get("tokens_sha256")
        if not isinstance(sid, dict) or not isinstance(tsha, str):
            raise UsageError("the baseline file does not record its reference model and tokens (written by an "
                             "older ptq); rewrite it with --save-baseline")
        check_same_model(name, ident, str(stored.get("reference")), sid)
        sfp = stored.get("reference_fingerprint")
        if own_fp and sfp and not allow_other and stored.get("reference_fingerprint_kind") == FINGERPRINT_KIND \
                and sfp != own_fp:
            raise UsageError(f"the baseline file was measured on {stored.get('reference')}, which is not the model "
                             f"{name} was compressed from (content fingerprint differs); write a baseline of the "
                             "source model, or pass --allow-other-baseline")
        if tokens_sha256(w) != tsha:
            raise UsageError(f"the tokenizer of {name} splits the text differently from the baseline's; the gate "
                             "needs the same tokenizer on both sides")
        ids = stored.get("_ids")
        vocab = ident.get("vocab_size")
        if ids is not None and vocab and ids.numel() and int(ids.max()) >= vocab:
            raise UsageError(f"the baseline file holds token ids >= {vocab}, the vocabulary of {name}")
        want = w.shape[0] * (w.shape[1] - 1)
        if ids is not None and ids.shape[0] != want:
            raise UsageError(f"the baseline file holds {ids.shape[0]} positions, this text gives {want}; "
                             "it is corrupt or from other settings")


def tokens_sha256(w) -> str:
    import hashlib

    return hashlib.sha256(w.to("cpu").long().numpy().tobytes()).hexdigest()


def baseline_identity(ref, w) -> dict:
    """Fields a stored gate baseline carries so a later gate can check what it is compared with."""
    from ptq.resume import FINGERPRINT_KIND, model_fingerprint

    return {"reference_identity": model_identity(ref.config), "tokens_sha256": tokens_sha256(w),
            "reference_fingerprint": model_fingerprint(ref.folder), "reference_fingerprint_kind": FINGERPRINT_KIND}
