"""What checkpoint verification costs: the manifest (every file's SHA-256) of a realistic step, next to the
save itself, and the verification a resume runs.

    python bench/checkpoint_hash.py [--mb 1024 --repeats 3]

A TrainState-sized tree of float32 arrays (`--mb` MiB in all: SmolLM2-135M with AdamW's two moments is
about 1.6 GiB) is saved with trd_jax's Checkpointer (async), the save finalised, and its manifest written;
each is timed separately (medians over --repeats steps). The manifest runs on the Checkpointer's own
thread, so a training step overlaps it; the figure says how long that thread is busy per save, and what a
resume adds before loading.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from trd_jax.checkpoint_manifest import verify, write_manifest
from trd_jax.checkpointing import Checkpointer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    leaf = 16 << 20  # 16 MiB arrays, like large weight matrices
    n = max(1, (a.mb << 20) // leaf)
    rng = np.random.default_rng(0)
    tree = {f"w{i}": jax.numpy.asarray(rng.standard_normal(leaf // 4, np.float32)) for i in range(n)}
    save_s, manifest_s, verify_s = [], [], []
    with tempfile.TemporaryDirectory() as d:
        with Checkpointer(d, save_every=1, keep=2) as ckpt:
            for step in range(1, a.repeats + 1):
                start = time.perf_counter()
                ckpt.save(step, tree, {"step": step})
                ckpt._manager.wait_until_finished()  # the save alone, without its manifest
                save_s.append(time.perf_counter() - start)
                path = os.path.join(d, str(step))
                start = time.perf_counter()
                write_manifest(path)
                manifest_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                assert verify(path).ok
                verify_s.append(time.perf_counter() - start)
                ckpt.wait()
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(d, str(a.repeats)))
                   for f in fs)
    med = {k: statistics.median(v) for k, v in (("save", save_s), ("manifest", manifest_s), ("verify", verify_s))}
    print(f"checkpoint of {size / 2**20:.0f} MiB on disk ({n} arrays of 16 MiB), medians of {a.repeats}:")
    print(f"  save (async, until finalised): {med['save']:.2f} s")
    print(f"  manifest (SHA-256 of every file, background thread): {med['manifest']:.2f} s "
          f"({size / 2**20 / med['manifest']:.0f} MiB/s; {med['manifest'] / med['save']:.2f} x the save)")
    print(f"  verification at resume: {med['verify']:.2f} s")


if __name__ == "__main__":
    main()
