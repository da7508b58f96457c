"""Attention time of one decode step, dense vs Double Sparsity run time, on CPU (SmolLM2-135M head shapes: 9 query
heads, 3 KV heads, head_dim 64), 4k-32k cached tokens, k = S/16 tokens, r = d/8 label channels.

dense:  F.scaled_dot_product_attention(q [1,H,1,d], K/V [1,Hkv,S,d], enable_gqa=True) (what transformers' sdpa
        path runs in decode) and the same as two batched matmuls per KV head; the faster one is the reference.
DS:     `ptq.sparse.ds_runtime.sparse_decode` on a filled `DSLayer`: label scores as one matmul over the label
        cache (fp32, fp16, or 4-bit codes), a batched top-k (numpy introselect), rows of K/V read by KV-head index.
        ``query-labels`` (the reference layout): each query head's own channels and a top-k per query head,
        with the per-query-head label cache [H, r, S] or the union label cache [Hkv, U, S] (``union``: per KV
        head the union of its query heads' channels, each head's query vector zero outside its own); ``kv``: a
        label cache [Hkv, r, S] and one top-k per KV head shared by its query heads; ``head``: the KV-head label
        cache with a top-k per query head.
        Channels: random per query head by default (the worst case for the union: no channel shared within a
        group, U = G r), or with ``--labels FOLDER`` the calibrated ``qk`` channels of one layer of a
        ``ptq compress --recipe double-sparsity`` folder (``--layer``; default: the sparse layer with the median U).

Caches: in a model every decoder layer has its own K/V, so a decode step finds none of them in the CPU caches
(SmolLM2 at 16k tokens: 25 MB of fp32 K/V per layer, 30 layers: more than any CPU cache). ``--cold-mb M``
(default 128) builds as many layers as make M MB of K/V (distinct random contents, each with its own label cache;
the variants of one layer share its K/V buffers) and times a sweep over all of them, as a decode step walks the
layers: every call reads its layer's K/V and labels from memory. ``--cold-mb 0`` times one layer over and over
(its K/V and labels stay in cache as far as they fit: the earlier rows' "hot" mode).

Timings: thread CPU time (unaffected by waiting for a core on a loaded machine), ``--reps`` interleaved
repetitions (all variants inside each repetition), each the mean over sweeps of at least ``--inner`` calls;
median over repetitions. Speedups are paired: per repetition, the faster dense variant's time over the variant's,
then the median of those ratios (the machine's memory bandwidth drifts between repetitions; a pair shares it).
torch threads 1. Rows go to ``bench/results/ds_attention_speed.jsonl``.

    python bench/ds_attention_speed.py --lengths 4096,8192,16384,32768
    python bench/ds_attention_speed.py --lengths 4096,8192,16384,32768 --labels out/smollm2-ds
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_log import append  # noqa: E402

from ptq.sparse.ds_runtime import DSLayer, sparse_decode, union_rows  # noqa: E402

TABLE = "ds_attention_speed"


def dense_bmm(q, K, V, scale):
    """``q [Hkv, G, d]``, ``K/V [Hkv, S, d]``."""
    return torch.bmm(torch.softmax(torch.bmm(q, K.transpose(1, 2)) * scale, -1), V)


def timed(fn, layers, inner):
    """Mean thread CPU seconds of ``fn(layer)`` over sweeps across ``layers`` (at least ``inner`` calls)."""
    sweeps = max(1, -(-inner // len(layers)))
    t = time.thread_time()
    for _ in range(sweeps):
        for lay in layers:
            fn(lay)
    return (time.thread_time() - t) / (sweeps * len(layers))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--frac", type=int, default=16, help="k = S / frac")
    ap.add_argument("--rdiv", type=int, default=8, help="r = d / rdiv")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--cold-mb", type=int, default=128, help="MB of K/V over distinct layers (0: one hot layer)")
    ap.add_argument("--labels", default=None, help="folder with double_sparsity.json: calibrated qk channels")
    ap.add_argument("--layer", type=int, default=None, help="with --labels: the layer (default: median U)")
    ap.add_argument("--no-log", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    H, Hkv, d = 9, 3, 64
    G, scale, r = H // Hkv, d**-0.5, d // args.rdiv
    gen = torch.Generator().manual_seed(0)
    cal, layer_i = None, None
    if args.labels:
        from ptq.sparse.double_sparsity import load_labels

        labels, _ = load_labels(args.labels, "qk")
        sparse = {i: lab[:, :r] for i, lab in labels.items() if i >= 2}  # the first 2 layers run dense
        us = sorted((union_rows(c, Hkv), i) for i, c in sparse.items())
        layer_i = args.layer if args.layer is not None else us[len(us) // 2][1]
        cal = labels[layer_i][:, :r].contiguous()
    ds_names = ("DS query-labels fp32", "DS query-labels fp16", "DS query-labels 4-bit", "DS query-labels union fp32",
                "DS query-labels union fp16", "DS kv fp16", "DS kv 4-bit", "DS head fp16")
    print("| S | k | r | dense sdpa ms | dense bmm ms | " + " | ".join(f"{n} ms" for n in ds_names) + " | "
          + " | ".join(f"speedup {n[3:]}" for n in ds_names) + " |")
    print("|---" * (5 + 2 * len(ds_names)) + "|")
    for S in [int(x) for x in args.lengths.split(",")]:
        kk = S // args.frac
        n_layers = max(1, -(-args.cold_mb * 2**20 // (2 * Hkv * S * d * 4))) if args.cold_mb else 1
        q = torch.randn(1, H, 1, d, generator=gen)
        ch = torch.stack([torch.randperm(d, generator=gen)[:r] for _ in range(H)])  # per query head
        if cal is not None:
            ch = cal
        U = union_rows(ch, Hkv)
        kinds = ((Hkv, 16, False), (Hkv, 4, False), (H, 32, False), (H, 16, False), (H, 4, False), (H, 32, True),
                 (H, 16, True))
        model = []  # per layer: K, V [1, Hkv, S, d], K/V [Hkv, S, d] contiguous, {kind: DSLayer}
        for _ in range(n_layers):
            K, V = torch.randn(1, Hkv, S, d, generator=gen), torch.randn(1, Hkv, S, d, generator=gen)
            lays = {}
            for rows, bits, union in kinds:
                lay = DSLayer(ch[:rows].clone(), bits, union)
                for s in range(0, S, 4096):  # filled in prefill-sized chunks
                    lay.update(K[:, :, s:s + 4096], V[:, :, s:s + 4096])
                if lays:  # one K/V per layer: share the first variant's buffers (same contents)
                    first = next(iter(lays.values()))
                    lay.keys, lay.values = first.keys, first.values
                lays[rows, bits, union] = lay
            model.append((K, V, K[0].contiguous(), V[0].contiguous(), lays))
        lays = model[0][4]
        lab_bytes = {n: lays[k].nbytes()["labels"] // S for n, k in (
            ("DS query-labels fp32", (H, 32, False)), ("DS query-labels fp16", (H, 16, False)),
            ("DS query-labels 4-bit", (H, 4, False)), ("DS query-labels union fp32", (H, 32, True)),
            ("DS query-labels union fp16", (H, 16, True)), ("DS kv fp16", (Hkv, 16, False)),
            ("DS kv 4-bit", (Hkv, 4, False)), ("DS head fp16", (Hkv, 16, False)))}
        qg = q.view(Hkv, G, d)

        def ds(kind, bits, selection):
            return lambda m: sparse_decode(q, m[4][kind], kk, scale, bits, selection)

        variants = {
            "dense sdpa": lambda m: F.scaled_dot_product_attention(q, m[0], m[1], scale=scale, enable_gqa=True),
            "dense bmm": lambda m: dense_bmm(qg, m[2], m[3], scale),
            "DS query-labels fp32": ds((H, 32, False), 32, "query-labels"),
            "DS query-labels fp16": ds((H, 16, False), 16, "query-labels"),
            "DS query-labels 4-bit": ds((H, 4, False), 4, "query-labels"),
            "DS query-labels union fp32": ds((H, 32, True), 32, "query-labels"),
            "DS query-labels union fp16": ds((H, 16, True), 16, "query-labels"),
            "DS kv fp16": ds((Hkv, 16, False), 16, "kv"),
            "DS kv 4-bit": ds((Hkv, 4, False), 4, "kv"),
            "DS head fp16": ds((Hkv, 16, False), 16, "head"),
        }
        times = {n: [] for n in variants}
        for f in variants.values():
            timed(f, model, 2)
        for _ in range(args.reps):
            for n, f in variants.items():
                times[n].append(timed(f, model, args.inner))
        ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
        dense_rep = [min(a, b) for a, b in zip(times["dense sdpa"], times["dense bmm"])]
        dense = 1e3 * statistics.median(dense_rep)
        sp = {n: statistics.median(a / b for a, b in zip(dense_rep, times[n])) for n in ds_names}
        del model, lays
        print(f"| {S} | {kk} | {r} | {ms['dense sdpa']:.3f} | {ms['dense bmm']:.3f} | "
              + " | ".join(f"{ms[n]:.3f}" for n in ds_names) + " | "
              + " | ".join(f"{sp[n]:.2f}" for n in ds_names) + " |", flush=True)
        if not args.no_log:
            append(TABLE, {"S": S, "k": kk, "r": r, "heads": H, "kv_heads": Hkv, "head_dim": d,
                           "channels": "random" if cal is None else f"calibrated layer {layer_i}", "union_rows": U,
                           "label_bytes_per_token": lab_bytes,
                           "ms": {n: round(v, 4) for n, v in ms.items()}, "dense_ms": round(dense, 4),
                           "speedup": {n: round(v, 3) for n, v in sp.items()},
                           "reps": args.reps, "inner": args.inner, "layers": n_layers,
                           "cache": "cold" if args.cold_mb else "hot", "speedup_stat": "median of paired ratios"})


if __name__ == "__main__":
    main()
