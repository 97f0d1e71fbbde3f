"""Offline TRD's cost against the online loop on the embedded default: the peak memory of each process, the
wall time of each command, and the generation job's throughput.

    python bench/offline_cost.py [--workdir runs/bench_offline_cost] [--steps 120] [--out docs/offline_cost.json]

Three commands, each its own process, run one after the other on the same machine (configs/default.py, the
paper's TRD, with the teacher's evaluation off in all three so that they do the same evaluations):
  online    python -m trd_jax.main (student and teacher loaded, rollout, refine, score, update every step)
  generate  the same with --config.mode=generate (student and teacher: rollout, refine, score; no update)
  offline   the same with --config.offline.dir (the student alone: update on the stored targets)
Peak memory is each process's peak resident set (os.wait4's ru_maxrss): on this CPU, host memory is where the
models, caches and activations live. On an accelerator the figure to compare is device memory, which the
memory planner models (python -m trd_jax.tools.plan --config configs/default.py [--config.offline.dir=D]).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--config.eval.teacher=false"]


def _run(name: str, args: list[str], log_path: str) -> dict:
    cmd = [sys.executable, "-m", "trd_jax.main", "--config", "configs/default.py", *COMMON, *args]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{name}: exit code {code}; see {log_path}")
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"command": " ".join(cmd[1:]), "seconds": round(seconds, 1), "peak_rss_bytes": usage.ru_maxrss * scale}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/bench_offline_cost")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--out", default="docs/offline_cost.json")
    a = p.parse_args()
    work = os.path.abspath(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    targets = os.path.join(work, "targets")
    steps = [f"--config.train.steps={a.steps}"]
    runs = {
        "online": steps + ["--workdir", os.path.join(work, "online")],
        "generate": steps + ["--workdir", os.path.join(work, "generate"), "--config.mode=generate",
                             f"--config.offline.dir={targets}"],
        "offline": steps + ["--workdir", os.path.join(work, "offline"), f"--config.offline.dir={targets}"],
    }
    results = {}
    for name, args in runs.items():
        results[name] = _run(name, args, os.path.join(work, f"{name}.log"))
        print(f"{name}: {results[name]['seconds']} s, peak RSS {results[name]['peak_rss_bytes'] / 2**20:.0f} MiB",
              flush=True)

    from trd_jax.offline import shards

    manifest = shards.read_manifest(targets)
    rows = list(shards.iter_rows(targets))
    tokens = sum(len(r["response"]) for r in rows)
    gen_s = results["generate"]["seconds"]
    results["generate"].update(rows=len(rows), shards=manifest["counts"]["shards"], stored_response_tokens=tokens,
                               rows_per_s=round(len(rows) / gen_s, 2), tokens_per_s=round(tokens / gen_s, 1),
                               k=manifest["identity"]["k"])
    for name in ("online", "offline"):
        summary = json.load(open(os.path.join(work, name, "summary.json")))
        results[name]["final_eval"] = summary["final_eval"]
        results[name]["persistent_bytes"] = summary["memory"]["bytes"]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "steps": a.steps, "runs": results,
              "peak_rss_offline_over_online": round(results["offline"]["peak_rss_bytes"]
                                                    / results["online"]["peak_rss_bytes"], 3)}
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}))
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
