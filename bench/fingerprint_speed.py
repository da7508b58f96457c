"""Speed of the content fingerprint used by resume and the gate (`ptq.resume.model_fingerprint`): sha256 over
every byte of the model folder in 16 MiB chunks. Reads the folder once to warm the page cache, then times the
fingerprint and, over the same bytes, blake2b for comparison; reports MB/s.

    python bench/fingerprint_speed.py [MODEL]      # default: the smollm2-135m cache
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_log import append  # noqa: E402
from ptq.model_io import resolve_model  # noqa: E402
from ptq.resume import HASH_CHUNK, model_fingerprint  # noqa: E402


def blake2b_folder(folder: Path) -> None:
    h = hashlib.blake2b(digest_size=32)
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        with open(f, "rb") as fh:
            while b := fh.read(HASH_CHUNK):
                h.update(b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    a = ap.parse_args()
    folder = resolve_model(a.model)
    nbytes = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    model_fingerprint(folder)  # warm the page cache
    t0 = time.perf_counter()
    model_fingerprint(folder)
    t_sha = time.perf_counter() - t0
    t0 = time.perf_counter()
    blake2b_folder(folder)
    t_b2 = time.perf_counter() - t0
    row = {"model": a.model, "bytes": nbytes, "fingerprint": "sha256", "sha256_seconds": round(t_sha, 3),
           "sha256_MBps": round(nbytes / 1e6 / t_sha, 1), "blake2b_seconds": round(t_b2, 3),
           "blake2b_MBps": round(nbytes / 1e6 / t_b2, 1),
           "projected_7b_fp16_seconds": round(14e9 / (nbytes / t_sha), 1)}
    print(append("fingerprint_speed", row))


if __name__ == "__main__":
    main()
