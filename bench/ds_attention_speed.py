"""Attention-op time, Double Sparsity vs dense, one decode step on CPU (SmolLM2-135M shapes: 9 query heads,
3 KV heads, head_dim 64), 4k-16k cached tokens.

dense:   s = q K^T / sqrt(d) (GQA, per KV head), softmax, @ V                     reads K, V: 2 * Hkv * S * d
DS:      s~ = q[C] K_label^T (label cache [rows, S, r], rows = H for `qk` labels, Hkv for `qk_kv`),
         T = top-k(s~), then exact attention on K[T], V[T]                        reads rows*S*r + 2*H*k*d
no-cache: the transformers path (`double_sparse_attention`), which gathers the label channels from the full K
         at every step (no label cache), shown for honesty: it reads all of K.

Timings: thread CPU time (`time.thread_time`), ``--reps`` interleaved repetitions (variants alternate inside
each repetition), each the mean of ``--inner`` calls; the median over repetitions is reported; torch threads 1.

    .venv/bin/python bench/ds_attention_speed.py --lengths 4096,8192,16384
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ptq.sparse.double_sparsity import DSConfig, double_sparse_attention


def dense_decode(q, K, V, scale):
    """``q [Hkv, g, d]``, ``K/V [Hkv, S, d]`` -> ``[Hkv, g, d]``."""
    p = torch.softmax(torch.bmm(q, K.transpose(1, 2)) * scale, -1)
    return torch.bmm(p, V)


def ds_decode(q, K, V, label_cache, ch, kk, scale):
    """Label-cache Double Sparsity decode. ``q [Hkv, g, d]``, ``label_cache [rows, S, r]``, ``ch [rows, r]``."""
    Hkv, g, d = q.shape
    S = K.shape[1]
    rows = label_cache.shape[0]
    if rows == Hkv:  # one label set per KV group: q heads of a group share the cache
        ql = q.gather(-1, ch[:, None, :].expand(Hkv, g, ch.shape[1]))  # [Hkv, g, r]
        approx = torch.bmm(ql, label_cache.transpose(1, 2))  # [Hkv, g, S]
    else:  # per query head
        qh = q.reshape(Hkv * g, 1, d)
        ql = qh.gather(-1, ch[:, None, :])  # [H, 1, r]
        approx = torch.bmm(ql, label_cache.transpose(1, 2)).view(Hkv, g, S)
    idx = approx.topk(kk, -1).indices  # [Hkv, g, k]
    flat = (idx + torch.arange(Hkv)[:, None, None] * S).reshape(-1)
    Ks = K.reshape(Hkv * S, d).index_select(0, flat).view(Hkv * g, kk, d)
    Vs = V.reshape(Hkv * S, d).index_select(0, flat).view(Hkv * g, kk, d)
    p = torch.softmax(torch.bmm(q.reshape(Hkv * g, 1, d), Ks.transpose(1, 2)) * scale, -1)
    return torch.bmm(p, Vs).view(Hkv, g, d)


def timed(fn, inner):
    """Mean CPU time of this thread per call (``thread_time``: unaffected by waiting for a core on a loaded
    machine; wall time there measures the scheduler, not the op)."""
    t = time.thread_time()
    for _ in range(inner):
        fn()
    return (time.thread_time() - t) / inner


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--heavy", default="16", help="token sparsity denominators: k = S / x")
    ap.add_argument("--r", default="16,8")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    H, Hkv, d = 9, 3, 64
    g, scale = H // Hkv, d**-0.5
    gen = torch.Generator().manual_seed(0)
    rows = []
    for S in [int(x) for x in args.lengths.split(",")]:
        K, V = torch.randn(Hkv, S, d, generator=gen), torch.randn(Hkv, S, d, generator=gen)
        q = torch.randn(Hkv, g, d, generator=gen)
        variants = {"dense": lambda: dense_decode(q, K, V, scale)}
        for frac in [int(x) for x in args.heavy.split(",")]:
            kk = S // frac
            for r in [int(x) for x in args.r.split(",")]:
                ch_h = torch.stack([torch.randperm(d, generator=gen)[:r] for _ in range(H)])
                ch_kv = torch.stack([torch.randperm(d, generator=gen)[:r] for _ in range(Hkv)])
                Kh = K.repeat_interleave(g, 0)
                lc_h = Kh.gather(-1, ch_h[:, None, :].expand(H, S, r)).contiguous()  # [H, S, r]
                lc_kv = K.gather(-1, ch_kv[:, None, :].expand(Hkv, S, r)).contiguous()  # [Hkv, S, r]
                variants[f"DS k=S/{frac} r={r} qk (label cache [H,S,r])"] = (
                    lambda lc=lc_h, ch=ch_h, kk=kk: ds_decode(q, K, V, lc, ch, kk, scale))
                variants[f"DS k=S/{frac} r={r} qk_kv (label cache [Hkv,S,r])"] = (
                    lambda lc=lc_kv, ch=ch_kv, kk=kk: ds_decode(q, K, V, lc, ch, kk, scale))
                cfg = DSConfig(heavy_tokens=kk, heavy_channels=r, label_bits=16)
                labels = torch.cat([ch_h, torch.stack([torch.tensor([c for c in range(d) if c not in set(x.tolist())])
                                                       for x in ch_h])], 1)
                q4, K4, V4 = q.reshape(1, H, 1, d), K[None], V[None]
                variants[f"DS k=S/{frac} r={r} transformers path (no label cache)"] = (
                    lambda cfg=cfg, labels=labels: double_sparse_attention(q4, K4, V4, labels, cfg, scale, None))
        times = {n: [] for n in variants}
        for n, f in variants.items():  # warm-up
            timed(f, 2)
        for _ in range(args.reps):
            for n, f in variants.items():
                times[n].append(timed(f, args.inner))
        med = {n: statistics.median(t) for n, t in times.items()}
        for n in variants:
            rows.append((S, n, med[n] * 1e3, med[n] / med["dense"]))
    print(f"\nattention op, one decode step, H={H} Hkv={Hkv} d={d}, threads={args.threads}, "
          f"thread CPU time, median of {args.reps} interleaved reps x {args.inner} calls")
    print("| S | variant | ms | time ratio vs dense |")
    print("|---|---|---|---|")
    for S, n, ms, ratio in rows:
        print(f"| {S} | {n} | {ms:.3f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
