"""bench/onnx_paired.py: paired decode-step timing of several fused ONNX exports in one process (the speed ratio of
bench/onnx_speed.py that a load burst on a shared machine cannot skew). No timing is asserted: the ratio
arithmetic, the step count, the reference's own ratio, and that the exports carry block = group size."""
from __future__ import annotations

import onnx
import pytest
import torch

from ptq.quant.primitives import QuantSpec
from tests.test_onnx_fused import quantized

torch.set_num_threads(1)


def test_summary_ratio_is_reference_over_model():
    from bench.onnx_paired import _summary

    s = _summary(["a", "ref"], [[1.0, 2.0, 3.0], [2.0, 4.0, 3.0]], ref=1)
    assert s["a"]["speed_vs_ref"] == 2.0 and s["ref"]["speed_vs_ref"] == 1.0  # median of 2, 2, 1
    assert s["a"]["step_ms"] == 2000.0 and s["a"]["steps"] == 3


def test_paired_ours_runs_two_block_sizes(tiny_models, tmp_path):
    pytest.importorskip("onnxruntime")
    from bench.onnx_paired import paired_ours
    from cli.export_cmd import export_onnx
    from ptq.export.onnx_genai import write_genai_config

    dirs = []
    for gs in (32, 64):
        model, qws = quantized(tiny_models["llama-gqa"], QuantSpec(bits=4, group_size=gs, sym=False))
        d = tmp_path / f"g{gs}"
        export_onnx(model, qws, d, accuracy_level=4)
        write_genai_config(d, model.config)
        m = onnx.load(str(d / "model.onnx"), load_external_data=False)
        blocks = {a.i for n in m.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
        assert blocks == {gs}  # the kernel's block is the checkpoint's group: larger groups, fewer scales per row
        dirs.append(d)
    out = paired_ours(dirs, list(range(3, 11)), n_new=6, reps=2, threads=1, ref=1)
    a, ref = out[str(dirs[0])], out[str(dirs[1])]
    assert a["steps"] == ref["steps"] == 2 * 5  # reps x (n_new - 1) decode steps, warm-up excluded
    assert ref["speed_vs_ref"] == 1.0 and a["speed_vs_ref"] > 0 and a["step_ms"] > 0
