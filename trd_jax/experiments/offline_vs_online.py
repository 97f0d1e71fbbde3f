"""Offline TRD against online TRD on the embedded default (docs/offline.md): per seed, held-out accuracy, wall
seconds and each process's peak memory, and the generate job's throughput.

    python -m trd_jax.experiments.offline_vs_online --workdir runs/offline_vs_online [--seeds 0,1,2]
        [--out docs/offline_vs_online] [--config.KEY=VALUE ...]

Per seed, three commands, each its own process, one after the other (configs/default.py: the paper's TRD; the
teacher's evaluation off in all three so that they evaluate alike):
  online    python -m trd_jax.main (student and teacher: rollout, refine, score, update every step)
  generate  the same with --config.mode=generate (student and teacher: rollout, refine, score; no update)
  offline   the same with --config.offline.dir (the student alone: update on the stored targets)
The offline run trains on exactly the rows the online run would have generated at its first step's weights,
so the two see the same number of generated tokens. Peak memory is each process's peak resident set
(os.wait4's ru_maxrss): on this CPU, host memory holds the models, caches and activations; on an accelerator
compare device memory, which the memory planner models (python -m trd_jax.memory_plan). Writes OUT.json and
OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

from trd_jax.metrics import atomic_write_json, atomic_write_text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["--config.eval.teacher=false"]
RUNS = ("online", "generate", "offline")


def _run(args: list[str], log_path: str) -> dict:
    cmd = [sys.executable, "-m", "trd_jax.main", "--config", "configs/default.py", *COMMON, *args]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"exit code {code}: {' '.join(cmd)}; see {log_path}")
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"seconds": round(seconds, 1), "peak_rss_bytes": usage.ru_maxrss * scale}


def run_seed(work: str, seed: int, overrides: list[str]) -> dict:
    from trd_jax.offline import shards

    base = os.path.join(work, f"s{seed}")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    targets = os.path.join(base, "targets")
    common = [f"--config.seed={seed}", *overrides]
    args = {"online": ["--workdir", os.path.join(base, "online")],
            "generate": ["--workdir", os.path.join(base, "generate"), "--config.mode=generate",
                         f"--config.offline.dir={targets}"],
            "offline": ["--workdir", os.path.join(base, "offline"), f"--config.offline.dir={targets}"]}
    out = {name: _run(args[name] + common, os.path.join(base, f"{name}.log")) for name in RUNS}
    rows = list(shards.iter_rows(targets))
    tokens = sum(len(r["response"]) for r in rows)
    out["generate"].update(rows=len(rows), stored_response_tokens=tokens,
                           rows_per_s=round(len(rows) / out["generate"]["seconds"], 2),
                           tokens_per_s=round(tokens / out["generate"]["seconds"], 1),
                           k=shards.read_manifest(targets)["identity"]["k"])
    for name in ("online", "offline"):
        with open(os.path.join(base, name, "summary.json")) as f:
            summary = json.load(f)
        ev = summary["final_eval"]
        out[name].update(initial=summary["initial_eval"], final=ev, teacher_bytes=summary["memory"]["bytes"]["teacher"])
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def report(results: dict) -> str:
    seeds = results["seeds"]
    given = " ".join(results["overrides"]) or "no overrides"
    lines = ["# Offline TRD against online TRD (embedded default)", "",
             f"{results['date']}, {results['machine']}; configs/default.py with {given} and {' '.join(COMMON)}. "
             "Command: `python -m trd_jax.experiments.offline_vs_online`.", "",
             "| seed | run | Avg@n after | Pass@n after | greedy after | seconds | peak RSS (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for seed, r in seeds.items():
        for name in RUNS:
            x = r[name]
            ev = x.get("final") or {}
            lines.append(f"| {seed} | {name} | {_pct(ev.get('avg_at_k'))} | {_pct(ev.get('pass_at_k'))} | "
                         f"{_pct(ev.get('greedy'))} | {x['seconds']} | {x['peak_rss_bytes'] / 2**20:.0f} |")
    lines += ["", "Means over seeds:", ""]
    for name in ("online", "offline"):
        avg = [r[name]["final"]["avg_at_k"] for r in seeds.values()]
        lines.append(f"- {name}: Avg@n {100 * statistics.mean(avg):.2f} (seeds: "
                     f"{', '.join(f'{100 * a:.2f}' for a in avg)})")
    gen = [r["generate"] for r in seeds.values()]
    lines.append(f"- generate: {statistics.mean(g['rows_per_s'] for g in gen):.2f} rows/s, "
                 f"{statistics.mean(g['tokens_per_s'] for g in gen):.0f} stored response tokens/s (k = {gen[0]['k']})")
    ratio = [r["offline"]["peak_rss_bytes"] / r["online"]["peak_rss_bytes"] for r in seeds.values()]
    lines.append(f"- peak RSS, offline training / online: {statistics.mean(ratio):.3f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/offline_vs_online")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="docs/offline_vs_online", help="writes OUT.json and OUT.md")
    a, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        p.error(f"unknown arguments {bad} (only --config.KEY=VALUE overrides pass through)")
    work = os.path.abspath(a.workdir)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "overrides": overrides, "seeds": {}}
    for seed in (int(x) for x in a.seeds.split(",")):
        results["seeds"][str(seed)] = run_seed(work, seed, overrides)
        print(f"seed {seed}: " + ", ".join(f"{n} {results['seeds'][str(seed)][n]['seconds']} s" for n in RUNS),
              flush=True)
    atomic_write_json(a.out + ".json", results)
    text = report(results)
    atomic_write_text(a.out + ".md", text)
    print(text)


if __name__ == "__main__":
    main()
