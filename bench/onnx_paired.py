"""Paired decode-step timing for bench/onnx_speed.py: several ONNX folders loaded in ONE process, their decode
steps interleaved step by step (order reversed every other step), so a load burst on the shared machine hits every
model alike and the per-step time ratios stay fair even when absolute tok/s drift.

For each model ``i`` and step ``t`` (after the same prompt, the same context length for every model):
``speed_i = median_t(step_ref[t] / step_i[t])``, ``ref`` = the builder's model; above 1 = model ``i`` decodes
faster (the direction of the tok/s ratio).
"our loop": one ``InferenceSession.run`` per step plus the feed (as bench/onnx_speed.py's ``child_ours``);
onnxruntime-genai: one ``Generator.generate_next_token`` per step.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np


def _summary(names: list[str], times: list[list[float]], ref: int) -> dict:
    """``{name: {"step_ms": median step, "speed_vs_ref": median per-step speed ratio, "steps": n}}``."""
    return {n: {"step_ms": 1e3 * statistics.median(t), "steps": len(t),
                "speed_vs_ref": statistics.median(b / a for a, b in zip(t, times[ref]))}
            for n, t in zip(names, times)}


def paired_ours(dirs: list[Path], ids: list[int], n_new: int, reps: int, threads: int, ref: int) -> dict:
    """Plain onnxruntime sessions, ``reps`` generations of ``n_new`` steps each after a warm-up generation."""
    import onnxruntime as ort

    from bench.onnx_speed import empty_feed

    sess, outs = [], []
    for d in dirs:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
        sess.append(ort.InferenceSession(str(d / "model.onnx"), so, providers=["CPUExecutionProvider"]))
        outs.append([o.name for o in sess[-1].get_outputs()])
    prompt = np.array([ids], np.int64)
    times = [[] for _ in dirs]
    for rep in range(reps + 1):  # rep 0: warm-up
        res = [dict(zip(outs[i], s.run(outs[i], empty_feed(s, d, prompt)))) for i, (s, d) in enumerate(zip(sess, dirs))]
        total = prompt.shape[1]
        for step in range(n_new - 1):
            total += 1
            for i in (range(len(dirs)) if step % 2 == 0 else reversed(range(len(dirs)))):
                t0 = time.perf_counter()
                r = res[i]
                feed = {"input_ids": np.array([[int(r["logits"][0, -1].argmax())]], np.int64),
                        "attention_mask": np.ones((1, total), np.int64)}
                feed.update({"past_key_values." + k[8:]: v for k, v in r.items() if k.startswith("present.")})
                res[i] = dict(zip(outs[i], sess[i].run(outs[i], feed)))
                if rep:
                    times[i].append(time.perf_counter() - t0)
    return _summary([str(d) for d in dirs], times, ref)


def paired_genai(dirs: list[Path], ids: list[int], n_new: int, reps: int, threads: int, ref: int) -> dict:
    """onnxruntime-genai models (``threads`` intra-op threads each), steps interleaved the same way."""
    import onnxruntime_genai as og

    models = []
    for d in dirs:
        cfg = og.Config(str(d))
        cfg.clear_providers()
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        models.append(og.Model(cfg))
    times = [[] for _ in dirs]
    for rep in range(reps + 1):  # rep 0: warm-up
        gens = []
        for m in models:
            params = og.GeneratorParams(m)
            params.set_search_options(max_length=len(ids) + n_new, do_sample=False)
            gens.append(og.Generator(m, params))
            gens[-1].append_tokens(ids)
        for step in range(n_new - 1):
            for i in (range(len(dirs)) if step % 2 == 0 else reversed(range(len(dirs)))):
                t0 = time.perf_counter()
                gens[i].generate_next_token()
                if rep and step:  # the first call after the prompt samples from the prefill's logits
                    times[i].append(time.perf_counter() - t0)
    return _summary([str(d) for d in dirs], times, ref)
