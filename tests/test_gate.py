"""`ptq gate`: threshold logic, exit codes (0 pass / 1 regression / 2 bad input), JSON report, and the stored
baseline file mode (exact ppl ratio and top-1, KL lower bound)."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cli.main import app
from ptq.gate import Check, GateInputError, Thresholds, check, coarse_kl

torch.set_num_threads(1)
EV = ["--seqlen", "48", "--windows", "6"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(reference tiny Llama, its RTN 3-bit g32 fp export, an evaluation text)."""
    from conftest import make_tiny
    from ptq.compress import CompressOptions, compress

    root = tmp_path_factory.mktemp("gate")
    ref = make_tiny("llama", root / "ref")
    q = root / "q"
    compress(CompressOptions(model=str(ref), out=str(q), recipe="rtn", format="fp", bits=3, group_size=32))
    rng = random.Random(0)
    words = "the of and to a in that is was he for it with as his on be at by".split()
    text = root / "val.txt"
    text.write_text(" ".join(rng.choice(words) for _ in range(600)))
    return ref, q, text


def gate(*args):
    return CliRunner().invoke(app, ["gate", *map(str, args)])


# -- pure logic -------------------------------------------------------------------------------------------------
def test_check_thresholds():
    m = {"ppl_ratio": 1.04, "top1": 0.91, "kl": 0.06}
    got = check(m, Thresholds(max_ppl_ratio=1.05, min_top1=0.9, max_kl=0.05))
    assert [(c.metric, c.passed) for c in got] == [("ppl_ratio", True), ("top1", True), ("kl", False)]
    assert got[2] == Check("kl", 0.06, "<=", 0.05, False)
    assert [c.passed for c in check({"ppl_ratio": 1.05}, Thresholds(max_ppl_ratio=1.05))] == [True]  # inclusive
    assert [c.passed for c in check({"top1": math.nan}, Thresholds(min_top1=0.0))] == [False]
    assert check(m, Thresholds(min_top1=0.95))[0].passed is False
    with pytest.raises(GateInputError, match="not measured"):
        check({"ppl_ratio": 1.0, "kl": None}, Thresholds(max_kl=0.1))


@pytest.mark.parametrize("th,msg", [(Thresholds(), "at least one threshold"),
                                    (Thresholds(min_top1=1.5), "--min-top1 must be in"),
                                    (Thresholds(max_ppl_ratio=0), "--max-ppl-ratio must be > 0"),
                                    (Thresholds(max_kl=-1), "--max-kl must be >= 0")])
def test_threshold_validation(th, msg):
    with pytest.raises(GateInputError, match=msg):
        th.validate()


def test_coarse_kl_bounds_exact_kl():
    g = torch.Generator().manual_seed(0)
    lq = F.log_softmax(torch.randn(50, 30, generator=g) * 2, -1)
    lp = F.log_softmax(torch.randn(50, 30, generator=g) * 2, -1)
    exact = (lq.exp() * (lq - lp)).sum(-1).double()
    full_ids = lq.topk(30, -1).indices
    assert torch.allclose(coarse_kl(lq.gather(1, full_ids), lp.gather(1, full_ids)), exact, atol=1e-6)
    prev = torch.zeros(50, dtype=torch.float64)
    for k in (1, 4, 8, 16):  # coarse-graining: 0 <= KL_k <= KL_{k'} (k < k') <= KL
        ids = lq.topk(k, -1).indices
        kk = coarse_kl(lq.gather(1, ids), lp.gather(1, ids))
        assert (kk >= prev - 1e-9).all() and (kk <= exact + 1e-9).all()
        prev = kk
    assert float(prev.mean()) > 0.5 * float(exact.mean())


# -- CLI --------------------------------------------------------------------------------------------------------
def test_gate_pass_fail_and_json_match_eval(models):
    from ptq.compress import evaluate_pair

    ref, q, text = models
    res = gate(q, "--baseline", ref, "--text", text, *EV, "--max-ppl-ratio", "2", "--min-top1", "0.1",
               "--max-kl", "5")
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output

    res = gate(q, "--baseline", ref, "--text", text, *EV, "--max-ppl-ratio", "1.0001", "--min-top1", "0.999",
               "--max-kl", "1e-6", "--json")
    assert res.exit_code == 1
    rep = json.loads(res.stdout)
    assert rep["passed"] is False and [c["passed"] for c in rep["checks"]] == [False, False, False]
    ev = evaluate_pair(str(q), str(ref), str(text), 48, 6)
    mt = rep["metrics"]
    assert mt["ppl"] == pytest.approx(ev["ppl"], rel=1e-6) and mt["kl"] == pytest.approx(ev["kl"], rel=1e-6)
    assert mt["top1"] == ev["top1"] and mt["ppl_ratio"] == pytest.approx(ev["ppl"] / ev["ppl_ref"], rel=1e-6)
    assert 0 < mt["kl"] and mt["top1"] < 1 and mt["kl_kind"] == "exact"

    res = gate(q, "--baseline", ref, "--text", text, *EV, "--max-kl", "1e-6")
    assert res.exit_code == 1 and "FAIL" in res.output and "kl" in res.output


def test_stored_baseline_mode(models, tmp_path):
    ref, q, text = models
    stored = tmp_path / "baseline.json"
    res = gate(q, "--baseline", ref, "--text", text, *EV, "--save-baseline", stored, "--topk", "16", "--json")
    assert res.exit_code == 0, res.output
    exact = json.loads(res.stdout)["metrics"]
    b = json.loads(stored.read_text())
    assert b["schema"] == "ptq-gate-baseline/1" and b["ppl_ref"] == exact["ppl_ref"]
    assert b["topk"]["positions"] == exact["tokens"] == 6 * 47

    res = gate(q, "--baseline-json", stored, "--text", text, *EV, "--max-ppl-ratio", "3", "--json")
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)["metrics"]
    assert m["ppl_ratio"] == pytest.approx(exact["ppl_ratio"], rel=1e-9)
    assert m["top1"] == exact["top1"]  # exact: stored reference argmax
    assert 0 < m["kl"] <= exact["kl"] + 1e-9 and m["kl_kind"] == "top16-lower-bound"

    res = gate(q, "--baseline-json", stored, "--text", text, *EV, "--min-top1", str(exact["top1"] + 0.01))
    assert res.exit_code == 1 and "FAIL" in res.output

    other = tmp_path / "other.txt"
    other.write_text(text.read_text() + " more")
    res = gate(q, "--baseline-json", stored, "--text", other, *EV, "--max-ppl-ratio", "3")
    assert res.exit_code == 2 and "different --text file" in res.output
    res = gate(q, "--baseline-json", stored, "--text", text, "--seqlen", "32", "--max-ppl-ratio", "3")
    assert res.exit_code == 2 and "same --windows/--seqlen" in res.output


@pytest.mark.parametrize("extra,msg", [
    ([], "exactly one of --baseline"),
    (["--baseline", "{ref}", "--max-kl", "-1"], "--max-kl must be >= 0"),
    (["--baseline", "{ref}"], "at least one threshold"),
    (["--baseline-json", "{text}", "--max-kl", "1"], "is not a ptq gate baseline file"),
    (["--baseline-json", "/nonexistent.json", "--max-kl", "1"], "does not exist"),
    (["--baseline-json", "/x.json", "--save-baseline", "y.json"], "--save-baseline needs --baseline"),
])
def test_gate_bad_input(models, extra, msg):
    ref, q, text = models
    extra = [e.format(ref=ref, text=text) for e in extra]
    res = gate(q, "--text", text, *EV, *extra)
    assert res.exit_code == 2, res.output
    assert msg in res.output
