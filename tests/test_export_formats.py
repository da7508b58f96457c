"""GPTQ and compressed-tensors exports: bit layouts, exact round trips through our readers, `compress()` end to end,
and loading the written checkpoints with transformers (optimum + gptqmodel / compressed-tensors)."""
from __future__ import annotations

import json

import pytest
import torch

from ptq.compress import CompressOptions, compress
from ptq.export.compressed_tensors import ActOrderUnsupported, CTSource, pack_ct, unpack_ct
from ptq.export.gptq_format import GPTQSource, pack_gptq, unpack_gptq
from ptq.model_io import full_model, open_weights
from ptq.quant.primitives import QuantSpec, compute_qparams, quantize
from ptq.quant.qweight import QuantizedWeight

K = 200  # groups of 32/48/128 do not divide it: short last group


def act_order_qw(w: torch.Tensor, spec: QuantSpec, seed: int = 0) -> QuantizedWeight:
    """GPTQ-style act-order weight: columns visited in a random order, consecutive groups of that order."""
    n, k = w.shape
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    gs = spec.gsize(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // gs).to(torch.int32)
    scale, zero = compute_qparams(w[:, perm], spec)
    codes = quantize(w, scale, zero, spec.bits, g_idx)
    return QuantizedWeight(codes, scale, None if spec.sym else zero, spec.bits, gs, g_idx)


def stream_words(codes_rows: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference packer, independent of primitives.pack: one Python integer bit stream per row, LSB first."""
    rows = []
    for row in codes_rows.tolist():
        acc = sum(int(c) << (i * bits) for i, c in enumerate(row))
        nwords = -(-len(row) * bits // 32)
        words = [(acc >> (32 * j)) & 0xFFFFFFFF for j in range(nwords)]
        rows.append([w - 2**32 if w >= 2**31 else w for w in words])
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [-1, 32, 48, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_roundtrip_exact(bits, gs, sym):
    torch.manual_seed(bits * 1000 + gs)
    qw = QuantizedWeight.from_float(torch.randn(24, K), QuantSpec(bits, gs, sym))
    for v1 in ([True, False] if sym else [False]):
        t = pack_gptq(qw, v1)
        assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (-(-K * bits // 32), 24)
        assert t["scales"].shape == (qw.scale.shape[1], 24) and t["scales"].dtype == torch.float16
        assert torch.equal(t["qweight"], stream_words(qw.codes, bits).t())  # packed along K, LSB first
        back = unpack_gptq(t, bits, gs, sym, v1)
        assert torch.equal(back.codes, qw.codes) and torch.equal(back.g_idx, qw.g_idx)
        assert torch.equal(back.scale, qw.scale.half().float())
        assert back.sym == sym and (sym or torch.equal(back.zero, qw.zero))
        ref = QuantizedWeight(qw.codes, qw.scale.half().float(), qw.zero, bits, qw.group_size, qw.g_idx)
        assert torch.equal(back.dequantize(), ref.dequantize())


def test_gptq_v1_zero_offset():
    qw = QuantizedWeight.from_float(torch.randn(16, 64), QuantSpec(4, 32, sym=True))
    assert torch.all(pack_gptq(qw, v1=True)["qzeros"] == 0x77777777)  # zero 8 stored as 7
    assert torch.all(pack_gptq(qw, v1=False)["qzeros"] == -0x77777778)  # 0x88888888 as int32
    asym = QuantizedWeight.from_float(torch.rand(16, 64), QuantSpec(4, 32, sym=False))  # all >= 0: zero 0
    assert (asym.zero == 0).any()
    with pytest.raises(ValueError, match="gptq_v2"):
        pack_gptq(asym, v1=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_act_order_roundtrip(bits, sym):
    torch.manual_seed(bits)
    qw = act_order_qw(torch.randn(24, K), QuantSpec(bits, 64, sym))
    assert qw.act_order
    back = unpack_gptq(pack_gptq(qw, sym), bits, 64, sym, sym)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.g_idx, qw.g_idx)
    ref = QuantizedWeight(qw.codes, qw.scale.half().float(), qw.zero, bits, 64, qw.g_idx)
    assert torch.equal(back.dequantize(), ref.dequantize())
    with pytest.raises(ActOrderUnsupported, match="--format gptq"):
        pack_ct(qw, torch.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [-1, 32, 48, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_ct_roundtrip_exact(bits, gs, sym):
    torch.manual_seed(bits * 1000 + gs + 7)
    n = 37  # zero points packed along N with a partial last word
    qw = QuantizedWeight.from_float(torch.randn(n, K), QuantSpec(bits, gs, sym))
    t = pack_ct(qw, torch.float32)
    assert t["weight_packed"].shape == (n, -(-K * bits // 32))
    assert torch.equal(t["weight_packed"], stream_words(qw.codes, bits))
    assert t["weight_shape"].tolist() == [n, K]
    if sym:
        assert "weight_zero_point" not in t
    else:
        assert t["weight_zero_point"].shape == (-(-n * bits // 32), qw.scale.shape[1])
        assert torch.equal(t["weight_zero_point"], stream_words(qw.zero.t().to(torch.int64), bits).t())
    back = unpack_ct(t, bits, gs)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.dequantize(), qw.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_ct_matches_library_packer(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    torch.manual_seed(bits)
    qw = QuantizedWeight.from_float(torch.randn(37, 96), QuantSpec(bits, 32, sym=False))
    t = pack_ct(qw, torch.float32)
    off = 2 ** (bits - 1)
    lib_w = helpers.pack_to_int32((qw.codes.to(torch.int32) - off).to(torch.int8), bits)
    lib_z = helpers.pack_to_int32((qw.zero.to(torch.int32) - off).to(torch.int8), bits, packed_dim=0)
    assert torch.equal(t["weight_packed"], lib_w) and torch.equal(t["weight_zero_point"], lib_z)


def test_gptq_reader_without_g_idx():
    """Old AutoGPTQ checkpoints (desc_act=False) may omit g_idx: contiguous groups are assumed."""
    from ptq.model_io import StateDictSource

    qw = QuantizedWeight.from_float(torch.randn(16, 128), QuantSpec(4, 32, sym=True))
    t = {f"m.{k}": v for k, v in pack_gptq(qw, v1=True).items() if k != "g_idx"}
    t["m.bias"] = torch.zeros(16)
    src = GPTQSource(StateDictSource(t), {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True})
    assert sorted(src.keys()) == ["m.bias", "m.weight"] and src.qweight("m.bias") is None
    back = src.qweight("m")
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.g_idx, qw.g_idx) and back.sym
    assert torch.allclose(src.get("m.weight"), qw.dequantize(), rtol=1e-3, atol=0)


def test_lut_weights_refused():
    qw = QuantizedWeight.from_float(torch.randn(8, 64), QuantSpec(4, 32))
    qw.lut = torch.randn(8, 16)
    with pytest.raises(ValueError, match="LUT"):
        pack_gptq(qw, True)
    with pytest.raises(ValueError, match="LUT"):
        pack_ct(qw, torch.float32)


# ---- end to end: compress() -> our reader ------------------------------------------------------------------


def _compress(src, out, fmt, sym, gs, bits=4):
    compress(CompressOptions(model=str(src), out=str(out), recipe="rtn", format=fmt, sym=sym, group_size=gs,
                             bits=bits))
    return json.loads((out / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("kind,fmt,sym,gs,bits", [
    ("llama", "gptq", True, 32, 4), ("llama", "gptq", False, 48, 3), ("qwen2", "gptq", False, 32, 4),
    ("opt", "gptq", True, -1, 8), ("llama-gqa", "compressed-tensors", True, 32, 4),
    ("qwen2", "compressed-tensors", False, 48, 3), ("opt", "compressed-tensors", False, -1, 2)])
def test_compress_reads_back_exactly(tiny_models, tmp_path, kind, fmt, sym, gs, bits):
    src = tiny_models[kind]
    qc = _compress(src, tmp_path / "out", fmt, sym, gs, bits)
    spec = QuantSpec(bits, gs, sym)
    reader = open_weights(tmp_path / "out")
    assert isinstance(reader, GPTQSource if fmt == "gptq" else CTSource)
    orig = open_weights(src)
    if fmt == "gptq":
        assert qc["checkpoint_format"] == ("gptq" if sym else "gptq_v2") and qc["desc_act"] is False
        assert (qc["bits"], qc["group_size"], qc["sym"]) == (bits, gs, sym)
    else:
        w = qc["config_groups"]["group_0"]["weights"]
        assert (w["num_bits"], w["symmetric"], w["strategy"]) == (bits, sym, "channel" if gs == -1 else "group")
    assert set(reader.keys()) == set(orig.keys())
    nq = 0
    for name in orig.keys():
        path = name[: -len(".weight")]
        qw = reader.qweight(path) if name.endswith(".weight") else None
        if qw is None:
            assert torch.equal(reader.get(name), orig.get(name)), name
            continue
        nq += 1
        exp = QuantizedWeight.from_float(orig.get(name), spec)  # RTN is data-free: the in-memory result
        if fmt == "gptq":
            exp.scale = exp.scale.half().float()  # GPTQ stores fp16 scales
        assert torch.equal(qw.codes, exp.codes) and torch.equal(qw.g_idx, exp.g_idx)
        assert torch.equal(reader.get(name), exp.dequantize()), name
    assert nq == 2 * (6 if kind == "opt" else 7)


# ---- loaders others use ----------------------------------------------------------------------------------------


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.slow  # gptqmodel import + TorchLinear compile: 30-120 s on the shared box
@pytest.mark.parametrize("kind,sym", [("llama", True), ("llama", False), ("qwen2", False)])
def test_gptq_checkpoint_loads_in_transformers(tiny_models, tmp_path, ids, kind, sym):
    """Acceptance: the GPTQ export loads with transformers (optimum + gptqmodel, CPU torch kernel) and matches
    our dequantized model (fp16 kernel: ~1e-3 relative)."""
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM, GPTQConfig

    out = tmp_path / "gptq"
    _compress(tiny_models[kind], out, "gptq", sym, 32)
    ours, _ = full_model(out)
    ref = _logits(ours, ids)
    m = AutoModelForCausalLM.from_pretrained(out, quantization_config=GPTQConfig(bits=4, backend="torch"),
                                             dtype=torch.float16)
    assert type(m.model.layers[0].mlp.down_proj).__name__ == "TorchLinear"
    got = _logits(m, ids)
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert err < 3e-3, err
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.97


@pytest.mark.parametrize("sym", [True, False])
def test_ct_checkpoint_loads_in_transformers(tiny_models, tmp_path, ids, sym):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out = tmp_path / "ct"
    _compress(tiny_models["llama"], out, "compressed-tensors", sym, 32)
    ours, _ = full_model(out)
    kw = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw)
    assert torch.allclose(_logits(m, ids), _logits(ours, ids), atol=1e-5, rtol=0)
    # decompressed to dense Linear on load / first forward: the very weights our reader dequantizes
    assert torch.equal(m.model.layers[1].mlp.up_proj.weight, ours.model.layers[1].mlp.up_proj.weight)


@pytest.mark.slow
def test_gptq_act_order_checkpoint_loads_in_transformers(tiny_models, tmp_path, ids):
    """GPTQ pass with act-order (non-trivial g_idx, desc_act=True) -> transformers/gptqmodel agrees with our reader."""
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM, GPTQConfig

    out = tmp_path / "gptq-ao"
    compress(CompressOptions(model=str(tiny_models["llama"]), out=str(out), recipe="gptq", format="gptq", sym=True,
                             group_size=32, nsamples=4, seqlen=64))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True and qc["checkpoint_format"] == "gptq"
    reader = open_weights(out)
    assert reader.qweight("model.layers.0.mlp.down_proj").act_order
    ours, _ = full_model(out)
    ref = _logits(ours, ids)
    m = AutoModelForCausalLM.from_pretrained(out, quantization_config=GPTQConfig(bits=4, backend="torch"),
                                             dtype=torch.float16)
    got = _logits(m, ids)
    assert (got - ref).abs().max().item() / ref.abs().max().item() < 3e-3
