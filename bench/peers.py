"""SmolLM2-135M side by side: ptq's weight quantizers (RTN, GPTQ, GPTQ + OCTAV clipping, learned rounding) and
peer tools, on the same calibration token ids, measured by one evaluator (`ptq eval`: wikitext-2 raw test, first
40 non-overlapping 512-token windows, no BOS). Prints perplexity, CPU seconds and peak RSS of each compression
(child rusage) and the ratios to the best row; appends every row to ``bench/results/peers_smollm2.jsonl``.

    python bench/peers.py --settings w3g64,w2g64 [--tools rtn,gptq,gptq-octav,learned-rounding] [--nsamples 32]

Headline settings are W3 g64 and W2 g64 (and W4 g128): SmolLM2-135M-Instruct comes from a Q4_1 GGUF, so W4 g32
is degenerate on it. Calibration: Jane Austen text (``$PTQ_DATA/janeausten``), ``--nsamples`` x 512 tokens, seed
0; every ptq row records the sha256 of the token ids it used (identical across rows).

Peers (auto-round, GPTQModel, llm-compressor) run from their own virtual environments named by
``PTQ_PEER_<TOOL>_PYTHON``; a peer whose interpreter is not given is skipped with its reason printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.results_log import append, run_child  # noqa: E402

DATA = Path(os.environ.get("PTQ_DATA", ROOT.parent / "shared" / "data"))
SETTINGS = {"w3g64": (3, 64), "w2g64": (2, 64), "w4g128": (4, 128), "w3pc": (3, -1)}
TOOLS = {  # tool -> (recipe, extra compress args)
    "rtn": ("rtn", []),
    "gptq": ("gptq", []),
    "gptq-octav": ("gptq", ["--clip", "octav"]),
    "learned-rounding": ("learned-rounding", []),
    "mixed-3.5": ("gptq", ["--bits", "3.5"]),  # mixed precision, average 3.5 bits (the setting's group size)
}
PEERS = ("auto-round", "gptqmodel", "llm-compressor")


def run(cmd: list[str]) -> tuple[float, float, int, str]:
    """One child at 1 thread from the repo root (`results_log.run_child`)."""
    return run_child(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"), cwd=ROOT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="w3g64")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib", default=str(DATA / "janeausten"))
    ap.add_argument("--table", default="peers_smollm2")
    args = ap.parse_args()
    from ptq.models.smollm2 import ensure_cache

    model = ensure_cache()
    text = str(DATA / "wikitext2_test.raw.txt")
    ptq = [sys.executable, "-m", "cli.main"]
    for peer in filter(None, args.peers.split(",")):
        py = os.environ.get(f"PTQ_PEER_{peer.upper().replace('-', '_')}_PYTHON")
        print(f"peer {peer}: skipped ({'no adapter in this version' if py else 'no interpreter given'})",
              flush=True)

    def ppl(folder) -> float:
        _, _, _, out = run(ptq + ["eval", str(folder), "--text", text, "--windows", str(args.windows), "--json"])
        return json.loads(out)["ppl"]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.settings.split(","):
            bits, gs = SETTINGS[s]
            for tool in args.tools.split(","):
                recipe, extra = TOOLS[tool]
                out = Path(tmp) / f"{tool}-{s}"
                cmd = ptq + ["compress", str(model), "--recipe", recipe, "--bits", str(bits), "--group-size",
                             str(gs), "--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", "512",
                             "--seed", "0", "--out", str(out), *extra]
                wall, cpu, rss, _ = run(cmd)
                man = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
                cal = (man.get("calibration") or {}).get("tokens_sha256")
                r = dict(setting=s, tool=f"ptq {tool}", ppl=ppl(out), cpu_s=round(cpu, 1), wall_s=round(wall, 1),
                         peak_rss_mib=round(rss / 2**20), windows=args.windows, nsamples=args.nsamples,
                         calib_tokens_sha256=cal)
                rows.append(r)
                append(args.table, r)
                print(f"{s:6s} {r['tool']:22s} ppl {r['ppl']:8.3f} cpu {cpu:7.0f}s peakRSS {r['peak_rss_mib']:5d} MiB",
                      flush=True)
    for s in args.settings.split(","):
        sub = [r for r in rows if r["setting"] == s]
        if not sub:
            continue
        best = min(sub, key=lambda r: r["ppl"])
        print(f"\n{s} ({args.windows} windows x 512; ratios to the best row, {best['tool']})")
        print("| tool | ppl | ppl / best | CPU s | CPU / best's | peak RSS MiB |")
        print("|---|---|---|---|---|---|")
        for r in sub:
            print(f"| {r['tool']} | {r['ppl']:.2f} | {r['ppl'] / best['ppl']:.3f} | {r['cpu_s']:.0f} | "
                  f"{r['cpu_s'] / best['cpu_s']:.2f} | {r['peak_rss_mib']} |")


if __name__ == "__main__":
    main()
