"""Check an exported KV-cache graph in onnxruntime against the PyTorch fake-quant model.

* `ort_logits`: prefill logits ``[b, s, V]`` (empty ``past_key_values``).
* `ort_greedy` / `torch_greedy`: greedy decoding with the KV cache (prefill, then one token per step feeding the
  ``present.*`` outputs back), returning the generated ids.
* `validate`: max |logits_ORT - logits_torch| at accuracy_level 0 (bit-faithful kernels; expected ~1e-6) and at
  the exported accuracy level (int8 activations inside MatMulNBits at 4: ~1e-2 drift), plus greedy agreement.

For W8A8 graphs the PyTorch reference quantizes each W8A8 linear's input per tensor, dynamically, to uint8
(``DynamicQuantizeLinear``: ``s = (max(x,0) - min(x,0))/255``, ``z = round(-min/s)``) via forward pre-hooks.
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ptq.export.onnx_graph import save_model
from ptq.export.onnx_quant import set_accuracy_level
from ptq.quant.primitives import fake_quantize_activation


def session(model: str | Path | bytes, threads: int = 1, qdq_accuracy_level: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if qdq_accuracy_level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(qdq_accuracy_level))
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"])


def _past_inputs(sess) -> list:
    return [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]


def _empty_feed(sess, ids: np.ndarray) -> dict:
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones(ids.shape, np.int64)}
    for i in _past_inputs(sess):
        shape = i.shape  # [batch, kv_heads, past_seq, head_dim]
        feed[i.name] = np.zeros((ids.shape[0], shape[1], 0, shape[3]), np.float32)
    return feed


def ort_logits(sess, ids: np.ndarray) -> np.ndarray:
    """Prefill logits ``[b, s, V]`` for ``ids [b, s]``."""
    return sess.run(["logits"], _empty_feed(sess, ids))[0]


def ort_greedy(sess, ids: np.ndarray, n_new: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy continuation of ``ids [1, s]`` with the graph's KV cache: ``n_new`` token ids and the last-position
    logits ``[V]`` of every step."""
    names = [o.name for o in sess.get_outputs()]
    feed = _empty_feed(sess, ids)
    total = ids.shape[1]
    out: list[int] = []
    steps = []
    for _ in range(n_new):
        res = dict(zip(names, sess.run(names, feed)))
        steps.append(res["logits"][0, -1])
        tok = int(steps[-1].argmax())
        out.append(tok)
        total += 1
        feed = decode_feed(res, tok, total)
    return out, steps


def decode_feed(res: dict, tok: int, total: int) -> dict:
    """Feed for one decode step: the new token, a mask over ``total`` positions, and the previous step's
    ``present.*`` outputs as ``past_key_values.*`` inputs."""
    feed = {"input_ids": np.array([[tok]], np.int64), "attention_mask": np.ones((1, total), np.int64)}
    for k, v in res.items():
        if k.startswith("present."):
            feed["past_key_values." + k[len("present."):]] = v
    return feed


@torch.no_grad()
def torch_greedy(model: nn.Module, ids: torch.Tensor, n_new: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy continuation of ``ids [1, s]`` with transformers' DynamicCache (same steps as `ort_greedy`)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cur, mask, out, steps = ids, torch.ones_like(ids), [], []
    for _ in range(n_new):
        logits = model(input_ids=cur, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        steps.append(logits[0, -1].numpy())
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        cur = torch.tensor([[tok]])
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
    return out, steps


@contextmanager
def act_quant_hooks(model: nn.Module, modules: list[str], bits: int = 8):
    """Per-tensor dynamic asymmetric activation fake-quant on the inputs of ``modules`` (W8A8 reference)."""
    hooks = []
    mods = dict(model.named_modules())
    for name in modules:
        hooks.append(mods[name].register_forward_pre_hook(
            lambda _m, args: (fake_quantize_activation(args[0], bits, "tensor"),) + tuple(args[1:])))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def sample_ids(config, tokenizer=None, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    """Validation input ``[batch, seq]``: tokenized text when a tokenizer is given, else seeded random ids."""
    if tokenizer is not None:
        text = ("The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of "
                "times, it was the age of wisdom, it was the age of foolishness.")
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
        if ids.numel() >= batch * seq // 2 + seq:
            return torch.stack([ids[i * (seq // 2): i * (seq // 2) + seq] for i in range(batch)])
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, seq), generator=g)


def _acc0_session(proto: onnx.ModelProto, qdq: bool, threads: int):
    """Session on ``proto`` with every MatMulNBits at accuracy_level 0 (QDQ: fusion at level 0)."""
    if qdq:
        return _session_of(proto, threads, qdq_accuracy_level=0)
    levels = {n.name: next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
              for n in proto.graph.node if n.op_type == "MatMulNBits"}
    set_accuracy_level(proto, 0)
    try:
        return _session_of(proto, threads)
    finally:
        for n in proto.graph.node:
            if n.op_type == "MatMulNBits" and levels[n.name]:
                n.attribute.append(onnx.helper.make_attribute("accuracy_level", levels[n.name]))


def _session_of(proto: onnx.ModelProto, threads: int, **kw):
    if proto.ByteSize() < 1_800_000_000:
        return session(proto.SerializeToString(), threads, **kw)
    tmp = Path(tempfile.mkdtemp(prefix="ptq-onnx-val-"))
    save_model(proto, tmp / "model.onnx")
    return session(tmp / "model.onnx", threads, **kw)


def validate(model_path: Path, ref_model: nn.Module, ids: torch.Tensor, n_new: int = 20, qdq: bool = False,
             w8a8_modules: list[str] | None = None, threads: int = 1) -> dict:
    """Compare the ONNX model at ``model_path`` with ``ref_model`` (fp32 fake-quant, dequantized weights).

    ``ids [b, s]``: logits inputs; the greedy prompt is ``ids[:1, :8]``. Returns the numbers for onnx_report.json.
    """
    ref_model = ref_model.eval()
    w8a8_modules = w8a8_modules or []
    with torch.no_grad(), act_quant_hooks(ref_model, w8a8_modules):
        ref = ref_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
    prompt = ids[:1, :8]
    with act_quant_hooks(ref_model, w8a8_modules):
        ref_gen, ref_steps = torch_greedy(ref_model, prompt, n_new)
    proto = onnx.load(str(model_path))
    res: dict = {"logit_abs_max": float(np.abs(ref).max()), "n_new_tokens": n_new, "torch_greedy": ref_gen}
    for tag, sess in (("acc0", _acc0_session(proto, qdq, threads)), ("exported", session(model_path, threads))):
        lg = ort_logits(sess, ids.numpy())
        gen, steps = ort_greedy(sess, prompt.numpy(), n_new)
        same = next((i for i, (a, b) in enumerate(zip(gen, ref_gen)) if a != b), n_new)
        res[f"max_abs_logit_diff_{tag}"] = float(np.abs(lg - ref).max())
        res[f"rel_logit_diff_{tag}"] = res[f"max_abs_logit_diff_{tag}"] / max(res["logit_abs_max"], 1e-12)
        res[f"top1_agreement_{tag}"] = float((lg.argmax(-1) == ref.argmax(-1)).mean())
        res[f"greedy_match_{tag}"] = gen == ref_gen
        res[f"greedy_prefix_match_{tag}"] = same
        # decode-step logits (KV-cache path) while both sequences agree
        res[f"max_abs_decode_logit_diff_{tag}"] = float(max(np.abs(a - b).max() for a, b in
                                                            zip(steps[:same + 1], ref_steps[:same + 1])))
        del sess
    return res
