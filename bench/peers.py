"""SmolLM2-135M side by side: ptq's weight quantizers (RTN, GPTQ, GPTQ + OCTAV clipping, learned rounding) and
peer tools (auto-round, GPTQModel, llm-compressor), on the same calibration token ids, measured by one evaluator
(`ptq eval`: wikitext-2 raw test, first 40 non-overlapping 512-token windows, no BOS). Prints perplexity, CPU
seconds and peak RSS of each compression (child rusage: the whole process, imports and model load included) and
the ratios to the best peer; appends every row to ``bench/results/peers_smollm2.jsonl``.

    python bench/peers.py --settings w3g64 [--tools rtn,gptq,gptq-octav,learned-rounding]
        [--peers auto-round,gptqmodel,llm-compressor] [--autoround-iters N] [--nsamples 32]

Headline settings are W3 g64 and W2 g64 (and W4 g128): SmolLM2-135M-Instruct comes from a Q4_1 GGUF, so W4 g32
is degenerate on it. Calibration: Jane Austen text (``$PTQ_DATA/janeausten``), ``--nsamples`` x 512 tokens, seed
0, the tokenizer's BOS setting (none for SmolLM2, as in evaluation). The ids are drawn once here, written to a
JSON file in the temp folder and given to every peer; every row records their sha256 (ptq rows: the one in the
compressed model's manifest, which must be the same).

Peers run from their own virtual environments, named by ``PTQ_PEER_AUTO_ROUND_PYTHON``,
``PTQ_PEER_GPTQMODEL_PYTHON`` and ``PTQ_PEER_LLM_COMPRESSOR_PYTHON``; each runs its runner script in
``bench/peer_runners/`` (asymmetric grid, the same bits and group size as ptq, the peer's own defaults otherwise),
which saves the dequantized fp32 weights after checking every group holds at most 2^bits levels. A peer whose
interpreter is not given, or whose run fails, is skipped with the reason printed.
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
SETTINGS = {"w3g64": (3, 64), "w2g64": (2, 64), "w4g128": (4, 128), "w3pc": (3, -1), "w3g32": (3, 32)}
TOOLS = {  # tool -> (recipe, extra compress args, calibrated?)
    "rtn": ("rtn", [], False),
    "gptq": ("gptq", [], True),
    "gptq-octav": ("gptq", ["--clip", "octav"], True),
    "learned-rounding": ("learned-rounding", [], True),
    # longer schedules (AutoRound's own default is 200 steps of 8 sequences)
    "learned-rounding-i120": ("learned-rounding", ["--set", "learned-rounding.iters=120"], True),
    "learned-rounding-clip-i96": ("learned-rounding", ["--set", "learned-rounding.iters=96",
                                                       "--set", "learned-rounding.learn_clip=true"], True),
    # AutoRound's own schedule on ptq's pass: RTN start, 200 steps of 8 sequences, step 1/200, learned clipping
    "learned-rounding-autoround": ("learned-rounding", ["--set", "learned-rounding.iters=200",
                                                        "--set", "learned-rounding.batch=8",
                                                        "--set", "learned-rounding.lr=0.005"], True),
    "learned-rounding-i300": ("learned-rounding", ["--set", "learned-rounding.iters=300"], True),
    "mixed-3.5": ("gptq", ["--bits", "3.5"], True),  # mixed precision, average 3.5 bits (the setting's group size)
}
PEERS = {  # peer -> runner script in bench/peer_runners/
    "auto-round": "autoround_runner.py",
    "gptqmodel": "gptqmodel_runner.py",
    "llm-compressor": "llmcompressor_runner.py",
}


def env1() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run(cmd: list[str], cwd: Path = ROOT) -> tuple[float, float, int, str]:
    """One child at 1 thread (`results_log.run_child`), from the repo root unless ``cwd`` (peers run in the temp
    folder: some write log folders into their working directory)."""
    return run_child(cmd, env=env1(), cwd=cwd)


def peer_python(peer: str) -> str | None:
    return os.environ.get(f"PTQ_PEER_{peer.upper().replace('-', '_')}_PYTHON")


def write_ids(model: Path, calib: str, nsamples: int, seqlen: int, path: Path) -> str:
    """Draw the calibration ids exactly as `ptq compress` does and write them for the peers; returns sha256."""
    from calib.data import calibration_hash, load_calibration
    from ptq.model_io import tokenizer_for

    ids = load_calibration(calib, tokenizer_for(model), nsamples, seqlen, 0)
    sha = calibration_hash(ids)
    path.write_text(json.dumps({"ids": ids.tolist(), "sha256": sha}))
    return sha


def table(rows: list[dict], setting: str, windows: int, seqlen: int) -> None:
    sub = [r for r in rows if r["setting"] == setting]
    if not sub:
        return
    peers = [r for r in sub if not r["tool"].startswith("ptq ")]
    best = min(peers or sub, key=lambda r: r["ppl"])
    print(f"\n{setting} ({windows} windows x {seqlen}; ratios to the best {'peer' if peers else 'row'}, {best['tool']})")
    print("| tool | ppl | ppl / best peer | CPU s | CPU / best peer's | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for r in sub:
        print(f"| {r['tool']} | {r['ppl']:.2f} | {r['ppl'] / best['ppl']:.3f} | {r['cpu_s']:.0f} | "
              f"{r['cpu_s'] / best['cpu_s']:.2f} | {r['peak_rss_mib']} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="w3g64")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--autoround-iters", type=int, default=None, help="default: auto-round's own (200)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib", default=str(DATA / "janeausten"))
    ap.add_argument("--model", default=None, help="fp model folder (default: the SmolLM2-135M cache)")
    ap.add_argument("--text", default=str(DATA / "wikitext2_test.raw.txt"))
    ap.add_argument("--seqlen", type=int, default=512, help="calibration and evaluation window")
    ap.add_argument("--table", default="peers_smollm2")
    ap.add_argument("--no-log", action="store_true", help="print only, append no rows")
    args = ap.parse_args()
    if args.model is None:
        from ptq.models.smollm2 import ensure_cache

        args.model = str(ensure_cache())
    model = Path(args.model)
    ptq = [sys.executable, "-m", "cli.main"]
    tools = [t for t in args.tools.split(",") if t]
    peers = [p for p in args.peers.split(",") if p]
    for t in tools + peers:
        if t not in TOOLS and t not in PEERS:
            raise SystemExit(f"unknown tool {t!r}; ptq tools: {', '.join(TOOLS)}; peers: {', '.join(PEERS)}")

    def ppl(folder) -> float:
        _, _, _, out = run(ptq + ["eval", str(folder), "--text", args.text, "--windows", str(args.windows),
                                  "--seqlen", str(args.seqlen), "--json"])
        return json.loads(out)["ppl"]

    rows = []

    def record(r: dict, cmd: list[str]) -> None:
        r.update(windows=args.windows, nsamples=args.nsamples, calib=Path(args.calib).name)
        rows.append(r)
        if not args.no_log:
            append(args.table, r)
        print(f"{r['setting']:6s} {r['tool']:22s} ppl {r['ppl']:8.3f} cpu {r['cpu_s']:7.0f}s "
              f"peakRSS {r['peak_rss_mib']:5d} MiB", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "calibration_ids.json"
        sha = write_ids(model, args.calib, args.nsamples, args.seqlen, ids)
        print(f"calibration ids: {args.nsamples} x {args.seqlen}, sha256 {sha[:16]}...", flush=True)
        for s in args.settings.split(","):
            bits, gs = SETTINGS[s]
            for tool in tools:
                recipe, extra, calibrated = TOOLS[tool]
                out = Path(tmp) / f"{tool}-{s}"
                cal_args = ["--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                            "--seed", "0"] if calibrated else []
                cmd = ptq + ["compress", str(model), "--recipe", recipe, "--bits", str(bits), "--group-size",
                             str(gs), *cal_args, "--out", str(out), *extra]
                wall, cpu, rss, _ = run(cmd)
                man = json.loads((out / "manifest.json").read_text())
                cal = (man.get("calibration") or {}).get("tokens_sha256")
                if calibrated and cal != sha:
                    raise SystemExit(f"ptq {tool} calibrated on ids {cal}, not the peers' {sha}")
                rep = json.loads((out / "report.json").read_text())
                record(dict(setting=s, tool=f"ptq {tool}", ppl=ppl(out), bits=bits, group_size=gs,
                            cpu_s=round(cpu, 1), wall_s=round(wall, 1), peak_rss_mib=round(rss / 2**20),
                            passes=rep.get("passes"), stages=rep.get("stages"), calib_tokens_sha256=cal), cmd)
            for peer in peers:
                py = peer_python(peer)
                if not py:
                    print(f"{s:6s} {peer:22s} skipped: no interpreter (set "
                          f"PTQ_PEER_{peer.upper().replace('-', '_')}_PYTHON)", flush=True)
                    continue
                out = Path(tmp) / f"{peer}-{s}"
                cmd = [py, str(ROOT / "bench" / "peer_runners" / PEERS[peer]), "--model", str(model), "--ids",
                       str(ids), "--bits", str(bits), "--group-size", str(gs), "--out", str(out)]
                if peer == "auto-round" and args.autoround_iters is not None:
                    cmd += ["--iters", str(args.autoround_iters)]
                try:
                    wall, cpu, rss, _ = run(cmd, cwd=Path(tmp))
                except SystemExit as e:
                    print(f"{s:6s} {peer:22s} skipped: run failed: {str(e)[-600:]}", flush=True)
                    continue
                info = json.loads((out / "peer_info.json").read_text())
                record(dict(setting=s, tool=peer, ppl=ppl(out), bits=bits, group_size=gs, cpu_s=round(cpu, 1),
                            wall_s=round(wall, 1), peak_rss_mib=round(rss / 2**20), peer=info,
                            calib_tokens_sha256=sha), cmd)
    for s in args.settings.split(","):
        table(rows, s, args.windows, args.seqlen)


if __name__ == "__main__":
    main()
