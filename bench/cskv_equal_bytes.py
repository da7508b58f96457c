"""CSKV on SmolLM2-135M at equal cache bytes per token: quantization only vs channel shrinking + quantization.

    PTQ_DATA=... python bench/cskv_equal_bytes.py --specs 1:1:4:4:id,0.375:1:4:4:asvd --dense

A spec is ``k_density:v_density:k_bits:v_bits:init[:window]`` (window default ``--window``, 32). A branch at density 1 is *quantization only*: its factors are
``A = W`` and ``B = I``, so the cache holds the exact pre-RoPE K (or V) quantized with the CSKV quantizer (K per
channel over 32-token windows, V per token per head); ``init`` then only applies to the shrunk branch:
``asvd`` (ASVD init), ``fit`` (+ layer-wise fit), ``qat`` (+ quantization-aware fit, straight-through estimator
through the cache quantizer). Perplexity: wikitext-2 test, 40 x 512-token windows, no BOS, through the emulated
bi-branch path (equal to token-by-token decoding, tests/test_cskv.py). Bytes/token: the formula
(`asymptotic_bytes_per_token`) and a real `CSKVCache` after 512 tokens. Rows go to
``bench/results/cskv_equal_bytes.jsonl``; ``--table`` prints them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cskv_smollm2 import cache_bytes, calib_stats  # noqa: E402
from results_log import append, rows  # noqa: E402

from calib.data import load_calibration, read_text, tokenize  # noqa: E402
from ptq.eval.metrics import eval_windows, model_metrics  # noqa: E402
from ptq.kv.cskv import CSKVConfig, asymptotic_bytes_per_token, convert_model  # noqa: E402
from ptq.kv.cskv_fit import asvd_factors, fit_factors, recon_error  # noqa: E402
from ptq.kv.cskv_cache import dense_kv_bytes  # noqa: E402
from ptq.model_io import full_model, tokenizer_for  # noqa: E402
from ptq.models.smollm2 import ensure_cache  # noqa: E402

DATA = Path(os.environ.get("PTQ_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TABLE = "cskv_equal_bytes"


def branch_factors(w, density_channels: int, full: int, stats, init: str, quant: dict, seed: int):
    """``(A, B, rel_err)`` for one projection ``w [N, H]``; full rank -> ``(W, I)`` (quantization only)."""
    if density_channels == full:
        a, b = w.clone(), torch.eye(w.shape[0], dtype=w.dtype)
    else:
        a, b = asvd_factors(w, density_channels, stats["mean"])
        if init in ("fit", "qat"):
            with torch.enable_grad():
                a, b, _, _ = fit_factors(w, a, b, stats["x"], steps=300, lr=1e-2, batch=1024, seed=seed,
                                         quant=quant if init == "qat" else None)
    return a, b, recon_error(w, a, b, stats["x"], quant)


def print_table() -> None:
    rs = rows(TABLE)
    dense = next((r["ppl"] for r in reversed(rs) if r["spec"] == "dense"), None)
    if dense is None:  # the same 40-window evaluation, logged by bench/cskv_smollm2.py
        import json

        first = (Path(__file__).resolve().parent / "cskv_smollm2.jsonl").read_text().splitlines()[0]
        dense = json.loads(first)["ppl"]
    print("| K density | V density | K bits | V bits | init | B/token formula | B/token measured (T=512) | "
          "KV reduction | ppl | vs dense | rel err K | V (quantized) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rs:
        if r["spec"] == "dense":
            print(f"| dense fp16 | | | | | {r['bytes_per_token']} | | 0 | {r['ppl']:.2f} | | | |")
            continue
        print(f"| {r['k_density']} | {r['v_density']} | {r['k_bits']} | {r['v_bits']} | {r['init']} | "
              f"{r['bytes_formula']:.0f} | {r['bytes_measured']:.0f} | {100 * r['reduction']:.1f}% | "
              f"{r['ppl']:.2f} | {100 * (r['ppl'] / dense - 1):+.1f}% | {r['k_err']:.3f} | {r['v_err']:.3f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", default="1:1:4:4:id,1:1:3:3:id,1:1:2:2:id")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--fit-tokens", type=int, default=2048)
    ap.add_argument("--dense", action="store_true")
    ap.add_argument("--calib-cache", default=None)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--log", default=TABLE, help="results table name (e.g. cskv_screen for an 8-window screen)")
    ap.add_argument("--window", type=int, default=32, help="full-precision window W (K quantized per W tokens)")
    args = ap.parse_args()
    if args.table:
        return print_table()
    torch.set_num_threads(1)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    folder = ensure_cache()
    model, config = full_model(folder)
    tok = tokenizer_for(folder)
    windows = eval_windows(tokenize(read_text(DATA / "wikitext2_test.raw.txt"), tok), 512, args.windows)
    cc = Path(args.calib_cache) if args.calib_cache else None
    if cc is not None and cc.exists():
        stats = torch.load(cc)
    else:
        ids = load_calibration(DATA / "janeausten", tok, args.nsamples, 512, 0, bos=True)
        stats = calib_stats(model, ids, args.fit_tokens)
        if cc is not None:
            torch.save(stats, str(cc) + ".tmp")
            os.replace(str(cc) + ".tmp", cc)
    log("calibration ready")
    d_head = config.hidden_size // config.num_attention_heads
    dense_b = dense_kv_bytes(1, config.num_hidden_layers, config.num_key_value_heads, d_head)
    if args.dense:
        m = model_metrics(model, windows)
        append(args.log, {"spec": "dense", "ppl": m.ppl, "windows": windows.shape[0], "bytes_per_token": dense_b})
        log(f"dense {m.ppl:.3f}")
    attns = [layer.self_attn for layer in model.model.layers]
    for spec in args.specs.split(","):
        kd, vd, kb, vb, init, *wnd = spec.split(":")
        window = int(wnd[0]) if wnd else args.window
        ccfg = CSKVConfig(float(kd), float(vd), window, int(kb), int(vb))
        dims = ccfg.dims(config)
        full = dims["n_kv"] * dims["d"]
        qk = {"bits": ccfg.k_bits, "axis": "channel", "window": ccfg.window}
        qv = {"bits": ccfg.v_bits, "axis": "token", "group": dims["gv"]}
        factors, ek, ev = {}, [], []
        for i, (attn, st) in enumerate(zip(attns, stats)):
            ak, bk, e1 = branch_factors(attn.k_proj.weight.data, dims["r_k"], full, st, init, qk, i)
            av, bv, e2 = branch_factors(attn.v_proj.weight.data, dims["r_v"], full, st, init, qv, i)
            factors[i] = {"k_proj_a": ak, "k_proj_b": bk, "v_proj_a": av, "v_proj_b": bv}
            ek.append(e1)
            ev.append(e2)
        for layer, attn in zip(model.model.layers, attns):
            layer.self_attn = attn
        convert_model(model, ccfg, factors)
        m = model_metrics(model, windows)
        _, measured = cache_bytes(model, windows[:1])
        formula = asymptotic_bytes_per_token(ccfg, config)
        for layer, attn in zip(model.model.layers, attns):
            layer.self_attn = attn
        row = append(args.log, {"spec": spec, "window": window, "k_density": float(kd), "v_density": float(vd), "k_bits": int(kb),
                             "v_bits": int(vb), "init": init, "ppl": m.ppl, "windows": windows.shape[0],
                             "bytes_formula": formula, "bytes_measured": measured, "dense_bytes": dense_b,
                             "reduction": 1 - formula / dense_b, "k_err": sum(ek) / len(ek),
                             "v_err": sum(ev) / len(ev)})
        log(f"{spec}: ppl {row['ppl']:.3f} bytes {formula:.0f} ({100 * row['reduction']:.1f}%)")


if __name__ == "__main__":
    main()
