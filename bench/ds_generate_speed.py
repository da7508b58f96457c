"""``model.generate`` decode speed with a long prompt, dense vs Double Sparsity (SmolLM2-135M, CPU, 1 thread).

One prefill of ``--prompt`` wikitext-2 tokens (minus one) fills a `DSCache`; then each variant runs
``model.generate(prompt, cache=..., max_new_tokens=N)`` greedily from that state (the cache is cropped back after
each run), ``--reps`` rounds with the variants interleaved:

* ``dense (DynamicCache)``: plain transformers generate, sdpa attention, a DynamicCache built from the same K/V;
* ``dense (DSCache)``: the DSCache with every layer dense (same buffers, no label scoring);
* ``double sparsity (head)`` with ``--head``: the same with one top-k per query head (``selection="head"``,
  KV-head labels; only with ``--selection kv``, which builds a KV-head label cache);
* ``double sparsity (kv)`` with ``--kv`` (and ``--selection query-labels``): ``selection="kv"`` side by side, on a
  second `DSCache` with the ``qk_kv`` KV-head label cache built from the same prefilled K/V;
* ``double sparsity``: label-cache sparse decode with ``--selection`` (default ``query-labels``: per-query-head
  label channels ``qk`` and a top-k per query head, label cache per ``--label-layout``: ``auto`` keeps the union
  label cache in the layers where the group's channels overlap; ``kv``: per-KV-head labels ``qk_kv``, one top-k
  per KV head),
  k = prompt/``--frac`` tokens, r = d/``--rdiv``, first ``--dense-layers`` layers dense.

Tokens/s counts decode steps only (the first forward of generate processes the last prompt token), timed with
process CPU time (single thread: the work, not the wait for a core on a loaded machine) and wall time.
Greedy token agreement with the dense run is reported, and, teacher-forced on the dense greedy tokens, the share
of steps where Double Sparsity's top-1 equals dense's, dense's top-1 in DS's top-5, and the mean KL(dense || DS). Rows: ``bench/results/ds_generate_speed.jsonl``.

    python bench/ds_generate_speed.py --model DS_FOLDER --prompt 8192
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_log import append  # noqa: E402
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList  # noqa: E402

from calib.data import read_text, tokenize  # noqa: E402
from ptq.model_io import tokenizer_for  # noqa: E402
from ptq.sparse import load_double_sparsity, make_cache  # noqa: E402

DATA = Path(os.environ.get("PTQ_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


class Clock(LogitsProcessor):
    """Records (cpu, wall) time at every generation step."""

    def __init__(self):
        self.t = []

    def __call__(self, input_ids, scores):
        self.t.append((time.process_time(), time.perf_counter()))
        return scores


def run(model, prompt, cache, n, key):
    clk = Clock()
    out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                         logits_processor=LogitsProcessorList([clk]), **{key: cache})
    (c0, w0), (c1, w1) = clk.t[0], clk.t[-1]
    steps = len(clk.t) - 1
    return out[0, prompt.shape[1]:], steps / (c1 - c0), steps / (w1 - w0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="folder written by ptq compress --recipe double-sparsity")
    ap.add_argument("--prompt", type=int, default=8192)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--frac", type=int, default=16)
    ap.add_argument("--rdiv", type=int, default=8)
    ap.add_argument("--dense-layers", type=int, default=2)
    ap.add_argument("--label-bits", type=int, default=16)
    ap.add_argument("--selection", default="query-labels", choices=["query-labels", "head", "kv"])
    ap.add_argument("--head", action="store_true", help="with --selection kv: also time selection='head'")
    ap.add_argument("--label-layout", default="auto", choices=["auto", "per-head", "union"])
    ap.add_argument("--kv", action="store_true", help="with --selection query-labels: also time selection='kv'")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    tok = tokenizer_for(args.model)
    ids = tokenize(read_text(DATA / "wikitext2_test.raw.txt"), tok)
    plen = min(args.prompt, 8192 - args.new - 1)
    prompt = ids[:plen][None]
    if args.head and args.selection != "kv":
        raise SystemExit("--head needs --selection kv (a KV-head label cache)")
    if args.kv and args.selection != "query-labels":
        raise SystemExit("--kv needs --selection query-labels")
    ctype = "qk" if args.selection == "query-labels" else "qk_kv"
    model = load_double_sparsity(args.model, heavy_tokens=plen // args.frac, label_bits=args.label_bits,
                                 dense_layers=args.dense_layers, sparse_threshold=0, selection=args.selection,
                                 channel_type=ctype, label_layout=args.label_layout)
    cfg = model.ds_cfg
    d = model.config.hidden_size // model.config.num_attention_heads
    cfg.heavy_channels = d // args.rdiv
    from ptq.sparse import install, load_labels

    labels, _ = load_labels(args.model, cfg.channel_type)
    install(model, labels, cfg)  # rebuild the label-cache channels with r = d / rdiv
    key = "cache" if "cache" in type(model).forward.__code__.co_varnames else "past_key_values"
    cache = make_cache(model)
    with torch.no_grad():
        model(input_ids=prompt[:, :-1], use_cache=True, **{key: cache})
    print(f"[{time.time() - t0:.0f}s] prefill {plen - 1} tokens", flush=True)
    P = plen - 1

    def dyn():
        dc = DynamicCache()
        for i, layer in enumerate(cache.layers):
            dc.update(layer.keys[:, :, :P].clone(), layer.values[:, :, :P].clone(), i)
        return dc

    caches = {}
    if args.kv:  # the KV-head label cache of the same K/V (DSLayer.update computes the labels from the keys)
        from ptq.sparse.double_sparsity import runtime_channels
        from ptq.sparse.ds_runtime import DSCache

        lab_kv, _ = load_labels(args.model, "qk_kv")
        H = model.config.num_attention_heads
        kvh = model.config.num_key_value_heads
        ch = [None if c is None else runtime_channels(lab_kv[i], "kv", H, kvh, cfg.heavy_channels)
              for i, c in enumerate(model.ds_channels)]
        caches["double sparsity (kv)"] = DSCache(ch, cfg.label_bits)
        for src, dst in zip(cache.layers, caches["double sparsity (kv)"].layers):
            dst.update(src.keys[:, :, :P], src.values[:, :, :P])
    variants = {"dense (DynamicCache)": None, "dense (DSCache)": None, "double sparsity": None}
    if args.head:
        variants["double sparsity (head)"] = None
    if args.kv:
        variants["double sparsity (kv)"] = None

    def sel(name):
        return {"(head)": "head", "(kv)": "kv"}.get(name.rsplit(" ", 1)[-1], args.selection)
    res = {n: {"cpu": [], "wall": []} for n in variants}
    toks = {}
    dense_layers = cfg.dense_layers
    for rep in range(args.reps):
        for name in variants:
            cfg.dense_layers = 10**6 if name.startswith("dense") else dense_layers
            cfg.selection = sel(name)
            c = dyn() if name == "dense (DynamicCache)" else caches.get(name, cache)
            with torch.no_grad():
                out, tps_cpu, tps_wall = run(model, prompt, c, args.new, key)
            if name != "dense (DynamicCache)":
                c.crop(P)
            res[name]["cpu"].append(tps_cpu)
            res[name]["wall"].append(tps_wall)
            toks[name] = out
            print(f"[{time.time() - t0:.0f}s] rep {rep} {name}: {tps_cpu:.2f} tok/s cpu, {tps_wall:.2f} wall", flush=True)
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in res.items()}
    ref = toks["dense (DynamicCache)"]
    forced = {}
    for name in [n for n in variants if n != "dense (DynamicCache)"]:  # teacher forcing on the dense greedy tokens
        cfg.dense_layers = 10**6 if name.startswith("dense") else dense_layers
        cfg.selection = sel(name)
        c = caches.get(name, cache)
        seq = torch.cat([prompt[0], ref])[None]
        with torch.no_grad():
            forced[name] = torch.cat([model(input_ids=seq[:, t:t + 1], use_cache=True, **{key: c}).logits[0]
                                      for t in range(P, seq.shape[1] - 1)]).float().log_softmax(-1)
        c.crop(P)
    cfg.selection = args.selection
    lp_d = forced["dense (DSCache)"]
    tf = {n: {"top1_agreement": float((lp_d.argmax(-1) == lp_s.argmax(-1)).float().mean()),
              "dense_top1_in_ds_top5": float((lp_s.topk(5, -1).indices == lp_d.argmax(-1, keepdim=True)).any(-1)
                                             .float().mean()),
              "kl_dense_to_ds": float((lp_d.exp() * (lp_d - lp_s)).sum(-1).mean()), "steps": lp_d.shape[0]}
          for n, lp_s in forced.items() if n.startswith("double")}
    print(f"[{time.time() - t0:.0f}s] teacher forced: {tf}", flush=True)
    row = {"prompt_tokens": P, "new_tokens": args.new, "heavy_tokens": cfg.heavy_tokens, "r": cfg.heavy_channels,
           "label_bits": cfg.label_bits, "dense_layers": dense_layers, "selection": cfg.selection,
           "label_layout": cfg.label_layout, "union_layers": sum(model.ds_union),
           "tokens_per_s_cpu": {n: round(v["cpu"], 3) for n, v in med.items()},
           "tokens_per_s_wall": {n: round(v["wall"], 3) for n, v in med.items()},
           "speedup_vs_dynamic_cpu": round(med["double sparsity"]["cpu"] / med["dense (DynamicCache)"]["cpu"], 3),
           "speedup_vs_dscache_dense_cpu": round(med["double sparsity"]["cpu"] / med["dense (DSCache)"]["cpu"], 3),
           "speedup_head_vs_dynamic_cpu": (round(med["double sparsity (head)"]["cpu"]
                                                 / med["dense (DynamicCache)"]["cpu"], 3) if args.head else None),
           "greedy_agreement": {n: float((t == ref).float().mean()) for n, t in toks.items()},
           "teacher_forced": tf,
           "cache_bytes": cache.nbytes(), "reps": args.reps}
    if args.kv:
        row["cache_bytes_kv"] = caches["double sparsity (kv)"].nbytes()
        row["speedup_kv_vs_dynamic_cpu"] = round(med["double sparsity (kv)"]["cpu"]
                                                 / med["dense (DynamicCache)"]["cpu"], 3)
    append("ds_generate_speed", row)
    print(row)


if __name__ == "__main__":
    main()
