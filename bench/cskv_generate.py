"""CSKV in ``model.generate`` on SmolLM2-135M: cache bytes actually held vs the layout formula, and decode speed
vs dense, with a ``--prompt`` token wikitext-2 prompt (CPU, 1 thread).

The model is converted in memory with ASVD factors from ``--calib-cache`` statistics (bytes and speed depend on
the layout, not on the factor values; the accuracy table is bench/cskv_equal_bytes.py). Variants, interleaved
over ``--reps`` rounds, each a full ``generate(prompt, max_new_tokens=N)``:

* ``dense``: the unconverted model (DynamicCache, sdpa);
* ``cskv``: `CSKVCache`, keys of earlier windows rebuilt from their features at every step (``keep_keys`` off:
  the memory the method promises), values kept low-rank (no past value rebuilt);
* ``cskv keep_keys``: reconstructed keys of finished windows kept (store dtype), only new windows rebuilt.

Tokens/s counts decode steps only (process CPU time, and wall time). Bytes: ``cache.nbytes()`` of the cache
generate returns, against `expected_cache_bytes` (the formula, including the window and, with keep_keys,
the kept keys) and a dense fp16 K/V cache. Rows: ``bench/results/cskv_generate.jsonl``.

    python bench/cskv_generate.py --calib-cache CALIB.pt --prompt 4096
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_log import append  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from calib.data import load_calibration, read_text, tokenize  # noqa: E402
from ptq.kv.cskv import CSKVConfig, convert_model, expected_cache_bytes, set_config  # noqa: E402
from ptq.kv.cskv_fit import asvd_factors  # noqa: E402
from ptq.kv.cskv_cache import dense_kv_bytes  # noqa: E402
from ptq.model_io import full_model, tokenizer_for  # noqa: E402
from ptq.models.smollm2 import ensure_cache  # noqa: E402

DATA = Path(os.environ.get("PTQ_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


class Clock(LogitsProcessor):
    def __init__(self):
        self.t = []

    def __call__(self, input_ids, scores):
        self.t.append((time.process_time(), time.perf_counter()))
        return scores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--config", default="0.375:1:4:4", help="k_density:v_density:k_bits:v_bits[:window]")
    ap.add_argument("--calib-cache", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    folder = ensure_cache()
    model, config = full_model(folder)
    tok = tokenizer_for(folder)
    cc = Path(args.calib_cache) if args.calib_cache else None
    if cc is not None and cc.exists():
        stats = torch.load(cc)
    else:
        from cskv_smollm2 import calib_stats

        stats = calib_stats(model, load_calibration(DATA / "janeausten", tok, 8, 512, 0, bos=True), 256)
    kd, vd, kb, vb, *wnd = args.config.split(":")
    ccfg = CSKVConfig(float(kd), float(vd), int(wnd[0]) if wnd else 32, int(kb), int(vb))
    dims = ccfg.dims(config)
    full = dims["n_kv"] * dims["d"]
    factors = {}
    for i, (layer, st) in enumerate(zip(model.model.layers, stats)):
        f = {}
        for kind, r in (("k", dims["r_k"]), ("v", dims["r_v"])):
            w = getattr(layer.self_attn, f"{kind}_proj").weight.data
            a, b = (w.clone(), torch.eye(full)) if r == full else asvd_factors(w, r, st["mean"])
            f[f"{kind}_proj_a"], f[f"{kind}_proj_b"] = a, b
        factors[i] = f
    dense_model, _ = full_model(folder)
    convert_model(model, ccfg, factors)
    prompt = tokenize(read_text(DATA / "wikitext2_test.raw.txt"), tok)[:args.prompt][None]
    print(f"[{time.time() - t0:.0f}s] ready, prompt {prompt.shape[1]}", flush=True)

    def run(m, keep):
        if m is model:
            set_config(model, replace(ccfg, keep_keys=keep))
        clk = Clock()
        with torch.no_grad():
            out = m.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                             pad_token_id=0, logits_processor=LogitsProcessorList([clk]),
                             return_dict_in_generate=True)
        (c0, w0), (c1, w1) = clk.t[0], clk.t[-1]
        n = len(clk.t) - 1
        return out, n / (c1 - c0), n / (w1 - w0)

    variants = {"dense": (dense_model, False), "cskv": (model, False), "cskv keep_keys": (model, True)}
    res = {n: {"cpu": [], "wall": []} for n in variants}
    caches, seqs = {}, {}
    for rep in range(args.reps):
        for name, (m, keep) in variants.items():
            out, tc, tw = run(m, keep)
            res[name]["cpu"].append(tc)
            res[name]["wall"].append(tw)
            caches[name], seqs[name] = out.past_key_values, out.sequences[0, prompt.shape[1]:]
            print(f"[{time.time() - t0:.0f}s] rep {rep} {name}: {tc:.2f} tok/s cpu, {tw:.2f} wall", flush=True)
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in res.items()}
    T = caches["cskv"].get_seq_length()
    dense_b = dense_kv_bytes(T, config.num_hidden_layers, dims["n_kv"], dims["d"])
    row = {"config": args.config, "prompt_tokens": prompt.shape[1], "new_tokens": args.new, "cached_tokens": T,
           "tokens_per_s_cpu": {n: round(v["cpu"], 3) for n, v in med.items()},
           "tokens_per_s_wall": {n: round(v["wall"], 3) for n, v in med.items()},
           "ratio_to_dense_cpu": {n: round(med[n]["cpu"] / med["dense"]["cpu"], 3) for n in ("cskv", "cskv keep_keys")},
           "bytes_measured": {n: caches[n].nbytes() for n in ("cskv", "cskv keep_keys")},
           "bytes_formula": {"cskv": expected_cache_bytes(ccfg, config, T),
                             "cskv keep_keys": expected_cache_bytes(replace(ccfg, keep_keys=True), config, T)},
           "dense_fp16_bytes": dense_b,
           "greedy_agreement_with_dense": {n: float((seqs[n] == seqs["dense"]).float().mean())
                                           for n in ("cskv", "cskv keep_keys")},
           "reps": args.reps}
    row["bytes_ratio_measured_to_formula"] = {n: round(row["bytes_measured"][n] / row["bytes_formula"][n], 4)
                                              for n in row["bytes_measured"]}
    row["reduction_vs_dense_fp16"] = {n: round(1 - row["bytes_measured"][n] / dense_b, 4)
                                      for n in row["bytes_measured"]}
    append("cskv_generate", row)
    print(row)


if __name__ == "__main__":
    main()
