"""Fused decoder graph for Llama-family models (llama, mistral, qwen2): onnxruntime's contrib ops, written node by
node from the model's modules and our `QuantizedWeight`s (codes / scales / zero points re-packed, never
re-quantized).

Per decoder layer ``i`` (hidden ``x [b, s, H]``, ``r`` the residual stream):

    h, r  = SkipSimplifiedLayerNormalization(x, r, input_layernorm.w)      (layer 0: SimplifiedLayerNormalization)
    qkv   = MatMulNBits(h, [Wq; Wk; Wv])                                     one packed kernel [b, s, (nh + 2 kvh) d]
    a, present.i.key, present.i.value = GroupQueryAttention(qkv, past.i.key, past.i.value, seqlens_k, total_len,
                                              cos_cache, sin_cache; do_rotary=1)
    h, r  = SkipSimplifiedLayerNormalization(MatMulNBits(a, Wo), r, post_attention_layernorm.w)
    x     = MatMulNBits(silu(MatMulNBits(h, Wg)) * MatMulNBits(h, Wu), Wd)

then ``logits = lm_head(SkipSimplifiedLayerNormalization(x, r, norm.w))``. RMSNorm ``y = x / sqrt(mean(x^2) + eps) * w``.
GroupQueryAttention applies RoPE itself (``do_rotary``) from ``cos_cache / sin_cache [context, d/2]``, computed
by the model's own rotary module for positions ``0..context-1`` (so rope scaling and attention_scaling are the
model's); positions come from ``seqlens_k = sum(attention_mask, 1) - 1`` (no padding). The KV cache is
``past_key_values.i.key [b, kvh, past, d]`` in, ``present.i.key`` out: fed back step by step (our decode loop) or
bound to one max-length buffer shared by past and present (onnxruntime-genai, ``past_present_share_buffer``).
Embedding: ``Gather`` (fp) or ``GatherBlockQuantized`` (quantized, or tied with a quantized lm_head, reading the
lm_head's codes). Linears whose weight is not quantized (or not expressible, see onnx_quant.to_blocks) are fp32
``MatMul``; biases (qwen2 q/k/v) are MatMulNBits' bias input.

Not covered (the caller uses the plain torch.onnx graph instead; `unsupported_reason` says why): other
families, activations other than SiLU, sliding-window attention shorter than the context, dynamic / longrope
rope, partial rotary, q/k norms.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ptq.export.onnx_graph import input_names, kv_layout, output_names
from ptq.export.onnx_quant import MS, NotExpressible, matmulnbits_arrays, to_blocks
from ptq.quant.primitives import pack
from ptq.quant.qweight import QuantizedWeight

FAMILIES = ("llama", "mistral", "qwen2")


def unsupported_reason(model: nn.Module) -> str | None:
    """None when `build_fused` covers ``model``, else why not (one line)."""
    cfg = model.config
    mt = getattr(cfg, "model_type", "?")
    if mt not in FAMILIES:
        return f"model_type {mt!r}: the fused graph covers {', '.join(FAMILIES)}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (fused graph: silu)"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype in ("dynamic", "longrope"):
        return f"rope_type {rtype!r} depends on the sequence length"
    if float(rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        return "partial rotary embedding"
    sw = getattr(cfg, "sliding_window", None)
    if sw and getattr(cfg, "use_sliding_window", True) and sw < cfg.max_position_embeddings:
        return f"sliding-window attention ({sw} < context {cfg.max_position_embeddings})"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "norm"):
        return "unexpected module layout (model.layers / model.rotary_emb / model.norm)"
    for layer in layers:
        at = layer.self_attn
        if not all(hasattr(at, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) or hasattr(at, "q_norm"):
            return "unexpected attention module (q/k/v/o projections without q/k norms expected)"
        if not all(type(m).__name__.endswith("RMSNorm") for m in (layer.input_layernorm,
                                                                    layer.post_attention_layernorm)):
            return "norms are not RMSNorm"
    return None


class _Graph:
    """Nodes and initializers with unique names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.names: set[str] = set()

    def init(self, name: str, arr) -> str:
        base, i = name, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        t = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        self.inits.append(t)
        return name

    def node(self, op: str, ins: list[str], name: str, n_out: int = 1, outs: list[str] | None = None,
             domain: str = "", **attrs) -> list[str]:
        outs = outs if outs is not None else [f"{name}/out{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op, ins, outs, name=name, domain=domain, **attrs))
        return outs


class FusedBuilder:
    """Builds the fused graph of ``model`` (fp32 fake-quant, weights = dequantized ``qweights``)."""

    def __init__(self, model: nn.Module, qweights: dict[str, QuantizedWeight], accuracy_level: int = 4,
                 tied: dict[str, str] | None = None):
        self.model, self.q, self.acc = model, qweights, accuracy_level
        self.tied = tied or {}
        self.mods = dict(model.named_modules())
        self.g = _Graph()
        self.report: dict = {"replaced": {}, "fallback_fp": {}}
        self._blocked: dict[str, object] = {}
        self._shared: dict[str, tuple[str, str, str]] = {}  # lm_head path -> packed data / scales / zp

    # ------------------------------------------------------------------ weights
    def blocked(self, path: str):
        """`Blocked` form of ``path``'s QuantizedWeight, or None (fp: not quantized / not expressible)."""
        if path not in self._blocked:
            qw, bl = self.q.get(path), None
            if qw is not None:
                try:
                    bl = to_blocks(qw)
                except NotExpressible as e:
                    self.report["fallback_fp"][path] = str(e)
            self._blocked[path] = bl
        return self._blocked[path]

    def linears(self, x: str, paths: list[str], tag: str) -> list[str]:
        """``x @ W^T (+ b)`` for each module in ``paths``: one packed MatMulNBits (output ``[.., sum N]``) when all
        are quantized with the same container bits / block / input permutation, else one node per module."""
        bls = [self.blocked(p) for p in paths]
        first = bls[0]
        if len(paths) > 1 and first is not None and all(
                b is not None and b.bits == first.bits and b.block == first.block and b.nb == first.nb and
                ((b.perm is None and first.perm is None) or (b.perm is not None and first.perm is not None and
                                                              torch.equal(b.perm, first.perm))) for b in bls):
            return [self._nbits(x, paths, bls, tag)]
        return [self._nbits(x, [p], [b], p) if b is not None else self._fp(x, p) for p, b in zip(paths, bls)]

    def _bias(self, paths: list[str]) -> np.ndarray | None:
        mods = [self.mods[p] for p in paths]
        if all(m.bias is None for m in mods):
            return None
        return np.concatenate([m.bias.detach().float().numpy() if m.bias is not None else
                               np.zeros(m.out_features, np.float32) for m in mods])

    def _nbits(self, x: str, paths: list[str], bls: list, tag: str) -> str:
        g, bl0 = self.g, bls[0]
        if bl0.perm is not None:
            x = g.node("Gather", [x, g.init(f"{tag}.act_order_perm", bl0.perm.numpy().astype(np.int64))],
                       f"{tag}/ActOrderGather", axis=-1)[0]
        n = sum(b.codes.shape[0] for b in bls)
        k = self.q[paths[0]].shape[1]
        shared = self._shared.get(paths[0]) if len(paths) == 1 else None
        if shared is not None:  # tied lm_head: the GatherBlockQuantized table viewed as [V, nb, blob]
            data, sc, zp = shared
            shape = g.init(f"{tag}.qweight_shape", np.array([n, bl0.nb, bl0.block * bl0.bits // 8], np.int64))
            ins = [g.node("Reshape", [data, shape], f"{tag}/Reshape")[0], sc, zp if bl0.zero_needed else ""]
        else:
            arrs = [matmulnbits_arrays(b) for b in bls]
            ins = [g.init(f"{tag}.qweight", np.concatenate([a["B"] for a in arrs])),
                   g.init(f"{tag}.scales", np.concatenate([a["scales"] for a in arrs]))]
            if any(b.zero_needed for b in bls):  # explicit for all (sym rows: 2^(bits-1))
                zps = [pack(b.zero, b.bits, pad_value=2 ** (b.bits - 1)).numpy() for b in bls]
                ins.append(g.init(f"{tag}.qzeros", np.concatenate(zps)))
            else:
                ins.append("")
        bias = self._bias(paths)
        if bias is not None:
            ins += ["", g.init(f"{tag}.bias", bias)]
        while ins[-1] == "":
            ins.pop()
        attrs = dict(K=k, N=n, bits=bl0.bits, block_size=bl0.block)
        if self.acc:
            attrs["accuracy_level"] = self.acc
        for p in paths:
            self.report["replaced"][p] = "MatMulNBits"
        return g.node("MatMulNBits", [x] + ins, f"{tag}/MatMulNBits", domain=MS, **attrs)[0]

    def _fp(self, x: str, path: str) -> str:
        m = self.mods[path]
        w = m.weight.detach().float()
        y = self.g.node("MatMul", [x, self.g.init(f"{path}.weight_t", w.t().contiguous().numpy())],
                        f"{path}/MatMul")[0]
        if m.bias is not None:
            y = self.g.node("Add", [y, self.g.init(f"{path}.bias", m.bias.detach().float().numpy())],
                            f"{path}/Add")[0]
        return y

    def embedding(self, ids: str, emb_path: str, head_path: str) -> str:
        """Gather, or GatherBlockQuantized on the embedding's own codes or (tied) the lm_head's codes."""
        g = self.g
        src = emb_path if emb_path in self.q else self.tied.get(emb_path)
        bl = self.blocked(src) if src in self.q else None
        h = self.model.config.hidden_size
        if bl is None or bl.perm is not None or h % bl.block:
            if src is not None and src in self.q and bl is not None:
                self.report["fallback_fp"][emb_path] = "embedding needs contiguous groups dividing the hidden size"
            w = self.mods[emb_path].weight.detach().float().numpy()
            return g.node("Gather", [g.init(f"{emb_path}.weight", w), ids], f"{emb_path}/Gather", axis=0)[0]
        data = g.init(f"{src}.qweight_2d", pack(bl.codes, bl.bits).numpy())  # [V, H*bits/8], LSB-first along H
        sc = g.init(f"{src}.scales", bl.scale.numpy().astype(np.float32))
        zp = g.init(f"{src}.qzeros", pack(bl.zero, bl.bits, pad_value=2 ** (bl.bits - 1)).numpy())  # default 0
        if src == head_path:
            self._shared[head_path] = (data, sc, zp)
        self.report["replaced"][emb_path] = "GatherBlockQuantized"
        return g.node("GatherBlockQuantized", [data, ids, sc, zp], f"{emb_path}/GatherBlockQuantized", domain=MS,
                      gather_axis=0, quantize_axis=1, block_size=bl.block, bits=bl.bits)[0]

    def lm_head(self, x: str, emb_path: str, head_path: str) -> str:
        head = self.mods[head_path]
        if self.blocked(head_path) is not None:
            return self.linears(x, [head_path], head_path)[0]
        if head.weight.data_ptr() == self.mods[emb_path].weight.data_ptr() and head.bias is None:
            # tied, fp: MatMul(x, Transpose(E)) reads the one table in the file (ORT folds the Transpose)
            table = next(t.name for t in self.g.inits if t.name == f"{emb_path}.weight")
            wt = self.g.node("Transpose", [table], f"{head_path}/Transpose", perm=[1, 0])[0]
            return self.g.node("MatMul", [x, wt], f"{head_path}/MatMul")[0]
        return self._fp(x, head_path)

    # ------------------------------------------------------------------ graph
    def rope_caches(self) -> tuple[str, str, int]:
        """``cos, sin [context, d/2]`` from the model's rotary module (non-interleaved halves)."""
        cfg = self.model.config
        ctx = int(cfg.max_position_embeddings)
        _, _, hd = kv_layout(cfg)
        with torch.no_grad():
            cos, sin = self.model.model.rotary_emb(torch.zeros(1), torch.arange(ctx)[None])
        cos, sin = cos[0].float(), sin[0].float()
        if cos.shape[-1] != hd or not torch.equal(cos[:, :hd // 2], cos[:, hd // 2:]):
            raise NotExpressible("rotary caches are not the half-split layout GroupQueryAttention reads")
        return (self.g.init("cos_cache", cos[:, :hd // 2].contiguous().numpy()),
                self.g.init("sin_cache", sin[:, :hd // 2].contiguous().numpy()), ctx)

    def build(self) -> onnx.ModelProto:
        cfg, g, model = self.model.config, self.g, self.model
        n_layers, kvh, hd = kv_layout(cfg)
        nh = cfg.num_attention_heads
        emb_path, head_path = _embedding_paths(model)
        cos, sin, _ = self.rope_caches()
        one = g.init("one_i64", np.array(1, np.int64))
        axis1 = g.init("axes_1", np.array([1], np.int64))
        # seqlens_k [b] int32 = sum(mask) - 1 ; total_sequence_length scalar int32 = mask.shape[1]
        summed = g.node("ReduceSum", ["attention_mask", axis1], "mask/ReduceSum", keepdims=0)[0]
        seqlens = g.node("Cast", [g.node("Sub", [summed, one], "mask/Sub")[0]], "mask/Cast_seqlens",
                         to=TensorProto.INT32)[0]
        shape = g.node("Shape", ["attention_mask"], "mask/Shape")[0]
        total = g.node("Cast", [g.node("Gather", [shape, one], "mask/Gather", axis=0)[0]], "mask/Cast_total",
                       to=TensorProto.INT32)[0]
        x = self.embedding("input_ids", emb_path, head_path)
        resid, carry = x, None
        for i, layer in enumerate(model.model.layers):
            p = f"model.layers.{i}"
            h, resid = self._norm(carry, resid, layer.input_layernorm, f"{p}.input_layernorm")
            at = f"{p}.self_attn"
            qkv = self.linears(h, [f"{at}.q_proj", f"{at}.k_proj", f"{at}.v_proj"], f"{at}.qkv_proj")
            q, k, v = (qkv[0], "", "") if len(qkv) == 1 else qkv
            a = g.node("GroupQueryAttention",
                       [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total, cos, sin],
                       f"{at}/GroupQueryAttention", outs=[f"{at}/attn", f"present.{i}.key", f"present.{i}.value"],
                       domain=MS, num_heads=nh, kv_num_heads=kvh, scale=float(layer.self_attn.scaling),
                       do_rotary=1, rotary_interleaved=0, local_window_size=-1)[0]
            o = self.linears(a, [f"{at}.o_proj"], f"{at}.o_proj")[0]
            h, resid = self._norm(o, resid, layer.post_attention_layernorm, f"{p}.post_attention_layernorm")
            mp = f"{p}.mlp"
            gate, up = self.linears(h, [f"{mp}.gate_proj"], f"{mp}.gate_proj")[0], \
                self.linears(h, [f"{mp}.up_proj"], f"{mp}.up_proj")[0]
            sig = g.node("Sigmoid", [gate], f"{mp}/Sigmoid")[0]
            act = g.node("Mul", [g.node("Mul", [gate, sig], f"{mp}/SiLU")[0], up], f"{mp}/Mul")[0]
            carry = self.linears(act, [f"{mp}.down_proj"], f"{mp}.down_proj")[0]
        h, _ = self._norm(carry, resid, model.model.norm, "model.norm")
        logits = self.lm_head(h, emb_path, head_path)
        producer = next(nd for nd in reversed(g.nodes) if logits in nd.output)
        producer.output[list(producer.output).index(logits)] = "logits"  # the graph output itself: no Identity copy
        return self._model(n_layers, kvh, hd)

    def _norm(self, x: str | None, resid: str, norm: nn.Module, tag: str) -> tuple[str, str]:
        """RMSNorm of ``x + resid`` (``x`` None: of ``resid``) -> (normed, new residual)."""
        w = self.g.init(f"{tag}.weight", norm.weight.detach().float().numpy())
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        if x is None:
            return self.g.node("SimplifiedLayerNormalization", [resid, w], f"{tag}/SimplifiedLayerNorm",
                               axis=-1, epsilon=eps, stash_type=1)[0], resid
        out = self.g.node("SkipSimplifiedLayerNormalization", [x, resid, w], f"{tag}/SkipSimplifiedLayerNorm",
                          outs=[f"{tag}/out", "", "", f"{tag}/residual"], domain=MS, epsilon=eps)
        return out[0], out[3]

    def _model(self, n_layers: int, kvh: int, hd: int) -> onnx.ModelProto:
        v = self.model.config.vocab_size
        ins = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
               helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_seq"])]
        ins += [helper.make_tensor_value_info(nm, TensorProto.FLOAT, ["batch", kvh, "past_seq", hd])
                for nm in input_names(n_layers)[2:]]
        outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", v])]
        outs += [helper.make_tensor_value_info(nm, TensorProto.FLOAT, ["batch", kvh, "total_seq", hd])
                 for nm in output_names(n_layers)[1:]]
        graph = helper.make_graph(self.g.nodes, "ptq_fused_decoder", ins, outs, self.g.inits)
        return helper.make_model(graph, ir_version=10, producer_name="ptq",
                                 opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])


def _embedding_paths(model: nn.Module) -> tuple[str, str]:
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(model.get_input_embeddings())], names[id(model.get_output_embeddings())]


def build_fused(model: nn.Module, qweights: dict[str, QuantizedWeight], accuracy_level: int = 4,
                tied: dict[str, str] | None = None) -> tuple[onnx.ModelProto, dict]:
    """``(graph, {"replaced": {module: op}, "fallback_fp": {module: reason}})``; see the module doc. Raises
    NotExpressible when `unsupported_reason` is not None."""
    why = unsupported_reason(model)
    if why:
        raise NotExpressible(why)
    b = FusedBuilder(model.eval(), qweights, accuracy_level, tied)
    proto = b.build()
    return proto, b.report
