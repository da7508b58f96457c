"""Peak memory of `ptq compress` on a 7B-shaped Llama (target: < 6 GiB RSS).

1. Once, write a random-init Llama with Llama-2-7B shapes (hidden 4096, intermediate 11008, 32 layers, 32 heads,
   vocab 32000) as fp16 sharded safetensors, one shard per decoder layer, never holding more than one tensor
   (<= 32000 x 4096) in memory, plus a byte-level tokenizer. ~13.5 GB on disk.
2. Run `ptq compress` on it as a child process and read the child's peak RSS from ``os.wait4`` rusage
   (``ru_maxrss``: anonymous + file-backed resident pages, the same number `/usr/bin/time -v` prints).
3. Append one row per recipe to bench/results/rss_7b.jsonl (renderer ``rss_7b``, README "Measured").

    python bench/rss_7b.py [--workdir DIR] [--keep] [--recipes rtn,gptq] [--format gptq] [--layers 32]

Without --workdir the model goes to a temp dir that is deleted at the end; with --workdir it is reused.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def make_random_7b(folder: Path, layers: int = 32, seed: int = 0, std: float = 0.02) -> Path:
    """fp16 random Llama with 7B shapes in ``folder`` (skipped when its index already exists)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder = Path(folder)
    if (folder / "model.safetensors.index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**dict(SHAPES, num_hidden_layers=layers), bos_token_id=0, eos_token_id=1,
                      tie_word_embeddings=False, dtype="float16")
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    g = torch.Generator().manual_seed(seed)
    # randn for 6.7e9 values is slow on a shared 2-core box: draw one 64M-value fp16 pool and cut every tensor
    # from it at a random offset (values are irrelevant for a memory benchmark; shapes and dtypes are real)
    pool = (torch.randn(2**26, generator=g) * std).to(torch.float16)
    weight_map = {}
    n_shards = layers + 2  # one per decoder layer, embeddings + norm, lm_head

    def rnd(*shape):
        numel = shape[0] * shape[1]
        out = torch.empty(numel, dtype=torch.float16)
        for s in range(0, numel, pool.numel()):
            m = min(pool.numel(), numel - s)
            off = int(torch.randint(0, pool.numel() - m + 1, (1,), generator=g))
            out[s:s + m] = pool[off:off + m]
        return out.view(*shape)

    def save(tensors: dict, idx: int):
        name = f"model-{idx + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    for i in range(layers):
        p = f"model.layers.{i}."
        t = {}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"{p}self_attn.{proj}.weight"] = rnd(h, h)
        t[f"{p}mlp.gate_proj.weight"] = rnd(f, h)
        t[f"{p}mlp.up_proj.weight"] = rnd(f, h)
        t[f"{p}mlp.down_proj.weight"] = rnd(h, f)
        t[f"{p}input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        t[f"{p}post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        save(t, i)
        del t
    save({"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": torch.ones(h, dtype=torch.float16)}, layers)
    save({"lm_head.weight": rnd(v, h)}, layers + 1)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(folder)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import byte_tokenizer

    byte_tokenizer().save_pretrained(folder)
    return folder


def _status(pid: int) -> dict[str, int]:
    """VmRSS / RssAnon / RssFile of ``pid`` in bytes (empty once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for ln in lines:
        k, _, v = ln.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out


def run_child(cmd: list[str], log: Path, out: Path) -> tuple[int, float, int, dict]:
    """Run ``cmd``; return (exit code, wall s, peak RSS bytes from rusage, max of each /proc component and the
    child's CPU seconds under ``cpu_s``).

    A sampler thread reads /proc/<pid>/status every second and prints a line whenever another layer shard
    appears in the (temporary) output folder, so a run cut short still tells how RSS evolved per layer."""
    import threading

    t = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    peaks: dict[str, int] = {}
    done = threading.Event()

    def sample(pid):
        seen = -1
        while not done.wait(1.0):
            st = _status(pid)
            for k, v in st.items():
                peaks[k] = max(peaks.get(k, 0), v)
            n = sum(1 for _ in out.parent.glob(f"*{out.name}*/layer-*.safetensors"))
            if n != seen and st:
                seen = n
                print(f"  t={time.time() - t:6.0f}s layers written {n:3d}  RSS {st['VmRSS'] / 2**30:.2f} GiB "
                      f"(anon {st['RssAnon'] / 2**30:.2f}, file {st['RssFile'] / 2**30:.2f})  max so far "
                      f"{peaks['VmRSS'] / 2**30:.2f} GiB", flush=True)

    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        th = threading.Thread(target=sample, args=(p.pid,), daemon=True)
        th.start()
        _, status, ru = os.wait4(p.pid, 0)
        done.set()
    peaks["cpu_s"] = ru.ru_utime + ru.ru_stime
    return os.waitstatus_to_exitcode(status), time.time() - t, ru.ru_maxrss * 1024, peaks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the random model (and outputs) in --workdir")
    ap.add_argument("--recipes", default="rtn")
    ap.add_argument("--format", default="gptq")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--extra", default="", help="extra ptq compress arguments, space separated")
    ap.add_argument("--no-log", action="store_true", help="append no rows to bench/results/rss_7b.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ptq-rss7b-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.time()
        model = make_random_7b(work / "llama7b-random", args.layers)
        in_gib = sum(f.stat().st_size for f in model.iterdir()) / 2**30
        print(f"random model: {model} ({sum(f.stat().st_size for f in model.iterdir()) / 2**30:.2f} GiB, "
              f"{time.time() - t:.0f}s)", flush=True)
        rows = []
        for recipe in args.recipes.split(","):
            out = work / f"out-{recipe}"
            cmd = [sys.executable, "-m", "cli.main", "compress", str(model), "--out", str(out), "--recipe", recipe,
                   "--format", args.format, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                   "--force"] + args.extra.split()
            rc, wall, rss, peaks = run_child(cmd, work / f"log-{recipe}.txt", out)
            size = sum(f.stat().st_size for f in out.iterdir()) / 2**30 if out.exists() else float("nan")
            rows.append((recipe, rc, wall, rss / 2**30, size))
            print(f"{recipe}: rc {rc} wall {wall:.0f}s peak RSS {rss / 2**30:.2f} GiB (max anon "
                  f"{peaks.get('RssAnon', 0) / 2**30:.2f}, max file {peaks.get('RssFile', 0) / 2**30:.2f}) out {size:.2f} GiB "
                  f"({' '.join(cmd[2:])})", flush=True)
            if rc != 0:
                print((work / f"log-{recipe}.txt").read_text()[-3000:])
            elif not args.no_log:
                sys.path.insert(0, str(ROOT / "bench"))
                from results_log import append

                append("rss_7b", {"recipe": recipe, "format": args.format, "layers": args.layers,
                                  "nsamples": args.nsamples, "seqlen": args.seqlen, "extra": args.extra,
                                  "input_gib": round(in_gib, 3), "output_gib": round(size, 3),
                                  "peak_rss_gib": round(rss / 2**30, 3),
                                  "max_anon_gib": round(peaks.get("RssAnon", 0) / 2**30, 3),
                                  "max_file_gib": round(peaks.get("RssFile", 0) / 2**30, 3),
                                  "wall_s": round(wall, 1), "cpu_s": round(peaks["cpu_s"], 1)})
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        print("\n| recipe | format | rc | wall s | peak RSS GiB | output GiB |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {args.format} | {r[1]} | {r[2]:.0f} | {r[3]:.2f} | {r[4]:.2f} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
