"""Mixed precision under a bit budget (ptq.mixed_precision): the allocation meets the average and is near the
brute-force optimum, the chosen bits go into the manifest and the GPTQ ``dynamic`` / compressed-tensors
``config_groups``, our readers and transformers (compressed-tensors) / GPTQModel read them back exactly."""
from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from ptq.compress import CompressOptions, compress
from ptq.export.gptq_format import dynamic_override
from ptq.mixed_precision import _hull, allocate, allocate_units, linear_costs, plan_from_scores
from ptq.model_io import full_model, open_weights
from ptq.quant.primitives import QuantSpec
from ptq.quant.qweight import QuantizedWeight
from ptq.validate import UsageError

WIDTHS = (2, 3, 4, 8)


def _random_problem(seed: int, n: int):
    rng = random.Random(seed)
    costs, params = {}, {}
    for i in range(n):
        s = rng.uniform(0.1, 10) ** 2
        costs[f"m{i}"] = {b: s * 4.0 ** -b * rng.uniform(0.8, 1.2) for b in WIDTHS}
        params[f"m{i}"] = rng.choice([64, 128, 256, 512])
    return costs, params


def _avg(bits, params):
    return sum(bits[m] * params[m] for m in bits) / sum(params.values())


@pytest.mark.parametrize("seed", range(6))
def test_allocation_meets_budget_near_optimum(seed):
    costs, params = _random_problem(seed, 6)
    target = 3.5
    bits = allocate(costs, params, target, WIDTHS)
    assert _avg(bits, params) <= target + 1e-12
    total = sum(params.values())
    slack = target * total - sum(bits[m] * params[m] for m in bits)
    # no single upgrade still fits: the average is as close to the target as one step allows
    assert all(slack < (b - bits[m]) * params[m] for m in bits for b in WIDTHS if b > bits[m])
    best = min(sum(costs[m][b] for m, b in zip(costs, combo))
               for combo in itertools.product(WIDTHS, repeat=len(costs))
               if sum(params[m] * b for m, b in zip(costs, combo)) <= target * total)
    got = sum(costs[m][bits[m]] for m in bits)
    assert got <= 1.25 * best, (got, best)


def test_allocation_prefers_sensitive_modules():
    costs = {"a": {b: 100 * 4.0 ** -b for b in WIDTHS}, "b": {b: 4.0 ** -b for b in WIDTHS}}
    bits = allocate(costs, {"a": 100, "b": 100}, 3.0, WIDTHS)
    assert bits["a"] > bits["b"] and _avg(bits, {"a": 100, "b": 100}) == 3.0
    assert allocate(costs, {"a": 1, "b": 1}, 2.0, WIDTHS) == {"a": 2, "b": 2}
    assert allocate(costs, {"a": 1, "b": 1}, 8.0, WIDTHS) == {"a": 8, "b": 8}


def test_units_share_one_width():
    costs, params = _random_problem(1, 6)
    units = {"u0": ["m0", "m1", "m2"], "u1": ["m3"], "u2": ["m4", "m5"]}
    bits = allocate_units(costs, params, units, 3.5, WIDTHS)
    for ms in units.values():
        assert len({bits[m] for m in ms}) == 1
    assert _avg(bits, params) <= 3.5


def test_starved_units_keep_the_base_width():
    """A unit whose Hessian saw too few tokens (a starved MoE expert: zero cost at every width) is not pushed to
    2 bits; the others share the rest of the budget."""
    costs, params = _random_problem(2, 6)
    units = {f"u{i}": [f"m{i}"] for i in range(6)}
    costs["m5"] = {b: 0.0 for b in WIDTHS}
    plan = plan_from_scores(costs, params, units, {"u5": 3}, 3.5, WIDTHS)
    assert plan.bits["m5"] == 3 and plan.pinned == ["u5"] and plan.average_bits <= 3.5
    assert plan.manifest()["pinned_units"] == ["u5"]
    free = plan_from_scores(costs, params, units, {}, 3.5, WIDTHS)
    assert free.bits["m5"] == 2 and free.pinned == []


def test_hull_drops_dominated_widths():
    assert _hull({2: 10.0, 3: 9.0, 4: 1.0, 8: 0.5}) == [2, 4, 8]  # 3 lies above the 2-4 chord
    assert _hull({2: 4.0, 3: 2.0, 4: 1.0, 8: 1.0}) == [2, 3, 4]  # 8 buys nothing


def test_linear_costs_are_hessian_weighted_errors():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(200, 64, generator=g)
    H = 2 / x.shape[0] * x.T @ x
    spec = QuantSpec(4, 32, False)
    c = linear_costs(w, H, spec, WIDTHS)
    e = w - QuantizedWeight.from_float(w, QuantSpec(3, 32, False)).dequantize()
    assert c[3] == pytest.approx(2 * (x @ e.T).pow(2).sum().item() / x.shape[0], rel=1e-4)
    assert c[2] > c[3] > c[4] > c[8] > 0


# ---- end to end ----------------------------------------------------------------------------------------------

def _mixed(src, out, fmt, recipe="rtn", bits=3.5, **kw):
    return compress(CompressOptions(model=str(src), out=str(out), recipe=recipe, format=fmt, bits=bits,
                                    group_size=32, sym=kw.pop("sym", False), nsamples=4, seqlen=64, **kw))


def _check_manifest(out, report):
    man = json.loads((out / "manifest.json").read_text())
    mp = man["mixed_precision"]
    assert mp == {k: v for k, v in report["mixed_precision"].items() if k in mp}
    bits = mp["bits"]
    assert len(bits) == 14 and set(bits.values()) <= set(WIDTHS) and len(set(bits.values())) > 1
    params = report["mixed_precision"]["params"]
    avg = sum(bits[m] * params[m] for m in bits) / sum(params.values())
    assert avg == pytest.approx(mp["average_bits"]) and avg <= 3.5 and avg > 3.5 - 4096 * 6 / sum(params.values())
    for p in ("model.layers.0.self_attn.", "model.layers.1.mlp."):  # q/k/v and gate/up share a width
        group = [b for m, b in bits.items() if m.startswith(p) and not m.endswith(("o_proj", "down_proj"))]
        assert len(set(group)) == 1
    return bits


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_mixed_rtn_export_roundtrip(tiny_models, tmp_path, fmt):
    src = tiny_models["llama"]
    out = tmp_path / "mixed"
    report = _mixed(src, out, fmt)
    bits = _check_manifest(out, report)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    reader, orig = open_weights(out), open_weights(src)
    for path, b in bits.items():
        qw = reader.qweight(path)
        assert qw.bits == b, path
        exp = QuantizedWeight.from_float(orig.get(path + ".weight"), QuantSpec(b, 32, False))  # RTN: data-free
        if fmt == "gptq":
            exp.scale = exp.scale.half().float()
        assert torch.equal(qw.codes, exp.codes) and torch.equal(reader.get(path + ".weight"), exp.dequantize())
    if fmt == "gptq":
        base = qc["bits"]
        for path, b in bits.items():
            over = dynamic_override(qc.get("dynamic"), path)
            assert (over or {}).get("bits", base) == b
        assert all(k.startswith("+:") and k.endswith("$") for k in qc["dynamic"])
    else:
        groups = qc["config_groups"]
        assert groups["group_0"]["targets"] == ["Linear"]
        named = {t: g["weights"]["num_bits"] for g in groups.values() for t in g["targets"] if t != "Linear"}
        base = groups["group_0"]["weights"]["num_bits"]
        assert {p: named.get(p, base) for p in bits} == bits


def test_mixed_gptq_pass_uses_planned_bits(tiny_models, tmp_path):
    out = tmp_path / "g"
    report = _mixed(tiny_models["qwen2"], out, "gptq", recipe="gptq", bits=3.25)
    man = json.loads((out / "manifest.json").read_text())
    reader = open_weights(out)
    for path, b in man["mixed_precision"]["bits"].items():
        assert reader.qweight(path).bits == b
    assert report["mixed_precision"]["target_bits"] == 3.25
    assert "mixed precision scoring" in report["stages"]


def test_mixed_learned_rounding_keeps_planned_bits(tiny_models, tmp_path):
    """Learned rounding under a budget (refused before it declared ``mixed_bits``): every linear keeps the width
    the plan gave it (its GPTQ init's grid)."""
    out = tmp_path / "lr"
    report = _mixed(tiny_models["llama"], out, "gptq", recipe="learned-rounding", bits=3.5)
    bits = _check_manifest(out, report)
    reader = open_weights(out)
    for path, b in bits.items():
        qw = reader.qweight(path)
        assert qw.bits == b and int(qw.codes.max()) <= 2**b - 1, path
    assert report["mixed_precision"]["target_bits"] == 3.5


def test_dynamic_parsed_by_gptqmodel(tiny_models, tmp_path):
    """The ``dynamic`` mapping means the same to GPTQModel's own resolver as to ours."""
    pytest.importorskip("gptqmodel")
    from gptqmodel.quantization.config import dynamic_get

    out = tmp_path / "mixed"
    _mixed(tiny_models["llama"], out, "gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    bits = json.loads((out / "manifest.json").read_text())["mixed_precision"]["bits"]
    for path, b in bits.items():
        assert dynamic_get(qc["dynamic"], path, "bits", qc["bits"]) == b
        assert dynamic_get(qc["dynamic"], path, "group_size", qc["group_size"]) == 32


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_mixed_ct_loads_in_transformers(tiny_models, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ct"
    _mixed(tiny_models["llama"], out, "compressed-tensors", sym=True)
    ids = torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, _ = full_model(out)
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.allclose(_logits(m, ids), _logits(ours, ids), atol=1e-5, rtol=0)
    bits = json.loads((out / "manifest.json").read_text())["mixed_precision"]["bits"]
    for path, b in bits.items():
        mod = m.get_submodule(path)
        assert mod.quantization_scheme.weights.num_bits == b, path
        assert torch.equal(mod.weight, ours.get_submodule(path).weight)


@pytest.mark.slow  # gptqmodel import + kernel setup: 30-120 s
def test_mixed_gptq_loads_in_gptqmodel(tiny_models, tmp_path):
    """GPTQModel (the loader that reads ``dynamic``) builds each linear at its own width and matches ours."""
    pytest.importorskip("gptqmodel")
    from gptqmodel import BACKEND, GPTQModel

    out = tmp_path / "gptq"
    _mixed(tiny_models["llama"], out, "gptq", sym=True)
    ids = torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = _logits(full_model(out)[0], ids)
    m = GPTQModel.load(str(out), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    bits = json.loads((out / "manifest.json").read_text())["mixed_precision"]["bits"]
    for path, b in bits.items():
        assert m.model.get_submodule(path).bits == b, path
    got = _logits(m.model, ids)
    assert (got - ref).abs().max().item() / ref.abs().max().item() < 3e-3


@pytest.mark.parametrize("kw,msg", [
    (dict(recipe="nupes"), "not supported by pass"),
    (dict(bits=9.5), "between the smallest and largest"),
    (dict(bits=1.5), "between the smallest and largest"),
    (dict(bit_widths="1,3"), "at least two widths in 2..8"),
    (dict(bit_widths="3,x"), "comma-separated"),
])
def test_mixed_bad_input(tiny_models, tmp_path, kw, msg):
    opts = dict(model=str(tiny_models["llama"]), out=str(tmp_path / "o"), recipe="rtn", bits=3.5, nsamples=4,
                seqlen=64, group_size=32)
    opts.update(kw)
    with pytest.raises(UsageError, match=msg):
        compress(CompressOptions(**opts))
    assert not (tmp_path / "o").exists()


def test_cli_accepts_fractional_bits(tiny_models, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["compress", str(tiny_models["llama"]), "--recipe", "rtn", "--bits", "3.5",
                                   "--group-size", "32", "--nsamples", "4", "--seqlen", "64", "--format",
                                   "compressed-tensors", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["mixed_precision"]["target_bits"] == 3.5
