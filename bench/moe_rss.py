"""Peak memory of `compress()` on a random-init mixture-of-experts model with Mixtral-like proportions at reduced
width: hidden 1024, expert width 3584 (Mixtral's 14336/4096 = 3.5x), 8 experts top-2, 8 query / 2 KV heads,
vocab 32000, 4 layers, fp16 safetensors on disk (one shard per layer, the hub's per-expert tensor names).

Each recipe (RTN, then GPTQ on a few calibration samples) runs in its own child process, which prints its
resident memory (VmRSS) and high-water mark (ru_maxrss) when each layer starts and at the end: with layer
streaming the numbers stay flat from layer to layer (one MoE layer holds its 8 experts, fp32 in memory, plus the
GPTQ Hessians of at most one layer's worth of experts at a time). Rows go to bench/results/moe_rss.jsonl.

    python bench/moe_rss.py [--workdir DIR] [--layers 4] [--recipes rtn,gptq] [--nsamples 8] [--seqlen 128]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = dict(hidden_size=1024, intermediate_size=3584, num_local_experts=8, num_experts_per_tok=2,
              num_attention_heads=8, num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096)


def make_random_mixtral(folder: Path, layers: int, seed: int = 0, std: float = 0.02) -> Path:
    """fp16 random Mixtral-shaped checkpoint, written one layer shard at a time."""
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    folder = Path(folder)
    if (folder / "model.safetensors.index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = MixtralConfig(**SHAPES, num_hidden_layers=layers, bos_token_id=0, eos_token_id=1,
                        tie_word_embeddings=False, dtype="float16")
    h, f, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * std).to(torch.float16)

    weight_map = {}

    def save(tensors: dict, name: str):
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    for i in range(layers):
        p = f"model.layers.{i}."
        t = {f"{p}self_attn.q_proj.weight": rnd(h, h), f"{p}self_attn.k_proj.weight": rnd(kv, h),
             f"{p}self_attn.v_proj.weight": rnd(kv, h), f"{p}self_attn.o_proj.weight": rnd(h, h),
             f"{p}block_sparse_moe.gate.weight": rnd(E, h),
             f"{p}input_layernorm.weight": torch.ones(h, dtype=torch.float16),
             f"{p}post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16)}
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            t.update({q + "w1.weight": rnd(f, h), q + "w3.weight": rnd(f, h), q + "w2.weight": rnd(h, f)})
        save(t, f"model-layer-{i:05d}.safetensors")
        del t
    save({"model.embed_tokens.weight": rnd(cfg.vocab_size, h), "model.norm.weight": torch.ones(h, dtype=torch.float16),
          "lm_head.weight": rnd(cfg.vocab_size, h)}, "model-nonlayer.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(folder)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import byte_tokenizer

    byte_tokenizer().save_pretrained(folder)
    return folder


def _rss() -> int:
    for ln in Path("/proc/self/status").read_text().splitlines():
        if ln.startswith("VmRSS:"):
            return int(ln.split()[1]) * 1024
    return 0


def child(model: str, out: str, recipe: str, nsamples: int, seqlen: int) -> None:
    """Run one compress() in this process; print one JSON line per layer start and one at the end."""
    from ptq.compress import CompressOptions, compress

    torch.set_num_threads(1)
    seen = set()

    def progress(i, n, _pass):
        if i not in seen:
            seen.add(i)
            print(json.dumps({"layer": i, "rss": _rss(), "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                              * 1024}), flush=True)

    rep = compress(CompressOptions(model=model, out=out, recipe=recipe, format="gptq", nsamples=nsamples,
                                   seqlen=seqlen, force=True), progress=progress)
    routed = [L.get("moe.routed_tokens") for L in rep["layers"]]
    fallbacks = sum(L.get("moe.fallback_linears", 0) for L in rep["layers"])
    print(json.dumps({"layer": "end", "rss": _rss(), "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                      * 1024, "routed_tokens": routed, "fallback_linears": fallbacks}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--recipes", default="rtn,gptq")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        m, o, r, n, s = args.child
        return child(m, o, r, int(n), int(s))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ptq-moerss-"))
    try:
        t = time.time()
        model = make_random_mixtral(work / "mixtral-random", args.layers)
        disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        layer_bytes = (model / "model-layer-00000.safetensors").stat().st_size
        print(f"random model: {disk / 2**20:.0f} MiB fp16 on disk, {layer_bytes / 2**20:.0f} MiB per layer "
              f"({time.time() - t:.0f}s)", flush=True)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results_log import append

        for recipe in args.recipes.split(","):
            out = work / f"out-{recipe}"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(model), str(out), recipe,
                   str(args.nsamples), str(args.seqlen)]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
            t = time.time()
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            wall = time.time() - t
            rows = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
            if p.returncode != 0 or not rows or rows[-1]["layer"] != "end":
                print(p.stdout[-2000:], p.stderr[-3000:])
                raise SystemExit(f"{recipe}: child failed (rc {p.returncode})")
            print(f"\n{recipe}: wall {wall:.0f}s")
            print("| at | RSS MiB | peak RSS so far MiB |\n|---|---|---|")
            for r in rows:
                at = f"layer {r['layer']} start" if r["layer"] != "end" else "end"
                print(f"| {at} | {r['rss'] / 2**20:.0f} | {r['maxrss'] / 2**20:.0f} |")
            per_layer = [r["maxrss"] for r in rows if r["layer"] != "end"]
            end = rows[-1]
            # growth of the high-water mark from the second layer's start to the end (the first layer sets it)
            growth = (end["maxrss"] - per_layer[1]) / 2**20 if len(per_layer) > 1 else float("nan")
            print(f"routed tokens per layer: {end['routed_tokens']}; RTN fallbacks: {end['fallback_linears']}")
            argv = [a if a != str(args.workdir) else "DIR" for a in sys.argv[1:]]  # no machine path in the row
            append("moe_rss", {
                "recipe": recipe, "layers": args.layers, "hidden": SHAPES["hidden_size"],
                "expert_width": SHAPES["intermediate_size"], "experts": SHAPES["num_local_experts"], "top_k": 2,
                "nsamples": args.nsamples, "seqlen": args.seqlen, "disk_mib": round(disk / 2**20, 1),
                "layer_disk_mib": round(layer_bytes / 2**20, 1), "wall_s": round(wall, 1),
                "rss_mib_per_layer_start": [round(r["rss"] / 2**20, 1) for r in rows if r["layer"] != "end"],
                "peak_mib_per_layer_start": [round(v / 2**20, 1) for v in per_layer],
                "peak_rss_mib": round(end["maxrss"] / 2**20, 1),
                "peak_growth_after_layer1_mib": round(growth, 1),
                "routed_tokens": end["routed_tokens"], "fallback_linears": end["fallback_linears"]},
                command="python bench/moe_rss.py " + " ".join(argv))
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
