"""Double Sparsity's issue-time attention code, measured beside today's under today's evaluator (issue 16).

The issue asks that perplexity and retrieval stay "no worse than today's numbers" of docs/double_sparsity.md at the
commit it was filed against (61c8077), which were measured with an earlier evaluator. This script loads that
commit's ``ptq/sparse/double_sparsity.py`` from git history at run time (``git show COMMIT:PATH``, imported from a
temporary folder under a private module name; nothing is copied into the repo) and measures, in one run, with the
same windows, prompts and labels folder:

* ``--part ppl``: wikitext-2, ``--windows`` x 2048 tokens (bench/ds_smollm2.py's windows and NLL): dense; the
  issue-time code as 61c8077's bench ran it (``DSConfig(heavy_tokens=k, heavy_channels=r, label_bits=16)``: fp
  labels, sparse prefill, first 2 layers dense, no threshold; ``qk`` labels, one row per query head); today's
  accuracy-study path with ``selection="query-labels"``, ``channel_type="qk"`` at label_bits 16 (fp16 key labels,
  as bench/ds_smollm2.py runs it) and 32 (fp32 key labels: the issue-time arithmetic). Settings 1/8 r=d/4 and
  1/16 r=d/8.
* ``--part retrieval``: bench/ds_smollm2.py's pass-key prompts (same seeds), k = L/16, r = d/4, 4-bit labels:
  dense; the issue-time code with dense prefill and sparse decode (``sparse_prefill=False``, 61c8077's "decode"
  rows); the same with today's 4-bit quantizer (step and minimum rounded to fp16) patched into it; today's run time
  (``generate()`` with a ``DSCache``, query-labels, qk channels). During today's run every sparse decode call also
  computes the issue-time selection from the same query and cached keys, and counts the (step, layer, query head)
  whose kept token sets differ, and how many of those the fp16-rounded quantizer reproduces.

    python bench/ds_issue_reference.py --labels out/smollm2-ds --part all --windows 2 --trials 8

Rows go to ``bench/results/ds_issue_reference.jsonl`` (``--dry-run``: print only).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ISSUE_COMMIT = "61c8077"
DS_PATH = "ptq/sparse/double_sparsity.py"
TABLE = "ds_issue_reference"


def load_issue_code(commit: str = ISSUE_COMMIT, path: str = DS_PATH):
    """The module ``path`` as of ``commit``, read with ``git show`` and imported as ``_ds_issue_<commit>``.
    Raises LookupError when git or that commit is not available (e.g. a shallow clone)."""
    name = f"_ds_issue_{commit}"
    if name in sys.modules:
        return sys.modules[name]
    try:
        src = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise LookupError(f"cannot read {path} at commit {commit} from git history ({e}); "
                          "run from a full clone (git fetch --unshallow)") from None
    with tempfile.TemporaryDirectory(prefix="ds-issue-") as tmp:
        file = Path(tmp) / f"double_sparsity_{commit}.py"
        file.write_text(src)
        spec = importlib.util.spec_from_file_location(name, file)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look the module up while the class is built
        try:
            spec.loader.exec_module(mod)
        except Exception:
            del sys.modules[name]
            raise
    return mod


def _log(args, row: dict) -> None:
    print(json.dumps(row), flush=True)
    if not args.dry_run:
        from results_log import append

        append(TABLE, {**row, "issue_commit": args.commit})


def ppl_part(model, cfgm, labels, old, args):
    from ds_smollm2 import window_nll

    from calib.data import read_text, tokenize
    from ptq.eval.metrics import eval_windows
    from ptq.model_io import tokenizer_for
    from ptq.sparse.double_sparsity import DSConfig, install, uninstall

    wins = eval_windows(tokenize(read_text(args.text), tokenizer_for(args.model)), args.seqlen, args.windows)
    d = getattr(cfgm, "head_dim", None) or cfgm.hidden_size // cfgm.num_attention_heads
    runs = [("dense", "", None, None)]
    for frac, rdiv in ((8, 4), (16, 8)):
        kk, r = args.seqlen // frac, d // rdiv
        name = f"1/{frac} r=d/{rdiv} calibrated"
        runs.append((name, "issue-time", 16, old.DSConfig(heavy_tokens=kk, heavy_channels=r, label_bits=16)))
        for bits in (16, 32):
            runs.append((name, "today", bits, DSConfig(
                heavy_tokens=kk, heavy_channels=r, label_bits=bits, dense_layers=2, sparse_threshold=0,
                channel_type="qk", sparse_prefill=True, selection="query-labels", study=True)))
    half = args.seqlen // 2
    for name, code, bits, dcfg in runs:
        t0 = time.time()
        uninstall(model)  # today's: also clears model.ds_cfg
        if code == "issue-time":
            old.install(model, labels, dcfg)
        elif code == "today":
            install(model, labels, dcfg)
        nll = torch.stack([window_nll(model, wins[j:j + 1]) for j in range(wins.shape[0])])  # [n, L-1]
        _log(args, {"part": "ppl", "code": code, "config": name, "label_bits": bits,
                    "ppl": math.exp(nll.mean()), "ppl_tail": math.exp(nll[:, half - 1:].mean()),
                    "windows": wins.shape[0], "seqlen": args.seqlen, "seconds": round(time.time() - t0, 1)})
    uninstall(model)


class SelectionProbe:
    """Wraps today's ``sparse_decode`` (and the top-k it calls) during ``generate()``: per sparse decode call the
    kept sets of today's run time, of the issue-time formula, and of the issue-time formula with today's quantizer.
    """

    def __init__(self, old, k: int, bits: int):
        import ptq.sparse.double_sparsity as dsm
        import ptq.sparse.ds_runtime as rt

        self.old, self.k, self.bits, self.dsm, self.rt = old, k, bits, dsm, rt
        self.reset([])
        self._captured = None

    def reset(self, layers: list) -> None:
        """A new prompt: its cache's layers; counters at zero. ``differ``: (step, layer, head) whose kept sets
        differ from the issue-time code's; ``differ_after_rounding``: of those, the ones that still differ from the
        issue-time formula with today's quantizer; ``ties``: of those, a tie at today's k-th score; ``swapped``:
        tokens kept by today's code only, summed."""
        self.layers, self.calls = layers, {}
        self.stats = {"compared": 0, "differ": 0, "differ_after_rounding": 0, "ties": 0, "swapped": 0, "first": None}

    def __enter__(self):
        self._orig_decode, self._orig_topk = self.dsm.sparse_decode, self.rt.top_k_indices

        def topk(x, k):
            out = self._orig_topk(x, k)
            self._captured = (x, out)
            return out

        def decode(query, layer, *a, **kw):
            out = self._orig_decode(query, layer, *a, **kw)
            self.compare(query, layer)
            return out

        self.dsm.sparse_decode, self.rt.top_k_indices = decode, topk
        return self

    def __exit__(self, *exc):
        self.dsm.sparse_decode, self.rt.top_k_indices = self._orig_decode, self._orig_topk

    def _old_topk(self, query, keys, ch, quant):
        g = query.shape[1] // keys.shape[1]
        kr = keys.repeat_interleave(g, dim=1)
        ql = quant(self.old.gather_channels(query, ch), self.bits)
        kl = quant(self.old.gather_channels(kr, ch), self.bits)
        return torch.matmul(ql, kl.transpose(-1, -2))[:, :, 0].topk(self.k, dim=-1).indices  # [b, H, k]

    def compare(self, query, layer) -> None:
        x, new = self._captured  # today's scores [b, H, S] and kept indices [b, H, k]
        li = next(i for i, lay in enumerate(self.layers) if lay is layer)
        step = self.calls[li] = self.calls.get(li, 0) + 1
        keys, ch = layer.keys[:, :, :layer.n], layer.channels
        old = self._old_topk(query, keys, ch, self.old.fake_quant_labels)
        rnd = self._old_topk(query, keys, ch, self.rt.fake_quant)
        srt = lambda t: t.sort(-1).values  # noqa: E731
        new, old, rnd = srt(new), srt(old), srt(rnd)
        xs = x.sort(-1, descending=True).values
        for h in range(new.shape[1]):
            self.stats["compared"] += 1
            if torch.equal(new[0, h], old[0, h]):
                continue
            self.stats["differ"] += 1
            self.stats["differ_after_rounding"] += int(not torch.equal(new[0, h], rnd[0, h]))
            self.stats["ties"] += int(xs[0, h, self.k - 1] == xs[0, h, self.k])
            swapped = len(set(new[0, h].tolist()) - set(old[0, h].tolist()))
            self.stats["swapped"] += swapped
            if self.stats["first"] is None:
                self.stats["first"] = {"step": step, "layer": li, "head": h, "tokens_swapped": swapped}


@torch.no_grad()
def retrieval_part(model, cfgm, labels, old, args):
    from ds_smollm2 import DATA, retrieval_prompt

    from calib.data import read_text, tokenize
    from ptq.model_io import tokenizer_for
    from ptq.sparse.double_sparsity import DSConfig, install, make_cache, uninstall
    from ptq.sparse.ds_runtime import fake_quant

    tok = tokenizer_for(args.model)
    filler = tokenize(read_text(DATA / "janeausten"), tok)
    d = getattr(cfgm, "head_dim", None) or cfgm.hidden_size // cfgm.num_attention_heads
    L = args.length
    rng = random.Random(L)  # bench/ds_smollm2.py's prompts: the same seed and draw order
    prompts = [retrieval_prompt(tok, filler, L, args.keys, rng) for _ in range(args.trials)]
    kk, r, bits = L // 16, d // 4, 4
    name = f"k={kk} r=d/4 4-bit calibrated"
    runs = [("dense", "", "dense"),
            (name, "issue-time", "dense prefill, sparse decode"),
            (name, "issue-time, fp16 step/min", "dense prefill, sparse decode"),
            (name, "today", "run time: generate() with DSCache")]
    tokens = {}
    cache_key = "cache" if "cache" in type(model).forward.__code__.co_varnames else "past_key_values"
    orig_fq = old.fake_quant_labels
    for cfg_name, code, mode in runs:
        t0 = time.time()
        uninstall(model)
        if code.startswith("issue-time"):
            old.install(model, labels, old.DSConfig(heavy_tokens=kk, heavy_channels=r, label_bits=bits,
                                                    sparse_prefill=False))
            old.fake_quant_labels = fake_quant if code.endswith("step/min") else orig_fq
        elif code == "today":
            install(model, labels, DSConfig(heavy_tokens=kk, heavy_channels=r, label_bits=bits, dense_layers=2,
                                            sparse_threshold=0, channel_type="qk", selection="query-labels",
                                            study=False))
        probe = SelectionProbe(old, kk, bits) if code == "today" else None
        hits, gens, first_div, per_prompt = [], [], [], []
        for p, (ids, ans) in enumerate(prompts):
            extra = {}
            if probe is not None:
                extra[cache_key] = cache = make_cache(model)
                probe.reset(cache.layers)
            with probe if probe is not None else _null():
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                     pad_token_id=tok.eos_token_id, **extra)
            out = gen[0, ids.shape[1]:].tolist()
            gens.append(out)
            hits.append(int(ans in tok.decode(out)))
            ref = tokens.get("issue-time", [None] * len(prompts))[p]
            first_div.append(None if ref is None or ref == out else
                             next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), min(len(ref), len(out))))
            if probe is not None:
                per_prompt.append(dict(probe.stats))
        old.fake_quant_labels = orig_fq
        tokens[code] = gens
        row = {"part": "retrieval", "code": code, "config": cfg_name, "mode": mode, "length": L,
               "acc": sum(hits) / len(hits), "n": len(hits), "hits": "".join(map(str, hits)),
               "first_token_diff_vs_issue": first_div if "issue-time" in tokens and code != "issue-time" else None,
               "keys": args.keys, "seconds": round(time.time() - t0, 1)}
        if per_prompt:
            row["selection_vs_issue"] = per_prompt
        _log(args, row)
    uninstall(model)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main():
    from ds_smollm2 import DATA

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: SmolLM2 cache)")
    ap.add_argument("--labels", required=True, help="folder with double_sparsity.json (ptq compress output)")
    ap.add_argument("--commit", default=ISSUE_COMMIT, help="the commit whose double_sparsity.py is measured")
    ap.add_argument("--part", default="all", choices=["ppl", "retrieval", "all"])
    ap.add_argument("--text", default=str(DATA / "wikitext2_test.raw.txt"))
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--length", type=int, default=1024, help="retrieval prompt tokens")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--keys", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dry-run", action="store_true", help="print rows, do not append them")
    args = ap.parse_args()
    if not (Path(args.labels) / "double_sparsity.json").exists():
        sys.exit(f"error: {args.labels}/double_sparsity.json not found; run ptq compress --recipe double-sparsity")
    try:
        old = load_issue_code(args.commit)
    except LookupError as e:
        sys.exit(f"error: {e}")
    torch.set_num_threads(args.threads)
    if args.model is None:
        from ptq.models.smollm2 import ensure_cache

        args.model = str(ensure_cache())
    from ptq.model_io import full_model
    from ptq.sparse.double_sparsity import load_labels

    model, cfgm = full_model(args.model)
    labels, _ = load_labels(args.labels, "qk")  # 61c8077's bench: per-query-head qk labels
    if args.part in ("ppl", "all"):
        ppl_part(model, cfgm, labels, old, args)
    if args.part in ("retrieval", "all"):
        retrieval_part(model, cfgm, labels, old, args)


if __name__ == "__main__":
    main()
