"""`evaluate_pair`: perplexity of a model folder and, against a baseline folder, KL divergence and top-1
agreement, both streamed layer by layer (what `ptq eval` and `compress --eval-text` report).
"""
from __future__ import annotations

from pathlib import Path

from ptq.model_io import StreamingModel, tokenizer_for
from ptq.settings import DTYPES
from ptq.validate import UsageError


def evaluate_pair(model: str, baseline: str | None, text: str, seqlen: int = 512, max_windows: int = 40,
                  dtype: str = "float32", progress=None, bos: bool | None = None) -> dict:
    """Perplexity of ``model`` (and of ``baseline`` plus KL / top-1 against it), streamed layer by layer;
    ``progress(i, n)`` after each layer of each model. ``bos``: BOS before each window (None: the BOS choice
    ``model`` was calibrated with if its run overrode the tokenizer, else the tokenizer's own setting,
    `calib.data.eval_bos`); the result says which (``bos``, ``bos_source``)."""
    from calib.data import eval_bos, read_text, resolve_bos, tokenize
    from ptq.eval.metrics import eval_windows, stream_metrics

    from ptq.identity import check_gate_inputs

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
