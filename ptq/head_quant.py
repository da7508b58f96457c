"""Quantizing the embedding / lm_head, the weights no layer pass sees (``ptq export --embed-bits``).

The decoder-layer passes leave ``embed_tokens`` and ``lm_head`` in floating point; a small model keeps a large
share of its parameters there (SmolLM2-135M: 28 M of 135 M, one tied matrix ``E [V, d]``). This module turns
them into `QuantizedWeight` s (group 32 along ``d``; asymmetric, or symmetric with ``sym``: no zero points, the
onnxruntime-genai builder's int4 form) that the ONNX exporter packs unchanged. Methods:

* ``rtn``: min/max round-to-nearest (``ptq.quant.primitives``).
* ``mse`` / ``octav``: round-to-nearest on a clipped range (``ptq.quant.clipping``: GPTQ's shrink grid search /
  OCTAV's MSE fixed point), chosen per group to minimize the weight error.
* ``gptq``: GPTQ (Frantar et al., ICLR 2023) of the lm_head ``W [V, d]`` with the Hessian of its input, the final
  norm's output ``X [T, d]`` on calibration text, ``H = 2/T X^T X`` (``d`` = 576 for SmolLM2, so one Cholesky of a
  576 x 576 matrix); minimizes ``||X W^T - X W_hat^T||^2`` -- the logit error -- instead of ``||W - W_hat||^2``.
  Act-order with static groups (``ptq.passes.gptq``), so ``g_idx`` stays trivial and a tied embedding (read by
  ``GatherBlockQuantized``, contiguous blocks only) uses the very same codes. An untied embedding has one-hot
  inputs: its Hessian is diagonal and GPTQ would be plain RTN, so it gets ``rtn``.

The model's weights are replaced by the dequantized values, so the fake-quant model stays the validation
reference of the export.
"""
from __future__ import annotations

import torch
from torch import nn

from ptq.quant.primitives import QuantSpec
from ptq.quant.qweight import QuantizedWeight

HEAD_METHODS = ("rtn", "mse", "octav", "gptq")


def embed_method_error(method: str, bits: int | None, needs: str = "--embed-bits", sym: bool = False) -> str | None:
    """The one-line CLI error for ``--embed-method`` / ``--embed-sym`` (None when usable): a known method, and any
    method but the default, or ``--embed-sym``, only together with ``--embed-bits`` (``needs`` names what else the
    command requires)."""
    if method not in HEAD_METHODS:
        return f"--embed-method must be one of {', '.join(HEAD_METHODS)}, got {method!r}"
    if method != "rtn" and not bits:
        return f"--embed-method needs {needs}"
    if sym and not bits:
        return f"--embed-sym needs {needs}"
    return None


def embedding_paths(model: nn.Module) -> tuple[str, str]:
    """Module paths of the input embedding and the lm_head."""
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(model.get_input_embeddings())], names[id(model.get_output_embeddings())]


@torch.no_grad()
def head_hessian(model: nn.Module, calib_ids: torch.Tensor) -> torch.Tensor:
    """``H = 2/T sum x x^T [d, d]`` of the lm_head's input over calibration windows ``calib_ids [n, L]`` (one
    forward per window through ``model``, which should already hold the quantized decoder layers)."""
    from ptq.passes.gptq import HessianAccumulator

    head = model.get_output_embeddings()
    acc = HessianAccumulator(head.weight.shape[1])
    hook = head.register_forward_hook(lambda m, inp, out: acc.add(inp[0].reshape(-1, inp[0].shape[-1])))
    try:
        for row in calib_ids:
            model(input_ids=row[None], use_cache=False)
    finally:
        hook.remove()
    return acc.H


@torch.no_grad()
def quantize_head(w: torch.Tensor, bits: int, group_size: int = 32, method: str = "rtn",
                  H: torch.Tensor | None = None, damp: float = 0.01, sym: bool = False) -> QuantizedWeight:
    """One ``QuantizedWeight`` of ``w [V, d]`` by ``method`` (``H [d, d]`` required for gptq); asymmetric, or
    symmetric (implicit zero 2^(bits-1)) with ``sym``."""
    if method not in HEAD_METHODS:
        raise ValueError(f"embedding quantizer must be one of {', '.join(HEAD_METHODS)}, got {method!r}")
    if method == "gptq":
        from ptq.passes.gptq import gptq_quantize

        if H is None:
            raise ValueError("gptq needs the lm_head input Hessian (head_hessian)")
        qw, _ = gptq_quantize(w, H, QuantSpec(bits, group_size, sym=sym), damp=damp, act_order=True,
                              static_groups=True)
        return qw
    clip = "none" if method == "rtn" else method
    return QuantizedWeight.from_float(w, QuantSpec(bits, group_size, sym=sym, clip=clip))


@torch.no_grad()
def quantize_embeddings(model: nn.Module, qweights: dict, bits: int, group_size: int = 32, method: str = "rtn",
                        calib_ids: torch.Tensor | None = None, sym: bool = False) -> tuple[dict, list]:
    """Quantize the (fp) embedding / lm_head of ``model`` in place: weights become the dequantized values and
    ``qweights[path]`` the `QuantizedWeight`. Modules already in ``qweights`` are kept. Returns
    ``(tied map {embedding path: lm_head path} or {}, paths quantized here)``. ``calib_ids [n, L]``: the
    calibration windows of ``method="gptq"``; ``sym``: symmetric codes (no zero points)."""
    emb_path, head_path = embedding_paths(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight.data_ptr() == emb.weight.data_ptr()
    done = []
    if head_path not in qweights:
        H = None
        if method == "gptq":
            if calib_ids is None:
                raise ValueError("--embed-method gptq needs calibration text (a tokenizer in the folder)")
            H = head_hessian(model, calib_ids)
        qw = quantize_head(head.weight.data, bits, group_size, method, H, sym=sym)
        head.weight.data.copy_(qw.dequantize())
        qweights[head_path] = qw
        done.append(head_path)
    if not tied and emb_path not in qweights:
        qw = quantize_head(emb.weight.data, bits, group_size, "rtn" if method == "gptq" else method, sym=sym)
        emb.weight.data.copy_(qw.dequantize())
        qweights[emb_path] = qw
        done.append(emb_path)
    return ({emb_path: head_path} if tied else {}), done
