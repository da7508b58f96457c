"""fp32 ONNX graph of a causal LM with the KV cache as explicit inputs/outputs, plus the map from the graph's
weight-carrying MatMul/Gemm/Gather nodes back to the torch modules (so a rewrite pass can swap in integer kernels).

Graph (one graph for prefill and decode; ``torch.onnx.export(dynamo=True, opset_version=21)`` of `KVCacheLM`):
  inputs   ``input_ids [batch, seq]`` int64, ``attention_mask [batch, total_seq]`` int64 (ones; total = past + seq),
           ``past_key_values.{i}.key|value [batch, kv_heads, past_seq, head_dim]`` fp32 (past_seq may be 0)
  outputs  ``logits [batch, seq, vocab]``, ``present.{i}.key|value [batch, kv_heads, total_seq, head_dim]``
Prefill feeds empty (``past_seq = 0``) caches; each decode step feeds the previous step's ``present.*``.

Mapping: the dynamo exporter records ``pkg.torch.onnx.name_scopes`` on every node; for ``aten.linear`` the
second-to-last scope is the module path. Every mapped weight initializer is then checked to be exactly ``W^T``
(MatMul, ``[K, N]``) or ``W`` (Gemm transB=1, ``[N, K]``) of that module — a mismatch is an error, never a guess.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

WRAP = "m"  # attribute name of the wrapped model inside KVCacheLM (prefix of every name scope)
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of initializers above which the model is saved with external data


def kv_layout(config) -> tuple[int, int, int]:
    """``(num_layers, kv_heads, head_dim)`` of a decoder-only config (Llama/Mistral/Qwen2/OPT)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv, hd


def input_names(n_layers: int) -> list[str]:
    return ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{t}" for i in range(n_layers)
                                              for t in ("key", "value")]


def output_names(n_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{t}" for i in range(n_layers) for t in ("key", "value")]


class KVCacheLM(nn.Module):
    """``(input_ids [b, s], attention_mask [b, p+s], past: 2L x [b, kv, p, d]) -> (logits [b, s, V], 2L presents)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        setattr(self, WRAP, model)
        self.n_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, past):
        from transformers import DynamicCache

        model = getattr(self, WRAP)
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)],
                             config=model.config)
        out = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        flat = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


@torch.no_grad()
def export_graph(model: nn.Module, opset: int = 21) -> onnx.ModelProto:
    """Export ``model`` (fp32, eval) to an in-memory ONNX model with KV-cache inputs/outputs (see module doc).

    Traced with batch 2, seq 4, past 3 so no dimension is specialized to 0/1.
    """
    from torch.export import Dim

    model = model.eval()
    n, kv, hd = kv_layout(model.config)
    b, s, p = 2, 4, 3
    ids = torch.randint(0, model.config.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.int64)
    past = tuple(torch.zeros(b, kv, p, hd) for _ in range(2 * n))
    D = Dim.DYNAMIC
    dyn = ({0: D, 1: D}, {0: D, 1: D}, tuple({0: D, 2: D} for _ in range(2 * n)))
    prog = torch.onnx.export(KVCacheLM(model).eval(), (ids, mask, past), dynamic_shapes=dyn, input_names=input_names(n),
                             output_names=output_names(n), opset_version=opset, dynamo=True, verbose=False)
    proto = prog.model_proto
    _name_dims(proto, n)
    strip_metadata(proto)
    return proto


def strip_metadata(proto: onnx.ModelProto, keep: tuple[str, ...] = ("pkg.torch.onnx.name_scopes",)) -> None:
    """Drop the exporter's per-node debug metadata (stack traces, fx nodes: most of a small model's file) except
    ``keep`` (the name scopes `weight_sites` maps modules with)."""
    for node in proto.graph.node:
        props = [p for p in node.metadata_props if p.key in keep]
        del node.metadata_props[:]
        node.metadata_props.extend(props)


def _name_dims(proto: onnx.ModelProto, n_layers: int) -> None:
    """Give the symbolic dims readable names (batch, seq, total_seq, past_seq) everywhere in the graph."""
    g = proto.graph
    ins = {i.name: i for i in g.input}
    ren: dict[str, str] = {}

    def add(sym: str, new: str) -> None:
        if sym and sym not in ren:  # static dims have no dim_param: never touch them
            ren[sym] = new

    def dims(vi):
        return vi.type.tensor_type.shape.dim

    for name, pos, new in [("input_ids", 0, "batch"), ("input_ids", 1, "seq"), ("attention_mask", 0, "batch"),
                           ("attention_mask", 1, "total_seq")]:
        add(dims(ins[name])[pos].dim_param, new)
    for i in range(n_layers):
        for t in ("key", "value"):
            d = dims(ins[f"past_key_values.{i}.{t}"])
            add(d[0].dim_param, "batch")
            add(d[2].dim_param, "past_seq")
    outs = {o.name: o for o in g.output}
    for i in range(n_layers):
        for t in ("key", "value"):
            d = dims(outs[f"present.{i}.{t}"])
            add(d[2].dim_param, "total_seq")
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        for d in dims(vi):
            if d.dim_param and d.dim_param in ren:
                d.dim_param = ren[d.dim_param]


@dataclass
class WeightSite:
    """One node that applies a module's weight: ``kind`` is matmul (init ``W^T [K, N]``, or ``W`` through a
    ``Transpose`` node for a tied lm_head), gemm (transB=1, init ``W [N, K]``, optional bias C) or gather
    (embedding ``[V, H]``)."""

    node: onnx.NodeProto
    module: str
    init: str
    kind: str


def _scope_module(node: onnx.NodeProto) -> str | None:
    md = {p.key: p.value for p in node.metadata_props}
    raw = md.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return None
    scopes = ast.literal_eval(raw)
    if len(scopes) < 2:
        return None
    mod = scopes[-2]
    return mod[len(WRAP) + 1:] if mod.startswith(WRAP + ".") else None


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def weight_sites(proto: onnx.ModelProto, model: nn.Module, check: bool = True) -> list[WeightSite]:
    """Map every MatMul/Gemm/Gather that consumes a weight initializer to its nn.Linear / nn.Embedding module.

    With ``check`` the initializer must equal the module's weight exactly (fp32 bits), else ValueError.
    """
    inits = {i.name: i for i in proto.graph.initializer}
    prod = {o: n for n in proto.graph.node for o in n.output}
    modules = dict(model.named_modules())
    sites = []
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Gather") or len(node.input) < 2:
            continue
        w_in = node.input[0] if node.op_type == "Gather" else node.input[1]
        transposed = False  # MatMul(x, Transpose(W)): a tied lm_head reading the embedding table
        if node.op_type == "MatMul" and w_in not in inits and w_in in prod:
            t = prod[w_in]
            if t.op_type == "Transpose" and list(_attr(t, "perm", [])) == [1, 0] and t.input[0] in inits:
                w_in, transposed = t.input[0], True
        if w_in not in inits:
            continue
        path = _scope_module(node)
        mod = modules.get(path) if path is not None else None
        if node.op_type == "Gather":
            if not isinstance(mod, nn.Embedding):
                continue
            kind, expect = "gather", lambda m: m.weight
        elif isinstance(mod, nn.Linear):
            if node.op_type == "Gemm":
                if _attr(node, "transB", 0) != 1 or _attr(node, "transA", 0) != 0 or _attr(node, "alpha", 1.0) != 1.0:
                    raise ValueError(f"unexpected Gemm form at {node.name} ({path})")
                kind, expect = "gemm", lambda m: m.weight
            else:
                kind, expect = "matmul", (lambda m: m.weight) if transposed else (lambda m: m.weight.t())
        else:
            continue
        if check:
            arr = numpy_helper.to_array(inits[w_in])
            ref = expect(mod).detach().float().cpu().numpy()
            if arr.shape != ref.shape or not np.array_equal(arr, ref):
                raise ValueError(f"ONNX initializer {w_in} of node {node.name} is not the weight of {path}")
        sites.append(WeightSite(node, path, w_in, kind))
    return sites


def save_model(proto: onnx.ModelProto, path: Path, external: bool = False) -> list[Path]:
    """Write ``proto`` to ``path``; the tensors go to ``<name>.data`` (external data) when ``external`` or above
    ~1.8 GB of initializers (the 2 GB protobuf limit). External data is what onnxruntime maps from the file
    instead of parsing into the protobuf, so a session holds the weights once (SmolLM2 int4: ~40 MiB lower peak
    RSS). Returns the files written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    total = sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
    if not external and total < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(path))
        return [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    data.chmod(path.stat().st_mode & 0o777)  # onnx creates it owner-only
    return [path, data]
