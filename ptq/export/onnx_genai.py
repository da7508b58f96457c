"""``genai_config.json`` for a fused export (ptq.export.onnx_fused), so onnxruntime-genai runs the folder as it is:
``og.Model(dir)`` + ``og.Generator``, with the tokenizer files copied beside ``model.onnx``.

Fields (what onnxruntime-genai's decoder reads): input / output name patterns (``past_key_values.%d.key``,
``present.%d.key``), heads, head size, layers, context length (= the rotary cache length), special token ids,
and ``search.past_present_share_buffer = true`` (the runtime binds past and present to one max-length buffer;
GroupQueryAttention reads the valid length from ``seqlens_k``).
"""
from __future__ import annotations

import json
from pathlib import Path

from ptq.export.onnx_graph import kv_layout

CONFIG_FILE = "genai_config.json"


def _ids(v):
    if isinstance(v, list):
        return [int(x) for x in v] if len(v) > 1 else int(v[0])
    return None if v is None else int(v)


def genai_config(config, generation: dict | None = None, filename: str = "model.onnx") -> dict:
    """The config dict for a fused graph of HF ``config`` (``generation``: generation_config.json, optional)."""
    gen = generation or {}
    n_layers, kvh, hd = kv_layout(config)
    ctx = int(config.max_position_embeddings)
    eos = _ids(gen.get("eos_token_id", getattr(config, "eos_token_id", None)))
    bos = _ids(gen.get("bos_token_id", getattr(config, "bos_token_id", None)))
    pad = _ids(gen.get("pad_token_id", getattr(config, "pad_token_id", None)))
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return {
        "model": {
            "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "context_length": ctx,
            "type": config.model_type, "vocab_size": int(config.vocab_size),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename, "head_size": hd, "hidden_size": int(config.hidden_size),
                "num_attention_heads": int(config.num_attention_heads), "num_hidden_layers": n_layers,
                "num_key_value_heads": kvh,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": bool(gen.get("do_sample", False)), "early_stopping": True,
            "length_penalty": 1.0, "max_length": ctx, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True,
            "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
            "temperature": float(gen.get("temperature", 1.0)), "top_k": int(gen.get("top_k", 50)),
            "top_p": float(gen.get("top_p", 1.0)),
        },
    }


def write_genai_config(out_dir: Path, config, source_dir: Path | None = None) -> Path:
    """Write ``out_dir/genai_config.json`` (generation defaults from ``source_dir/generation_config.json``)."""
    gen = None
    if source_dir is not None and (Path(source_dir) / "generation_config.json").is_file():
        gen = json.loads((Path(source_dir) / "generation_config.json").read_text())
    path = Path(out_dir) / CONFIG_FILE
    path.write_text(json.dumps(genai_config(config, gen), indent=2))
    return path
