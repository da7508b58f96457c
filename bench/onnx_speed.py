"""SmolLM2-135M decode speed of ONNX exports, side by side in one run: fp32 (fused graph), ptq int4 (fused graph,
our codes) in our decode loop on plain onnxruntime and in onnxruntime-genai, and the onnxruntime-genai model
builder's int4 model (``-p int4 -e cpu``, from the fp32 model) in both runtimes; plus wikitext-2 perplexity of the
ONNX models themselves (first ``--windows`` 512-token windows, no BOS, the exported accuracy level).

    ptq compress smollm2-135m --recipe gptq --bits 4 --group-size 128 --asym --format gptq --out OUT
    python bench/onnx_speed.py --compressed OUT [--compressed OUT2 ...] --peer-python PEER_VENV/bin/python \
        --embed-bits 4 --embed-method gptq [--embed-sym auto] [--builder-extra block_size=64] [--build-only] \
        [--rounds 5 --paired-reps 3]

Several ``--compressed`` folders are exported and timed in the same run (variants ``ptq int4 (<folder name>)``).
``--build-only`` builds the ONNX folders and their perplexities (cached in the work folder, ``ppl_<windows>x<seqlen>
.json``) without timing, so the timed run (on a quiet machine) does no building.

PEER_VENV: onnxruntime-genai (+ torch, transformers, onnx_ir for its builder). Each timed variant runs in its own
child process (peak RSS = that process): one warm-up generation, then ``--reps`` generations of ``--new`` greedy
tokens after a ``--prompt``-token prompt (batch 1), in ``--rounds`` interleaved rounds over all variants (order
reversed every other round, reps pooled: slow drift of the shared machine's load hits every variant alike);
prefill = the prompt's forward, decode tok/s = tokens after the first / their time; medians. "our loop" feeds each step's ``present.*`` back as ``past_key_values.*``
(as ptq.export.onnx_validate.decode_feed does; numpy + onnxruntime only in that process); onnxruntime-genai shares one past/present buffer. The machine load
(``os.getloadavg``) before and after the timing is in every row. Then, per runtime, one process with every int4
model and their decode steps interleaved (bench/onnx_paired.py, ``--paired-reps`` generations): the step-time
ratio to the builder's model that load drift cannot skew (``paired_speed_vs_builder_int4``). Rows:
bench/results/onnx_speed.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ---------------------------------------------------------------------------------------------- children
def child_ours(d: Path, ids: list[int], n_new: int, reps: int, threads: int) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    sess = ort.InferenceSession(str(d / "model.onnx"), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    prompt = np.array([ids], np.int64)

    def run(n):
        feed = empty_feed(sess, d, prompt)
        t0 = time.perf_counter()
        res = dict(zip(names, sess.run(names, feed)))
        t1 = time.perf_counter()
        out, total = [int(res["logits"][0, -1].argmax())], prompt.shape[1]
        for _ in range(n - 1):
            total += 1
            feed = {"input_ids": np.array([[out[-1]]], np.int64), "attention_mask": np.ones((1, total), np.int64)}
            feed.update({"past_key_values." + k[8:]: v for k, v in res.items() if k.startswith("present.")})
            res = dict(zip(names, sess.run(names, feed)))
            out.append(int(res["logits"][0, -1].argmax()))
        return t1 - t0, (n - 1) / (time.perf_counter() - t1), out

    return _reps(run, n_new, reps)


def empty_feed(sess, d: Path, ids: np.ndarray) -> dict:
    """Prefill feed: ``ids``, a mask of ones, empty ``past_key_values.*`` (kv heads / head size from
    genai_config.json: the builder's graph leaves the head size symbolic)."""
    dec = json.loads((d / "genai_config.json").read_text())["model"]["decoder"]
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((ids.shape[0], dec["num_key_value_heads"], 0, dec["head_size"]), np.float32)
    return feed


def child_genai(d: Path, ids: list[int], n_new: int, reps: int, threads: int) -> dict:
    import onnxruntime_genai as og

    cfg = og.Config(str(d))
    cfg.clear_providers()
    model = og.Model(cfg)

    def run(n):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        t1 = time.perf_counter()
        gen.generate_next_token()
        out = [int(gen.get_next_tokens()[0])]
        t2 = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return t1 - t0, (len(out) - 1) / (time.perf_counter() - t2), out

    return _reps(run, n_new, reps)


def _reps(run, n_new: int, reps: int) -> dict:
    run(8)  # warm-up: prepacking, allocations
    pre, tps, ids = [], [], None
    for _ in range(reps):
        p, t, ids = run(n_new)
        pre.append(p)
        tps.append(t)
    return {"prefill_s": pre, "decode_tps": tps, "ids": ids, "peak_rss": peak_rss()}


def peak_rss() -> int:
    """This process's peak resident set (VmHWM, bytes): unlike the parent's wait4 rusage it does not count the
    pages the child had before exec (a fork of the large parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------- building
def set_threads(d: Path, threads: int) -> None:
    """onnxruntime-genai session threads (genai_config.json: decoder.session_options)."""
    p = d / "genai_config.json"
    cfg = json.loads(p.read_text())
    cfg["model"]["decoder"]["session_options"].update(intra_op_num_threads=threads, inter_op_num_threads=1)
    p.write_text(json.dumps(cfg, indent=2))


def cached_ppl(d: Path, windows, threads: int, n: int, seqlen: int) -> float:
    """`onnx_ppl`, cached in ``d/ppl_<n>x<seqlen>.json`` (the folder is only ever built once)."""
    f = d / f"ppl_{n}x{seqlen}.json"
    if f.exists():
        return json.loads(f.read_text())["ppl"]
    ppl = onnx_ppl(d, windows, threads)
    f.write_text(json.dumps({"ppl": ppl}))
    return ppl


def embed_sym(compressed: Path, mode: str) -> bool:
    """``--embed-sym`` for one checkpoint: yes / no, or auto = the checkpoint's own ``spec.sym``."""
    if mode != "auto":
        return mode == "yes"
    return bool(json.loads((compressed / "report.json").read_text())["spec"]["sym"])


def build_fp32(src: Path, out: Path) -> None:
    """fp32 fused graph of the source model (no quantized weights) + genai layout."""
    from cli.export_cmd import COPY_FILES
    from ptq.export.onnx_fused import build_fused
    from ptq.export.onnx_genai import write_genai_config
    from ptq.export.onnx_graph import save_model
    from ptq.model_io import full_model

    model, _ = full_model(src)
    proto, _ = build_fused(model.eval(), {}, accuracy_level=0)
    tmp = out.with_name(out.name + ".partial")
    save_model(proto, tmp / "model.onnx", external=True)  # as ptq export writes the fused graph
    write_genai_config(tmp, model.config, src)
    for f in COPY_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, tmp / f)
    tmp.rename(out)


def build_builder(src: Path, out: Path, peer: str, extra: str | None, work: Path) -> None:
    """onnxruntime-genai builder, int4 cpu, from the fp32 model (config.json needs ``architectures``)."""
    s = work / "builder_src"
    if not s.exists():
        s.mkdir(parents=True)
        for f in src.iterdir():
            if f.name != "config.json":
                (s / f.name).symlink_to(f.resolve())
        cfg = json.loads((src / "config.json").read_text())
        cfg.setdefault("architectures", ["LlamaForCausalLM"])
        (s / "config.json").write_text(json.dumps(cfg, indent=1))
    cmd = [peer, "-m", "onnxruntime_genai.models.builder", "-i", str(s), "-o", str(out), "-p", "int4", "-e", "cpu",
           "-c", str(work / "builder_cache")]
    if extra:
        cmd += ["--extra_options", *extra.split()]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def onnx_ppl(d: Path, windows, threads: int) -> float:
    """Perplexity of the ONNX model in ``d`` (plain onnxruntime, one prefill per window, empty past)."""
    import torch

    from ptq.eval.metrics import _Accumulator
    from ptq.export.onnx_validate import session

    sess = session(d / "model.onnx", threads)
    acc = _Accumulator(skip_first=False)
    for w in windows:
        lg = torch.from_numpy(sess.run(["logits"], empty_feed(sess, d, w[None].numpy()))[0])
        acc.add(w[None], lg, None)
    return acc.result().ppl


def clean_args(argv: list[str], a) -> str:
    """The command line without machine paths (the peer interpreter as $PEER_VENV, other paths by name)."""
    out = []
    for x in argv:
        if x == a.peer_python:
            out.append("$PEER_VENV/bin/python")
        elif x.startswith("/"):
            out.append(Path(x).name)
        else:
            out.append(x)
    return " ".join(out)


def model_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("model.onnx*"))


def acc_levels(d: Path) -> list[int]:
    import onnx

    m = onnx.load(str(d / "model.onnx"), load_external_data=False)
    return sorted({next((a.i for a in n.attribute if a.name == "accuracy_level"), 0) for n in m.graph.node
                   if n.op_type == "MatMulNBits"})


# ---------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", choices=["ours", "genai", "paired-ours", "paired-genai"])
    ap.add_argument("--dir", help="child: the ONNX folder (paired children: several, comma-separated)")
    ap.add_argument("--ref", type=int, default=0, help="paired children: index of the reference folder")
    ap.add_argument("--model", default=None, help="fp32 SmolLM2 folder (default: the smollm2-135m cache)")
    ap.add_argument("--compressed", action="append", default=[], help="ptq compress --format gptq output (a ptq "
                    "int4 source; repeat for several in one run)")
    ap.add_argument("--peer-python", help="interpreter with onnxruntime-genai (builder + genai rows)")
    ap.add_argument("--builder-extra", action="append", default=[],
                    help="extra builder configuration(s), e.g. block_size=64 (onnxruntime-genai 0.18; the default build always runs)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ptq_onnx_speed"))
    ap.add_argument("--embed-bits", type=int, default=4)
    ap.add_argument("--embed-method", default="rtn", help="quantizer of the ptq embedding / lm_head (ptq.head_quant)")
    ap.add_argument("--embed-sym", choices=["no", "yes", "auto"], default="no", help="symmetric ptq embedding / "
                    "lm_head (no zero points); auto: as the checkpoint's own weights (report.json spec.sym)")
    ap.add_argument("--build-only", action="store_true", help="build the folders and perplexities, no timing")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds over all variants (order reversed "
                    "every other round); reps pooled across rounds")
    ap.add_argument("--paired-reps", type=int, default=2, help="after the rounds, per runtime one process with "
                    "every int4 model, decode steps interleaved (bench/onnx_paired.py): this many generations "
                    "(0 = skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--text", default=None, help="wikitext-2 test file (default $PTQ_DATA/wikitext2_test.raw.txt)")
    ap.add_argument("--ids", default="[]")
    ap.add_argument("--no-log", action="store_true")
    a = ap.parse_args()
    if a.child in ("paired-ours", "paired-genai"):
        from bench.onnx_paired import paired_genai, paired_ours

        fn = paired_ours if a.child == "paired-ours" else paired_genai
        print(json.dumps(fn([Path(x) for x in a.dir.split(",")], json.loads(a.ids), a.new, a.reps, a.threads, a.ref)))
        return
    if a.child:
        fn = child_ours if a.child == "ours" else child_genai
        print(json.dumps(fn(Path(a.dir), json.loads(a.ids), a.new, a.reps, a.threads)))
        return
    import torch

    torch.set_num_threads(1)
    from bench.results_log import append, run_child
    from calib.data import read_text, tokenize
    from cli.export_cmd import export_onnx_dir
    from ptq.eval.metrics import eval_windows
    from ptq.model_io import tokenizer_for
    from ptq.models.smollm2 import ensure_cache

    src = Path(a.model or ensure_cache())
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ptq_dirs = {("ptq int4" if len(a.compressed) == 1 else f"ptq int4 ({Path(c).name})"): Path(c)
                for c in a.compressed}
    dirs = {"fp32": work / "fp32"}
    dirs |= {name: work / ("ptq_int4_" + c.name) for name, c in ptq_dirs.items()}  # one folder per checkpoint
    dirs["builder int4"] = work / "builder_int4"
    for extra in a.builder_extra:
        dirs[f"builder int4 ({extra})"] = work / ("builder_int4_" + extra.replace("=", "_"))
    built = {}
    if not dirs["fp32"].exists():
        build_fp32(src, dirs["fp32"])
    for name, c in ptq_dirs.items():
        if not dirs[name].exists():
            t = time.time()
            rep = export_onnx_dir(c, dirs[name], accuracy_level=4, embed_bits=a.embed_bits,
                                  embed_method=a.embed_method, embed_sym=embed_sym(c, a.embed_sym))
            built[name] = {"export_s": round(time.time() - t, 1), "graph": rep["graph"],
                           "validation": {k: v for k, v in rep["validation"].items() if "torch" not in k}}
            (dirs[name] / "bench_build.json").write_text(json.dumps(built[name]))
            print(json.dumps(built[name]), flush=True)
        elif (dirs[name] / "bench_build.json").exists():
            built[name] = json.loads((dirs[name] / "bench_build.json").read_text())
    for name, d in dirs.items():
        if name.startswith("builder") and not d.exists():
            extra = name[len("builder int4 ("):-1] if "(" in name else None
            t = time.time()
            build_builder(src, d, a.peer_python, extra, work)
            built[name] = {"export_s": round(time.time() - t, 1)}
    for d in dirs.values():
        set_threads(d, a.threads)
    tok = tokenizer_for(src)
    text = read_text(a.text or Path(os.environ.get("PTQ_DATA", ROOT.parent / "shared" / "data"))
                     / "wikitext2_test.raw.txt")
    windows = eval_windows(tokenize(text, tok), a.seqlen, a.windows, None)
    ppl = {}
    for name, d in dirs.items():
        t = time.time()
        ppl[name] = cached_ppl(d, windows, a.threads, a.windows, a.seqlen)
        print(f"{name}: wikitext-2 ppl ({a.windows} windows) {ppl[name]:.3f} ({time.time() - t:.0f} s)", flush=True)
    if a.build_only:
        return
    ids = tokenize(read_text(None), tok)[: a.prompt].tolist()  # the embedded calibration text
    variants = [(n, rt) for n in dirs for rt in ("ours", "genai") if n != "fp32" or rt == "ours"]
    if not a.peer_python:
        variants = [v for v in variants if v[1] == "ours"]
    load0 = os.getloadavg()
    res = {}
    for rnd in range(a.rounds):  # interleaved rounds, alternating order: machine drift hits every variant alike
        for name, rt in (variants if rnd % 2 == 0 else variants[::-1]):
            py = sys.executable if rt == "ours" else a.peer_python
            cmd = [py, str(Path(__file__).resolve()), "--child", rt, "--dir", str(dirs[name]), "--ids",
                   json.dumps(ids), "--new", str(a.new), "--reps", str(a.reps), "--threads", str(a.threads)]
            env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(a.threads))
            wall, cpu, _, out = run_child(cmd, env=env, cwd=ROOT)
            r = json.loads(out.strip().splitlines()[-1])
            if (name, rt) in res:  # pool this round's reps with the earlier rounds'
                prev = res[(name, rt)]
                r["decode_tps"] = prev["decode_tps"] + r["decode_tps"]
                r["prefill_s"] = prev["prefill_s"] + r["prefill_s"]
                r["peak_rss"] = max(prev["peak_rss"], r["peak_rss"])
            r.update(rss=r["peak_rss"])
            res[(name, rt)] = r
            print(f"round {rnd + 1} {name:<32} {rt:<6} decode {statistics.median(r['decode_tps']):6.1f} tok/s  "
                  f"prefill {1e3 * statistics.median(r['prefill_s']):6.0f} ms  peak RSS {r['rss'] / 2**20:6.0f} MiB",
                  flush=True)
    paired = {}  # (name, runtime) -> paired step time / speed vs the builder, one process per runtime
    int4 = [n for n in dirs if n != "fp32"]
    for rt in ("ours", "genai") if a.paired_reps and "builder int4" in int4 else ():
        if rt == "genai" and not a.peer_python:
            continue
        cmd = [sys.executable if rt == "ours" else a.peer_python, str(Path(__file__).resolve()), "--child",
               "paired-" + rt, "--dir", ",".join(str(dirs[n]) for n in int4), "--ref", str(int4.index("builder int4")),
               "--ids", json.dumps(ids), "--new", str(a.new), "--reps", str(a.paired_reps), "--threads", str(a.threads)]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(a.threads))
        out = json.loads(run_child(cmd, env=env, cwd=ROOT)[3].strip().splitlines()[-1])
        for n in int4:
            paired[(n, rt)] = out[str(dirs[n])]
            print(f"paired {n:<32} {rt:<6} step {paired[(n, rt)]['step_ms']:.3f} ms  speed vs builder "
                  f"{paired[(n, rt)]['speed_vs_ref']:.3f}", flush=True)
    load1 = os.getloadavg()
    ref = {rt: statistics.median(res[("builder int4", rt)]["decode_tps"]) for rt in ("ours", "genai")
           if ("builder int4", rt) in res}
    first = next(iter(ptq_dirs))
    for (name, rt), r in res.items():
        tps = statistics.median(r["decode_tps"])
        row = {"model": "SmolLM2-135M-Instruct", "variant": name, "runtime": "our loop (onnxruntime)" if rt == "ours"
               else "onnxruntime-genai", "decode_tps": round(tps, 1),
               "decode_tps_reps": [round(x, 1) for x in r["decode_tps"]],
               "decode_vs_builder_int4_same_runtime": round(tps / ref[rt], 3) if rt in ref else None,
               "prefill_ms": round(1e3 * statistics.median(r["prefill_s"]), 1),
               "peak_rss_mib": round(r["rss"] / 2**20), "size_mib": round(model_bytes(dirs[name]) / 2**20, 1),
               "wikitext2_ppl": round(ppl[name], 3), "ppl_windows": a.windows, "ppl_seqlen": a.seqlen,
               "accuracy_levels": acc_levels(dirs[name]), "prompt_tokens": len(ids), "new_tokens": a.new,
               "reps": a.reps, "rounds": a.rounds, "intra_op_threads": a.threads, "loadavg_before": [round(x, 2) for x in load0],
               "loadavg_after": [round(x, 2) for x in load1],
               "exclusive_machine": bool(os.environ.get("PTQ_HEAVY_EXCLUSIVE")),
               "greedy_equal_first_ptq_ours": sum(x == y for x, y in zip(r["ids"], res[(first, "ours")]["ids"]))}
        if (name, rt) in paired:
            p = paired[(name, rt)]
            row.update(paired_step_ms=round(p["step_ms"], 3), paired_speed_vs_builder_int4=round(p["speed_vs_ref"], 3),
                       paired_steps=p["steps"])
        if name in built:
            row["build"] = built[name]
        if name in ptq_dirs:
            row["source"] = (f"ptq compress --format gptq ({ptq_dirs[name].name}), --embed-bits {a.embed_bits} "
                             f"--embed-method {a.embed_method}" + (" --embed-sym" if embed_sym(ptq_dirs[name], a.embed_sym) else ""))
        print(json.dumps(row))
        if not a.no_log:
            append("onnx_speed", row, command=f"python bench/onnx_speed.py {clean_args(sys.argv[1:], a)}")
    assert all(math.isfinite(p) for p in ppl.values())


if __name__ == "__main__":
    main()
