"""SmolLM2-135M: fp32 ONNX vs int4 ONNX (MatMulNBits + GatherBlockQuantized) on CPU — file size and decode
tokens/s with the KV cache, side by side.

    .venv/bin/ptq compress ~/.cache/ptq/smollm2-135m --recipe rtn --bits 4 --group-size 32 --format gptq \\
        --out out/smol_rtn_g32
    .venv/bin/python bench/onnx_smollm2.py --compressed out/smol_rtn_g32 --work out/onnx_bench

Without ``--compressed`` the int4 weights are RTN-quantized here (``QuantizedWeight.from_float``, g32 asym).
The fp32 graph is exported once; the int4 graph is the same graph rewritten with the exact codes (what
``ptq export`` does after its own export) and validated against the PyTorch fake-quant model.
The tied embedding / lm_head is quantized at export (``--embed-bits 4``, g32; 28 M of the 135 M parameters).
Timing: greedy decode of ``--new-tokens`` after a 32-token prompt, ``intra_op_num_threads`` 2, one ORT session
alive at a time, variants interleaved (order rotated) over ``--rounds``; medians (p10-p90 over rounds).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ptq.export.onnx_validate import decode_feed  # noqa: E402

PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
          "want of a wife. However little known the feelings or views of such a man may be")


def build(args) -> dict[str, Path]:
    """fp32 graph exported once; the int4 graph is that graph rewritten with the compressed model's exact codes
    (same `weight_sites` map, `quantize_graph`), then validated against the fake-quant model."""
    import onnx

    from cli.export_cmd import load_compressed
    from ptq.export.onnx_graph import export_graph, save_model, weight_sites
    from ptq.export.onnx_quant import quantize_graph, set_accuracy_level
    from ptq.export.onnx_validate import sample_ids, validate
    from ptq.head_quant import quantize_embeddings
    from ptq.model_io import full_model, tokenizer_for
    from ptq.models.smollm2 import ensure_cache
    from ptq.quant.primitives import QuantSpec
    from ptq.quant.qweight import QuantizedWeight

    work = Path(args.work)
    paths = {"fp32": work / "fp32" / "model.onnx", "int4 acc4": work / "int4" / "model.onnx",
             "int4 acc0": work / "int4_acc0" / "model.onnx"}
    src = Path(args.model or ensure_cache())
    if not paths["fp32"].exists():
        t = time.time()
        model, _ = full_model(src)
        save_model(export_graph(model.eval()), paths["fp32"])
        print(f"fp32 export {time.time() - t:.0f} s", flush=True)
        del model
    if not paths["int4 acc4"].exists():
        t = time.time()
        fp_model, _ = full_model(src)
        proto = onnx.load(str(paths["fp32"]))
        sites = weight_sites(proto, fp_model.eval())
        del fp_model
        if args.compressed:
            model, qws, _ = load_compressed(Path(args.compressed))
        else:
            model, _ = full_model(src)
            spec = QuantSpec(bits=4, group_size=32, sym=False)
            qws = {}
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                    qws[name] = QuantizedWeight.from_float(mod.weight.data, spec)
                    mod.weight.data = qws[name].dequantize()
        tied, extra = quantize_embeddings(model, qws, args.embed_bits) if args.embed_bits else (None, [])
        rw = quantize_graph(proto, sites, qws, mode="nbits", accuracy_level=4, tied=tied)
        save_model(proto, paths["int4 acc4"])
        del proto
        print(f"int4 rewrite {time.time() - t:.0f} s: {len(rw['replaced'])} replaced, fallback {rw['fallback_fp']}, "
              f"quantized at export {extra}", flush=True)
        t = time.time()
        v = validate(paths["int4 acc4"], model.eval(), sample_ids(model.config, tokenizer_for(src)))
        print(f"validation {time.time() - t:.0f} s: " + json.dumps({k: x for k, x in v.items() if "torch" not in k}),
              flush=True)
        Path(work, "int4", "onnx_report.json").write_text(json.dumps({**rw, "validation": v}, indent=2))
    if not paths["int4 acc0"].exists():
        proto = onnx.load(str(paths["int4 acc4"]))
        set_accuracy_level(proto, 0)
        save_model(proto, paths["int4 acc0"])
    return paths


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))


def time_variant(path: Path, prompt: np.ndarray, n_new: int, threads: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode tokens/s, generated ids) with one fresh session."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]

    def first_feed():
        f = {"input_ids": prompt, "attention_mask": np.ones(prompt.shape, np.int64)}
        for i in pasts:
            f[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        return f

    sess.run(names, first_feed())  # warm-up (prepacking, allocations)
    t0 = time.perf_counter()
    res = dict(zip(names, sess.run(names, first_feed())))
    prefill = time.perf_counter() - t0
    total, out, dec = prompt.shape[1], [], 0.0
    for _ in range(n_new):
        tok = int(res["logits"][0, -1].argmax())
        out.append(tok)
        total += 1
        feed = decode_feed(res, tok, total)
        t0 = time.perf_counter()
        res = dict(zip(names, sess.run(names, feed)))
        dec += time.perf_counter() - t0
    return prefill, n_new / dec, out


def pct(xs, q):
    return float(np.percentile(xs, q))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="SmolLM2 folder (default ~/.cache/ptq/smollm2-135m)")
    ap.add_argument("--compressed", default=None, help="ptq compress --format gptq output (int4 source)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ptq_onnx_bench"))
    ap.add_argument("--embed-bits", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    paths = build(args)
    from ptq.model_io import tokenizer_for
    from ptq.models.smollm2 import ensure_cache

    tok = tokenizer_for(args.model or ensure_cache())
    prompt = tok(PROMPT, return_tensors="np")["input_ids"][:, :32].astype(np.int64)
    names = list(paths)
    stats = {n: {"prefill": [], "tps": [], "ids": None} for n in names}
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            pf, tps, ids = time_variant(paths[n], prompt, args.new_tokens, args.threads)
            stats[n]["prefill"].append(pf)
            stats[n]["tps"].append(tps)
            stats[n]["ids"] = ids
        print(f"round {r + 1}: " + ", ".join(f"{n} {stats[n]['tps'][-1]:.1f} tok/s" for n in names), flush=True)
    base_size, base_tps = size(paths["fp32"]), statistics.median(stats["fp32"]["tps"])
    rows = []
    print(f"\nSmolLM2-135M ONNX, CPU, intra_op_num_threads={args.threads}, prompt {prompt.shape[1]} tokens, "
          f"decode {args.new_tokens} tokens, {args.rounds} interleaved rounds (median, p10-p90)")
    print(f"{'variant':<10} {'file MB':>8} {'size x':>7} {'prefill ms':>18} {'decode tok/s':>20} {'speed x':>8} "
          f"{'greedy = fp32':>14}")
    for n in names:
        s = stats[n]
        tps = statistics.median(s["tps"])
        same = sum(a == b for a, b in zip(s["ids"], stats["fp32"]["ids"]))
        row = {"variant": n, "file_bytes": size(paths[n]), "size_ratio": size(paths[n]) / base_size,
               "prefill_ms_median": 1e3 * statistics.median(s["prefill"]), "decode_tps_median": tps,
               "decode_tps_p10": pct(s["tps"], 10), "decode_tps_p90": pct(s["tps"], 90),
               "speed_ratio": tps / base_tps, "greedy_tokens_equal_fp32": same}
        rows.append(row)
        print(f"{n:<10} {row['file_bytes'] / 2**20:8.1f} {row['size_ratio']:7.3f} "
              f"{row['prefill_ms_median']:8.1f} ({1e3 * pct(s['prefill'], 10):.0f}-{1e3 * pct(s['prefill'], 90):.0f})"
              f" {tps:8.1f} ({row['decode_tps_p10']:.1f}-{row['decode_tps_p90']:.1f}) {row['speed_ratio']:8.2f}"
              f" {same:>8}/{args.new_tokens}")
    print("\nfp32 :", tok.decode(stats["fp32"]["ids"]))
    print("int4 :", tok.decode(stats["int4 acc4"]["ids"]))
    Path(args.work, "bench.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
