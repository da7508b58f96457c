"""CSKV on SmolLM2-135M: KV-cache bytes/token and wikitext-2 perplexity through the compressed (bi-branch) path.

    .venv/bin/python bench/cskv_smollm2.py --configs 0.5:0.5,0.25:0.25 \
        --bits 16,4 --log bench/results/cskv_smollm2.jsonl

Calibration: 32 x 512 tokens of Jane Austen (seed 0); per layer the k/v_proj inputs give mean |x| (ASVD) and a
token subsample for the layer-wise fit. Evaluation: wikitext-2 test, 40 non-overlapping 512-token windows, no BOS;
each window runs in one forward whose attention emulates the cache (keys of earlier 32-token windows rebuilt from
the (quantized) features, own window exact), which tests/test_cskv.py checks equals token-by-token decoding.
Bytes/token are read from a real `CSKVCache` after 511 tokens (prefill, 31 window tokens) and 512 (one decode
step: the window is flushed),
against a dense fp16 K/V cache. ``--calib-cache`` shares the calibration statistics between parallel runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calib.data import load_calibration, read_text, tokenize  # noqa: E402
from ptq.eval.metrics import eval_windows, model_metrics  # noqa: E402
from ptq.kv.cskv import (CSKVConfig, asymptotic_bytes_per_token, convert_model, make_cache,  # noqa: E402
                         set_config)
from ptq.kv.cskv_fit import asvd_factors, fit_factors, recon_error  # noqa: E402
from ptq.kv.cskv_cache import dense_kv_bytes  # noqa: E402
from ptq.model_io import full_model, tokenizer_for  # noqa: E402
from ptq.models.smollm2 import ensure_cache  # noqa: E402

DATA = Path(os.environ.get("PTQ_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@torch.no_grad()
def calib_stats(model, ids, fit_tokens: int, seed: int = 0) -> list[dict]:
    """Per layer: ``mean`` |x| [H] over all calibration tokens and ``x`` [fit_tokens, H] subsample."""
    layers = model.model.layers
    per = -(-fit_tokens // ids.shape[0])
    g = torch.Generator().manual_seed(seed)
    acc = [{"abs": 0, "n": 0, "rows": []} for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        def hook(_m, args, a=acc[i]):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            a["abs"] = a["abs"] + x.abs().sum(0)
            a["n"] += x.shape[0]
            a["rows"].append(x[torch.randperm(x.shape[0], generator=g)[:per]].clone())
        hooks.append(layer.self_attn.k_proj.register_forward_pre_hook(hook))
    try:
        for s in range(ids.shape[0]):
            model.model(input_ids=ids[s:s + 1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [{"mean": a["abs"] / a["n"], "x": torch.cat(a["rows"])[:fit_tokens]} for a in acc]


@torch.no_grad()
def cache_bytes(model, ids) -> tuple[float, float]:
    """Bytes/token stored by a real `CSKVCache` after ``T-1`` tokens (prefill) and ``T`` (one decode step)."""
    cache = make_cache(model)
    model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
    b_prev = cache.nbytes() / (ids.shape[1] - 1)
    model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
    return b_prev, cache.nbytes() / ids.shape[1]


def make_factors(attns, stats, ccfg, config, fit_steps, fit_lr, log, fit_batch=1024):
    d = ccfg.dims(config)
    init, fit, errs = {}, {}, {"k_init": [], "k_fit": [], "v_init": [], "v_fit": []}
    for i, (attn, st) in enumerate(zip(attns, stats)):
        init[i], fit[i] = {}, {}
        for kind, r in (("k", d["r_k"]), ("v", d["r_v"])):
            w = getattr(attn, f"{kind}_proj").weight.data
            a, b = asvd_factors(w, r, st["mean"])
            init[i][f"{kind}_proj_a"], init[i][f"{kind}_proj_b"] = a, b
            if r >= min(w.shape):  # full rank: ASVD is exact, nothing to fit
                af, bf = a, b
            else:
                with torch.enable_grad():
                    af, bf, _, _ = fit_factors(w, a, b, st["x"], steps=fit_steps, lr=fit_lr, batch=fit_batch, seed=i)
            fit[i][f"{kind}_proj_a"], fit[i][f"{kind}_proj_b"] = af, bf
            errs[f"{kind}_init"].append(recon_error(w, a, b, st["x"]))
            errs[f"{kind}_fit"].append(recon_error(w, af, bf, st["x"]))
        log(f"layer {i}: k err {errs['k_init'][-1]:.4f} -> {errs['k_fit'][-1]:.4f}, "
            f"v err {errs['v_init'][-1]:.4f} -> {errs['v_fit'][-1]:.4f}")
    mean = {k: sum(v) / len(v) for k, v in errs.items()}
    return init, fit, mean


def print_table(path: str) -> None:
    """Markdown table of the JSON-lines records written by ``--log``."""
    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    dense = next((r["ppl"] for r in recs if r["config"].startswith("dense")), None)
    print("| config | windows | ppl | ppl vs dense | B/token T=512 | T=511 | reduction T=512 | T=511 | rel err K | V |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in recs:
        if r["config"].startswith("dense"):
            print(f"| {r['config']} | {r['windows']} | {r['ppl']:.2f} | - | {r['bytes_per_token']} | - | 0 | - | - | - |")
            continue
        rel = f"{100 * (r['ppl'] / dense - 1):+.1f}%" if dense else "-"
        print(f"| {r['config']} | {r['windows']} | {r['ppl']:.2f} | {rel} | {r['bytes_per_token_T512']:.0f} | "
              f"{r['bytes_per_token_T511']:.0f} | {100 * r['reduction_T512']:.1f}% | {100 * r['reduction_T511']:.1f}% | "
              f"{r['k_err']:.3f} | {r['v_err']:.3f} |")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        return print_table(sys.argv[2])
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="0.5:0.5,0.25:0.25", help="k_density:v_density list")
    ap.add_argument("--bits", default="16,4")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--fit-steps", type=int, default=300)
    ap.add_argument("--fit-lr", type=float, default=1e-2)
    ap.add_argument("--fit-tokens", type=int, default=2048)
    ap.add_argument("--fit-batch", type=int, default=1024)
    ap.add_argument("--inits", default="asvd,asvd+fit", help="which factors to evaluate")
    ap.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    ap.add_argument("--calib-cache", default=None)
    ap.add_argument("--log", default=None, help="JSON-lines file, one record per result")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    def record(rec):
        log(json.dumps(rec))
        if args.log:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from results_log import context  # command, commit, cores, versions beside the numbers

            with open(args.log, "a") as f:
                f.write(json.dumps({"table": Path(args.log).stem, **rec, **context()}) + "\n")

    folder = ensure_cache()
    model, config = full_model(folder)
    tok = tokenizer_for(folder)
    windows = eval_windows(tokenize(read_text(DATA / "wikitext2_test.raw.txt"), tok), args.seqlen, args.windows)
    cc = Path(args.calib_cache) if args.calib_cache else None
    if cc is not None and cc.exists():
        stats = torch.load(cc)
        log(f"calibration stats loaded from {cc}")
    else:
        ids = load_calibration(DATA / "janeausten", tok, args.nsamples, args.seqlen, 0, bos=True)
        stats = calib_stats(model, ids, args.fit_tokens)
        if cc is not None:
            torch.save(stats, str(cc) + ".tmp")
            os.replace(str(cc) + ".tmp", cc)
        log(f"calibration: {ids.shape[0]} x {ids.shape[1]} tokens")
    if args.dense:
        m = model_metrics(model, windows)
        record({"config": "dense fp16 KV", "ppl": m.ppl, "windows": windows.shape[0],
                "bytes_per_token": dense_kv_bytes(1, config.num_hidden_layers, config.num_key_value_heads,
                                                  config.hidden_size // config.num_attention_heads)})
    attns = [layer.self_attn for layer in model.model.layers]
    measured = {}  # (densities, bits) -> real cache bytes/token (layout only: independent of the factors)
    for spec in args.configs.split(","):
        kd, vd = (float(v) for v in spec.split(":"))
        base = CSKVConfig(kd, vd, args.window)
        init, fit, errs = make_factors(attns, stats, base, config, args.fit_steps, args.fit_lr, log, args.fit_batch)
        log(f"density {kd}/{vd}: mean rel err {errs}")
        for name, factors in (("asvd", init), ("asvd+fit", fit)):
            if name not in args.inits.split(","):
                continue
            for layer, attn in zip(model.model.layers, attns):
                layer.self_attn = attn
            convert_model(model, base, factors)
            for bits in (int(b) for b in args.bits.split(",")):
                ccfg = replace(base, k_bits=bits, v_bits=bits)
                set_config(model, ccfg)
                t = time.time()
                m = model_metrics(model, windows)
                if (kd, vd, bits) not in measured:
                    measured[(kd, vd, bits)] = cache_bytes(model, windows[:1])
                b511, b512 = measured[(kd, vd, bits)]
                dense = dense_kv_bytes(1, config.num_hidden_layers, config.num_key_value_heads,
                                       base.dims(config)["d"])
                record({"config": f"k{kd}/v{vd} {bits}-bit {name}", "k_density": kd, "v_density": vd,
                        "bits": bits, "init": name, "ppl": m.ppl,
                        "windows": windows.shape[0], "bytes_per_token_T512": b512, "bytes_per_token_T511": b511,
                        "bytes_per_token_longctx": asymptotic_bytes_per_token(ccfg, config),
                        "dense_bytes_per_token": dense,
                        "reduction_T512": 1 - b512 / dense, "reduction_T511": 1 - b511 / dense,
                        "k_err": errs["k_fit" if name != "asvd" else "k_init"],
                        "v_err": errs["v_fit" if name != "asvd" else "v_init"],
                        "eval_s": round(time.time() - t, 1)})


if __name__ == "__main__":
    main()
