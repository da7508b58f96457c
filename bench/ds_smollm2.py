"""Double Sparsity on SmolLM2-135M: wikitext-2 perplexity at 2048 tokens and planted pass-key retrieval.

Perplexity: ``--windows`` non-overlapping 2048-token wikitext-2 test windows (no BOS), every position scored
("all") and only positions >= 1024 ("tail", where a query sees >= 1024 keys, so k = 128..512 really prunes).
Configs: dense; token sparsity k/2048 in {1/4, 1/8, 1/16} x r in {d/4, d/8} x {calibrated, random} labels
(fp labels), plus calibrated 4-bit labels at r = d/4. First two layers dense, sparse prefill (the reference's
perplexity protocol) through the accuracy-study path: each query keeps its own top-k, as token-by-token decoding
with the run time's DSCache would (tests/test_double_sparsity.py checks the equality). ``--selection kv`` (this
script's default: KV-head labels, one top-k per KV head), ``head`` (KV-head labels, a top-k per query head) or
``query-labels`` (per-query-head labels and top-k: the reference's layout, a run-time option; use
``--channel-type qk``).

Retrieval: ``--keys`` lines "The pass key for NAME is NNNNN." planted at random depths of Jane Austen filler;
the prompt ends with "... The pass key for NAME is" and 8 tokens are decoded greedily; a hit when the number
appears. "runtime" = generate() with the DSCache (dense prefill, label-cache sparse decode, SGLang style);
"all" = sparse prefill and decode through the accuracy-study path (a DynamicCache is passed).

    python bench/ds_smollm2.py --labels out/smollm2-ds --part ppl --windows 2
    python bench/ds_smollm2.py --labels out/smollm2-ds --part retrieval --lengths 1024 --heavy 16 --trials 8

Rows go to ``bench/results/ds_smollm2_ppl.jsonl`` and ``ds_smollm2_retrieval.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_log import append  # noqa: E402

from ptq.model_io import full_model, tokenizer_for
from ptq.sparse.double_sparsity import DSConfig, install, load_labels, random_labels, uninstall

DATA = Path(os.environ.get("PTQ_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def selected(name: str, only: str) -> bool:
    """``--only``: comma list of substrings of config names; an item starting with ``=`` must match exactly."""
    return any(name == o[1:] if o.startswith("=") else o in name for o in only.split(","))


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per-position NLL ``[L-1]`` of one window ``ids [1, L]`` (lm_head applied in chunks)."""
    h = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
    out = []
    for s in range(0, ids.shape[1] - 1, chunk):
        e = min(ids.shape[1] - 1, s + chunk)
        lp = F.log_softmax(model.lm_head(h[s:e]).float(), -1)
        out.append(-lp.gather(1, ids[0, s + 1:e + 1, None])[:, 0])
    return torch.cat(out)


def ppl_table(model, cfgm, labels_cal, args):
    from calib.data import read_text, tokenize
    from ptq.eval.metrics import eval_windows

    tok = tokenizer_for(args.model)
    wins = eval_windows(tokenize(read_text(args.text), tok), args.seqlen, args.windows)
    H = cfgm.num_attention_heads
    d = getattr(cfgm, "head_dim", None) or cfgm.hidden_size // H
    rows_lab = next(iter(labels_cal.values())).shape[0]
    labels_rand = {i: random_labels(rows_lab, d, seed=1000 + i) for i in range(cfgm.num_hidden_layers)}
    runs = [("dense", None, None)]
    for frac in (4, 8, 16):
        kk = args.seqlen // frac
        for rdiv in (4, 8):
            for name, lab in (("calibrated", labels_cal), ("random", labels_rand)):
                runs.append((f"1/{frac} r=d/{rdiv} {name}", lab,
                             DSConfig(heavy_tokens=kk, heavy_channels=d // rdiv, label_bits=16, study=True,
                                      selection=args.selection)))
        runs.append((f"1/{frac} r=d/4 calibrated 4-bit", labels_cal,
                     DSConfig(heavy_tokens=kk, heavy_channels=d // 4, label_bits=4, study=True,
                              selection=args.selection)))
    if args.only:
        runs = [r for r in runs if selected(r[0], args.only)]
    half = args.seqlen // 2
    rows = []
    for name, lab, dcfg in runs:
        t0 = time.time()
        if dcfg is None:
            uninstall(model)
        else:
            install(model, lab, dcfg)
        nll = torch.stack([window_nll(model, wins[j:j + 1]) for j in range(wins.shape[0])])  # [n, L-1]
        row = {"config": name, "ppl": math.exp(nll.mean()), "ppl_tail": math.exp(nll[:, half - 1:].mean()),
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        append("ds_smollm2_ppl", {**row, "windows": wins.shape[0], "seqlen": args.seqlen,
                                  "selection": args.selection, "channel_type": args.channel_type})
        print(json.dumps(row), flush=True)
    uninstall(model)
    print(f"\nwikitext-2 test, {wins.shape[0]} windows x {args.seqlen} tokens, first 2 layers dense")
    print("| config | ppl (all) | ppl (pos >= %d) |" % half)
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['ppl']:.3f} | {r['ppl_tail']:.3f} |")
    return rows


NAMES = ["Alice", "Bernard", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ingrid", "Jonas", "Kenji",
         "Lucia", "Mateo", "Nadia", "Oscar", "Priya"]


def retrieval_prompt(tok, filler_ids: torch.Tensor, length: int, nkeys: int, rng: random.Random):
    """Token ids of ~``length`` tokens: filler with ``nkeys`` planted pass keys, question at the end."""
    names = rng.sample(NAMES, nkeys)
    keys = {n: str(rng.randint(10000, 99999)) for n in names}
    target = rng.choice(names)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    lines = [enc(f"\nThe pass key for {n} is {keys[n]}. Remember it.\n") for n in names]
    tail = enc(f"\n\nWhat is the pass key for {target}? The pass key for {target} is")
    body = length - len(tail) - sum(map(len, lines))
    start = rng.randint(0, filler_ids.numel() - body - 1)
    fill = filler_ids[start:start + body].tolist()
    depths = sorted(rng.sample(range(0, body), nkeys))
    out, prev = [], 0
    for dpt, ln in zip(depths, lines):
        out += fill[prev:dpt] + ln
        prev = dpt
    out += fill[prev:] + tail
    return torch.tensor([out]), keys[target]


@torch.no_grad()
def retrieval_table(model, cfgm, labels_cal, args):
    from calib.data import read_text, tokenize

    tok = tokenizer_for(args.model)
    filler = tokenize(read_text(DATA / "janeausten"), tok)
    H = cfgm.num_attention_heads
    d = getattr(cfgm, "head_dim", None) or cfgm.hidden_size // H
    rows_lab = next(iter(labels_cal.values())).shape[0]
    labels_rand = {i: random_labels(rows_lab, d, seed=1000 + i) for i in range(cfgm.num_hidden_layers)}
    rows = []
    cache_key = "cache" if "cache" in type(model).forward.__code__.co_varnames else "past_key_values"
    for L in [int(x) for x in args.lengths.split(",")]:
        rng = random.Random(L)
        prompts = [retrieval_prompt(tok, filler, L, args.keys, rng) for _ in range(args.trials)]
        runs = [("dense", None, None)]
        for frac in [int(x) for x in args.heavy.split(",")]:
            kk = L // frac
            for mode in ("all", "runtime"):
                runs.append((f"k={kk} r=d/4 4-bit calibrated ({mode})", labels_cal,
                             DSConfig(heavy_tokens=kk, heavy_channels=d // 4, label_bits=4, study=True,
                                      selection=args.selection)))
            runs.append((f"k={kk} r=d/4 4-bit random (all)", labels_rand,
                         DSConfig(heavy_tokens=kk, heavy_channels=d // 4, label_bits=4, study=True,
                                  selection=args.selection)))
        if args.only:
            runs = [r for r in runs if selected(r[0], args.only)]
        for name, lab, dcfg in runs:
            t0 = time.time()
            uninstall(model) if dcfg is None else install(model, lab, dcfg)
            hits = 0
            from transformers import DynamicCache

            for ids, ans in prompts:
                extra = {cache_key: DynamicCache()} if name.endswith("(all)") else {}  # study path, not DSCache
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                     pad_token_id=tok.eos_token_id, **extra)
                hits += ans in tok.decode(gen[0, ids.shape[1]:])
            row = {"length": L, "config": name, "acc": hits / len(prompts), "n": len(prompts),
                   "seconds": round(time.time() - t0, 1)}
            rows.append(row)
            append("ds_smollm2_retrieval", {**row, "keys": args.keys, "selection": args.selection,
                                            "channel_type": args.channel_type})
            print(json.dumps(row), flush=True)
    uninstall(model)
    print(f"\npass-key retrieval, {args.keys} keys planted in Austen filler, {args.trials} prompts per length")
    print("| length | config | accuracy |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['length']} | {r['config']} | {r['acc']:.2f} ({round(r['acc'] * r['n'])}/{r['n']}) |")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: SmolLM2 cache)")
    ap.add_argument("--labels", required=True, help="folder with double_sparsity.json (ptq compress output)")
    ap.add_argument("--part", default="all", choices=["ppl", "retrieval", "all"])
    ap.add_argument("--text", default=str(DATA / "wikitext2_test.raw.txt"))
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--only", default="", help="comma list of substrings selecting configs (=NAME: exact)")
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--heavy", default="16", help="retrieval: comma list of x, k = length / x")
    ap.add_argument("--keys", type=int, default=4)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--selection", default="kv", choices=["kv", "head", "query-labels"])
    ap.add_argument("--channel-type", default="qk_kv", choices=["qk_kv", "qk", "q", "k"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        from ptq.models.smollm2 import ensure_cache

        args.model = str(ensure_cache())
    model, cfgm = full_model(args.model)
    labels, _ = load_labels(args.labels, args.channel_type)
    if args.part in ("ppl", "all"):
        ppl_table(model, cfgm, labels, args)
    if args.part in ("retrieval", "all"):
        retrieval_table(model, cfgm, labels, args)


if __name__ == "__main__":
    main()
