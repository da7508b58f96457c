"""Does the onnxruntime-genai model builder convert a symmetric GPTQ export of ptq without edits, and how close is
the result to ptq's own model?

    python bench/ortgenai_builder.py --peer-python PEER_VENV/bin/python [--hidden 1024]

PEER_VENV holds onnxruntime-genai (+ torch, transformers, onnx_ir, onnxscript), installed apart from ptq's
environment. Steps: random-init Llama with Llama-7B proportions (head_dim 128, intermediate = hidden * 43/16; at
hidden 1024 every K is a multiple of 64), fp16 safetensors; `ptq compress --recipe gptq --bits 4 --group-size 64
--sym`; the builder (``-p int4 -e cpu``, ``exclude_lm_head=true`` so the graph ends at the final norm and
the lm_head, which the builder would re-quantize itself, is out of the comparison); then the final hidden
states of 12 random tokens from onnxruntime vs ptq's dequantized model, with the MatMulNBits accuracy_level
the builder wrote and with every MatMulNBits set to 0 (fp32 compute), plus a check that the builder's int4
codes / scales / zero points dequantize to exactly ptq's weights. Rows in bench/results/ortgenai_builder.jsonl.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
torch.set_num_threads(1)

ORT_RUN = """
import json, sys, numpy as np, onnxruntime as ort
d, ids = sys.argv[1], np.array(json.loads(sys.argv[2]), dtype=np.int64)[None]
s = ort.InferenceSession(d + "/model.onnx", providers=["CPUExecutionProvider"])
dec = json.load(open(d + "/genai_config.json"))["model"]["decoder"]
feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
for i in s.get_inputs():
    if i.name.startswith("past_key_values"):
        feeds[i.name] = np.zeros((1, dec["num_key_value_heads"], 0, dec["head_size"]), np.float32)
out = s.run([s.get_outputs()[0].name], feeds)[0]
np.save(sys.argv[3], out.astype(np.float32))
"""


def onnx_acc_levels(path: Path) -> list[int]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return sorted({a.i for n in m.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                   if a.name == "accuracy_level"})


def set_acc0(src: Path, dst: Path) -> None:
    import onnx

    shutil.copytree(src, dst)
    m = onnx.load(str(dst / "model.onnx"), load_external_data=False)
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            for a in n.attribute:
                if a.name == "accuracy_level":
                    a.i = 0
    onnx.save(m, str(dst / "model.onnx"))


def weights_exact(onnx_dir: Path, ckpt: Path, layers: int) -> bool:
    """Builder's MatMulNBits (uint8 codes, f32 scales, uint8 zero points) dequantize to ptq's weights."""
    import onnx
    from onnx import numpy_helper

    from ptq.model_io import open_weights

    m = onnx.load(str(onnx_dir / "model.onnx"))
    init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    src = open_weights(ckpt)
    fused = {"attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
             "attn.o_proj": ["self_attn.o_proj"], "mlp.gate_proj": ["mlp.gate_proj"], "mlp.up_proj": ["mlp.up_proj"],
             "mlp.down_proj": ["mlp.down_proj"]}
    for i in range(layers):
        for onm, ours in fused.items():
            pre = f"model.layers.{i}.{onm}.MatMulNBits."
            qw, sc, qz = init[pre + "qweight"], init[pre + "scales"], init[pre + "qzeros"]
            n, kb, blob = qw.shape
            codes = np.stack([qw & 15, qw >> 4], -1).reshape(n, kb * blob * 2).astype(np.float32)
            z = np.stack([qz & 15, qz >> 4], -1).reshape(n, -1)[:, :kb].astype(np.float32)
            bs = blob * 2
            w = (codes - np.repeat(z, bs, 1)) * np.repeat(sc.reshape(n, kb), bs, 1)
            ref = np.concatenate([src.get(f"model.layers.{i}.{o}.weight").numpy() for o in ours])
            if not np.array_equal(w[:, :ref.shape[1]], ref):
                return False
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-python", required=True)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    a = ap.parse_args()
    from bench.results_log import append
    from ptq.compress import CompressOptions, compress
    from ptq.model_io import full_model
    from test_cli_headline import make_7b_shaped

    root = Path(tempfile.mkdtemp(prefix="ptq-ortgenai-"))
    try:
        src = make_7b_shaped(root / "src", hidden=a.hidden, layers=a.layers, dtype=torch.float16)
        calib = root / "calib.txt"
        calib.write_text((ROOT / "calib" / "default_calibration.txt").read_text()[:20000])
        ck = root / "gptq"
        compress(CompressOptions(model=str(src), out=str(ck), recipe="gptq", bits=4, group_size=64, sym=True,
                                 format="gptq", calib=str(calib), nsamples=4, seqlen=64))
        built = root / "onnx"
        res = subprocess.run([a.peer_python, "-m", "onnxruntime_genai.models.builder", "-i", str(ck), "-o",
                              str(built), "-p", "int4", "-e", "cpu", "-c", str(root / "cache"),
                              "--extra_options", "exclude_lm_head=true"], capture_output=True, text=True)
        converts = res.returncode == 0 and (built / "model.onnx").exists()
        ver = subprocess.run([a.peer_python, "-c", "import onnxruntime_genai as g; print(g.__version__)"],
                             capture_output=True, text=True).stdout.strip()
        row = {"model": f"random Llama, 7B proportions, hidden {a.hidden}, {a.layers} layers, fp16",
               "export": "gptq W4 g64 sym (checkpoint_format gptq)", "onnxruntime_genai": ver,
               "converts_without_edits": converts}
        if not converts:
            row["error"] = res.stderr[-500:]
        else:
            ids = torch.randint(2, 300, (12,), generator=torch.Generator().manual_seed(0)).tolist()
            model, _ = full_model(ck)
            with torch.no_grad():
                ref = model.model(input_ids=torch.tensor([ids])).last_hidden_state.numpy()
            row["builder_accuracy_levels"] = onnx_acc_levels(built / "model.onnx")
            row["weights_bit_exact"] = weights_exact(built, ck, a.layers)
            acc0 = root / "onnx-acc0"
            set_acc0(built, acc0)
            row["hidden_abs_max"] = float(np.abs(ref).max())
            for tag, d in (("as_built", built), ("acc0", acc0)):
                npy = root / f"{tag}.npy"
                subprocess.run([a.peer_python, "-c", ORT_RUN, str(d), json.dumps(ids), str(npy)], check=True)
                row[f"max_abs_hidden_diff_{tag}"] = float(np.abs(np.load(npy) - ref).max())
        print(json.dumps(row))
        args = " ".join("$PEER_VENV/bin/python" if x == a.peer_python else x for x in sys.argv[1:])
        append("ortgenai_builder", row, command=f"python bench/ortgenai_builder.py {args}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
