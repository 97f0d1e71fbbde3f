"""Multi-process correctness on CPU: a tiny training run (tests/helpers/tiny_run.py: the arithmetic task, random
2-layer models, OPD with refinement, diagnostics, eval and export) as 2 jax.distributed processes with one
CPU device each (a localhost coordinator, gloo collectives) must end with the same parameters, bit for bit,
as 1 process with 2 fake CPU devices on the same mesh (fsdp=2: parameters and batch rows split over the two
devices). Bitwise, because both runs execute the same partitioned programs: only the transport of the
collectives differs (in-process vs gloo), and a 2-way sum is exact whichever side adds. Also checked: only
process 0 wrote metrics, TensorBoard events, summary and export; every process saved its checkpoint shards
and restored them (tests/helpers/multiprocess_check.py)."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
CHECK = os.path.join(TESTS, "helpers", "multiprocess_check.py")
GENERATE_CHECK = os.path.join(TESTS, "helpers", "multiprocess_generate_check.py")
# Also the paths that place rows on devices: scoring in row groups, and blockwise attention's prefill into the
# sampler's row-sharded cache.
# The score phase reuses the refine pass's states on one process only (trd_jax/score_reuse.py): both runs
# recompute it, so that they run the same programs.
OVERRIDES = {"train.steps": 2, "train.micro_batches": 2, "train.max_score_rows": 2, "student.attention": "blockwise",
             "teacher.attention": "blockwise", "student.attention_block": 8, "teacher.attention_block": 8,
             "refine.reuse_states": False}
TIMEOUT_S = 400
# Differ between runs by nature: wall-clock timings and rates.
TIMING_PREFIXES = ("phase_s/", "tokens_per_s/", "time", "wall", "warm_s/")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, TESTS, env.get("PYTHONPATH", "")]), **extra)
    return env


def _start(workdir, env):
    return subprocess.Popen([sys.executable, CHECK, str(workdir), json.dumps(OVERRIDES)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs):
    outputs, deadline = [], time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for p in procs:  # a process left waiting on a dead peer
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"exit code {p.returncode}:\n{out[-6000:]}"
    return outputs


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    multi, single = tmp_path / "two_processes", tmp_path / "one_process"
    coordinator = f"localhost:{_free_port()}"
    procs = [_start(multi, _env(JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    procs.append(_start(single, _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")))
    outputs = _finish(procs)
    assert "process 0 of 2: OK" in outputs[0] and "process 1 of 2: OK" in outputs[1]
    assert "process 0 of 1: OK" in outputs[2]

    checks = [json.loads((d / "check.json").read_text()) for d in (multi, single)]
    assert [c["process_count"] for c in checks] == [2, 1]
    for c in checks:
        assert c["device_count"] == 2 and c["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
        assert c["status"] == "completed" and c["steps"] == c["restored_step"] == 2

    # The same parameters, bit for bit.
    a, b = np.load(multi / "final_params.npz"), np.load(single / "final_params.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 0
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)

    # The same metrics (timings aside), written once: by process 0 alone.
    m_multi, m_single = _metrics(multi), _metrics(single)
    assert [m["step"] for m in m_multi] == [1, 2]
    for x, y in zip(m_multi, m_single):
        assert set(x) == set(y)
        for key in x:
            if not key.startswith(TIMING_PREFIXES):
                assert x[key] == y[key], (key, x[key], y[key])
    assert len(os.listdir(multi / "tb")) == 1
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert summary["final_eval"] == json.loads((single / "summary.json").read_text())["final_eval"]
    assert (multi / "export" / "model.safetensors").is_file()
    assert sorted(os.listdir(multi / "checkpoints")) == ["1", "2"]


@pytest.mark.slow
def test_generate_on_two_processes_writes_the_one_process_targets(tmp_path):
    """mode=generate over two jax.distributed processes: process 0 alone writes the shards and the manifest,
    and they hold exactly the rows and top-k targets of one process with 2 fake devices on the same mesh."""
    from trd_jax.offline import shards

    # rollouts through continuous batching over a paged cache
    overrides = {"train.steps": 2, "refine.reuse_states": False, "log.diagnostics": False,
                 "rollout.continuous_slots": 4, "rollout.kv_page_size": 8}
    coordinator = f"localhost:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, GENERATE_CHECK, str(tmp_path / f"run{i}"), str(tmp_path / "multi"),
                               json.dumps(overrides)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=_env(JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2",
                                                  JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    procs.append(subprocess.Popen([sys.executable, GENERATE_CHECK, str(tmp_path / "single_run"),
                                   str(tmp_path / "single"), json.dumps(overrides)], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")))
    outputs = _finish(procs)
    assert "process 1 of 2: OK" in outputs[1] and "process 0 of 1: OK" in outputs[2]
    assert all("continuous segments: None" not in out and "continuous segments: " in out for out in outputs)
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    assert shards.finished_shards(multi) == shards.finished_shards(single) == [0, 1]
    a, b = shards.read_manifest(multi), shards.read_manifest(single)
    assert a["identity"] == b["identity"] and a["counts"] == b["counts"]
    for x, y in zip(shards.iter_rows(multi), shards.iter_rows(single), strict=True):
        assert x["example_id"] == y["example_id"] and x["source"] == y["source"]
        for field in ("prompt", "response", "topk_ids", "topk_logp", "tail", "token_logp"):
            np.testing.assert_array_equal(x[field], y[field], err_msg=field)
