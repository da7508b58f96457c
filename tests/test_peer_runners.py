"""bench/peer_runners/_common.py (run by the peers' own interpreters) and bench/results_log.run_child: the level
check refuses weights that are not quantized, the ids file is checked by its hash, and a child's peak RSS is its
own, not the memory of the benchmark that started it."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "peer_runners"))
from _common import check_levels, load_ids  # noqa: E402

from bench.results_log import run_child  # noqa: E402
from ptq.quant.primitives import QuantSpec  # noqa: E402
from ptq.quant.qweight import QuantizedWeight  # noqa: E402


def test_check_levels_accepts_quantized_and_refuses_fp():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    q = QuantizedWeight.from_float(w, QuantSpec(3, 64, False)).dequantize()
    assert check_levels({"a": q}, 3, 64) == 1
    with pytest.raises(SystemExit, match="distinct values"):
        check_levels({"a": q}, 2, 64)  # 8 levels are more than 2 bits hold
    with pytest.raises(SystemExit, match="not quantized"):
        check_levels({"a": w}, 3, 64)


def test_check_levels_with_a_short_last_group():
    """K = 576 at group 128 (SmolLM2): four full groups and one of 64 columns, each checked on its own."""
    w = torch.randn(8, 576, generator=torch.Generator().manual_seed(0))
    q = QuantizedWeight.from_float(w, QuantSpec(4, 128, False)).dequantize()
    assert check_levels({"a": q}, 4, 128) == 1
    bad = q.clone()
    bad[:, 512:] = w[:, 512:]  # only the short last group left in full precision
    with pytest.raises(SystemExit, match="not quantized"):
        check_levels({"a": bad}, 4, 128)


def test_ids_file_is_checked_by_hash(tmp_path):
    import hashlib

    ids = torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(1))
    sha = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"ids": ids.tolist(), "sha256": sha}))
    bad.write_text(json.dumps({"ids": ids.tolist(), "sha256": "0" * 64}))
    assert torch.equal(load_ids(str(good)), ids)
    with pytest.raises(SystemExit, match="hash"):
        load_ids(str(bad))


def test_run_child_reports_the_childs_own_peak_rss():
    held = torch.ones(64 * 2**20)  # 256 MiB in this process: a forked child would inherit it in ru_maxrss
    wall, cpu, rss, out = run_child([sys.executable, "-c", "print('hi')"])
    assert out.strip() == "hi" and cpu > 0
    assert rss < 128 * 2**20, rss
    assert float(held[0]) == 1.0
    with pytest.raises(SystemExit, match="boom"):
        run_child([sys.executable, "-c", "import sys; sys.exit('boom')"])
