"""launch/: the Cloud TPU and SLURM scripts, checked without a cloud or a cluster.

Every script runs with gcloud, sbatch, srun, scontrol, curl and gcsfuse replaced by stubs that only record
their calls, so a --dry-run that ran anything shows up. Beyond the printed commands, the remote command of
`tpu.sh run` and the generated sbatch script are executed here against stubs (metadata server, scontrol,
srun, a fake python that records its environment), and the environment each process would see is fed to
trd_jax.distributed.multi_process_environment(): the names the scripts set are the names it reads.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu.sh"
SLURM = REPO / "launch" / "gpu_slurm.sh"
GPU_ENV = REPO / "launch" / "gpu_env.sh"
PAIR = REPO / "launch" / "offline_pair.sh"

STUB = """#!/usr/bin/env bash
printf '%s\\n' "$(basename "$0") $*" >> "$LAUNCH_CALLS"
"""
# curl: answers the two metadata keys tpu.sh run reads (old 'name:id:ip' endpoint format).
CURL = STUB + """case "${@: -1}" in
  */agent-worker-number) printf 1 ;;
  */worker-network-endpoints) printf 't1v-n-0:0:10.0.0.1,t1v-n-1:1:10.0.0.2' ;;
  *) exit 22 ;;
esac
"""
SCONTROL = STUB + """[ "$1 $2" = "show hostnames" ] && printf 'gpu01\\ngpu02\\n'
"""
# srun: runs the command once per task (one task per node) with the task variables a real srun sets.
SRUN = STUB + """n=1
while [[ $1 == -* ]]; do case $1 in --ntasks=*) n=${1#*=} ;; esac; shift; done
export SLURM_NTASKS=$n SLURM_STEP_NUM_NODES=$n SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST
for ((p = 0; p < n; p++)); do SLURM_PROCID=$p SLURM_LOCALID=0 "$@" || exit; done
"""
# A python that records its arguments and environment, then (with FAKE_SLEEP) waits to be stopped.
FAKE_PYTHON = """#!/usr/bin/env bash
out="$FAKE_OUT/proc${JAX_PROCESS_ID:-$TPU_WORKER_ID}"
printf '%s\\n' "$@" > "$out.args"
env > "$out.env"
touch "$out.done"
if [ -n "${FAKE_SLEEP:-}" ]; then exec sleep "$FAKE_SLEEP"; fi
"""


def _write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def env(tmp_path):
    """Environment with stub gcloud / sbatch / srun / scontrol / curl / gcsfuse first on PATH."""
    stubs = tmp_path / "stubs"
    for name in ("gcloud", "sbatch", "gcsfuse"):
        _write_exe(stubs / name, STUB)
    _write_exe(stubs / "curl", CURL)
    _write_exe(stubs / "scontrol", SCONTROL)
    _write_exe(stubs / "srun", SRUN)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_"))}
    e.update(PATH=f"{stubs}:{os.environ['PATH']}", LAUNCH_CALLS=str(tmp_path / "calls.log"),
             TMPDIR=str(tmp_path))
    return e


def calls(env) -> list[str]:
    p = Path(env["LAUNCH_CALLS"])
    return p.read_text().splitlines() if p.exists() else []


def run(script: Path, *args: str, env: dict, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", str(script), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def commands(stdout: str) -> list[str]:
    """The printed commands: every line that is not a '#' note."""
    return [l for l in stdout.splitlines() if l and not l.startswith("#")]


def remote_command(line: str) -> str:
    """The --command=... of a printed `gcloud compute tpus tpu-vm ssh` line."""
    words = shlex.split(line)
    assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], line
    (cmd,) = [w[len("--command="):] for w in words if w.startswith("--command=")]
    return cmd


def distributed_names() -> set[str]:
    return set(re.findall(r'"((?:JAX|TPU|SLURM)_[A-Z_]+)"', (REPO / "trd_jax" / "distributed.py").read_text()))


def multi_process(monkeypatch, environ: dict[str, str]) -> bool:
    """trd_jax.distributed.multi_process_environment() under exactly `environ`'s JAX/SLURM/TPU variables."""
    from trd_jax.distributed import multi_process_environment

    for k in list(os.environ):
        if k.startswith(("JAX_", "SLURM_", "TPU_")):
            monkeypatch.delenv(k)
    for k, v in environ.items():
        if k.startswith(("JAX_", "SLURM_", "TPU_")):
            monkeypatch.setenv(k, v)
    return multi_process_environment()


def jax_local_device_ids(monkeypatch, environ: dict[str, str]):
    """The devices jax.distributed.initialize would give this process under `environ`: JAX_LOCAL_DEVICE_IDS,
    else what its cluster detection (SLURM here) picks -- the two steps of jax/_src/distributed.py."""
    import inspect

    import jax._src.distributed as jax_distributed
    from jax._src.clusters import ClusterEnv

    assert "os.environ.get('JAX_LOCAL_DEVICE_IDS')" in inspect.getsource(jax_distributed.State.initialize)
    for k in list(os.environ):
        if k.startswith(("JAX_", "SLURM_", "TPU_", "OMPI_")):
            monkeypatch.delenv(k)
    for k, v in environ.items():
        if k.startswith(("JAX_", "SLURM_")):
            monkeypatch.setenv(k, v)
    ids = environ.get("JAX_LOCAL_DEVICE_IDS")
    ids = [int(x) for x in ids.split(",")] if ids else None
    return ClusterEnv.auto_detect_unset_distributed_params(
        environ["JAX_COORDINATOR_ADDRESS"], int(environ["JAX_NUM_PROCESSES"]), int(environ["JAX_PROCESS_ID"]),
        ids, None, 10)[3]


def wait_for(path: Path, seconds: float = 20) -> None:
    end = time.time() + seconds
    while not path.exists():
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


def read_env(path: Path) -> dict[str, str]:
    return dict(l.split("=", 1) for l in path.read_text().splitlines() if "=" in l)


# ------------------------------------------------------------------------------------------ help

@pytest.mark.parametrize("script", [TPU, SLURM, GPU_ENV, PAIR])
def test_help(script, env):
    r = run(script, "--help", env=env)
    assert r.stdout.startswith("Usage: launch/") and "--dry-run" in r.stdout
    assert calls(env) == []


def test_env_names_are_the_ones_distributed_reads():
    names = distributed_names()
    assert {"JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES"} <= names
    for script in (SLURM, GPU_ENV):
        text = script.read_text()
        for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
            assert name in text, (script.name, name)
    assert "TPU_WORKER_HOSTNAMES" in TPU.read_text()


# ------------------------------------------------------------------------------------------ tpu.sh

def test_tpu_create_vm(env):
    r = run(TPU, "create", "--name", "trd-v5e", "--zone", "us-west4-a", "--project", "my-proj",
            "--accelerator-type", "v5litepod-16", "--spot", "--dry-run", env=env)
    (cmd,) = commands(r.stdout)
    assert cmd == ("gcloud compute tpus tpu-vm create trd-v5e --zone=us-west4-a --project=my-proj "
                   "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot")
    assert "queued-resources" not in r.stdout
    assert ("# cost estimate: v5litepod-16 = 16 chips (4 hosts) x ~$1.20/chip-hour = ~$19.20/hour" in r.stdout
            and "approximate 2025 list price" in r.stdout)
    assert calls(env) == []


def test_tpu_create_queued(env):
    r = run(TPU, "create", "--name=trd-v6e", "--zone=us-east1-d", "--accelerator-type=v6e-8", "--queued",
            "--spot", "--valid-until-duration=6h", "--dry-run", env=env)
    (cmd,) = commands(r.stdout)
    assert cmd == ("gcloud compute tpus queued-resources create trd-v6e --node-id=trd-v6e --zone=us-east1-d "
                   "--accelerator-type=v6e-8 --runtime-version=v2-alpha-tpuv6e --spot --valid-until-duration=6h")
    assert "tpu-vm create" not in r.stdout
    assert calls(env) == []


@pytest.mark.parametrize("accel,runtime,chips,hosts,per_hour", [
    ("v5litepod-8", "v2-alpha-tpuv5-lite", 8, 1, "9.60"),
    ("v5p-8", "v2-alpha-tpuv5", 4, 1, "16.80"),
    ("v5p-128", "v2-alpha-tpuv5", 64, 16, "268.80"),
    ("v6e-16", "v2-alpha-tpuv6e", 16, 4, "43.20"),
])
def test_tpu_runtime_and_cost_per_generation(env, accel, runtime, chips, hosts, per_hour):
    r = run(TPU, "create", "--name", "t", "--zone", "us-east5-a", "--accelerator-type", accel, "--dry-run", env=env)
    assert f"--accelerator-type={accel} --version={runtime}" in r.stdout
    line = f"{accel} = {chips} chips ({hosts} host{'' if hosts == 1 else 's'}) x"
    assert line in r.stdout and f"= ~${per_hour}/hour" in r.stdout
    assert f"~${per_hour}/hour" in run(TPU, "cost", "--accelerator-type", accel, env=env).stdout


def test_tpu_install_copies_to_every_worker(env, tmp_path):
    r = run(TPU, "install", "--name", "trd-v5e", "--zone", "us-west4-a", "--dry-run", env=env)
    tar, scp, ssh = commands(r.stdout)
    assert tar.startswith("bash -c ") and "git ls-files" in tar
    assert scp.startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in scp and "--zone=us-west4-a" in scp
    remote = remote_command(ssh)
    assert "--worker=all" in shlex.split(ssh)
    assert 'pip install --quiet --python .venv/bin/python -e . "jax[tpu]"' in remote
    assert "--python 3.11" in remote and "gcsfuse" in remote
    assert calls(env) == []
    # The printed tar command, run: the checkout without its .venv.
    subprocess.run(shlex.split(tar), check=True, env=env, timeout=60)
    names = subprocess.run(["tar", "-tzf", str(tmp_path / "trd_jax-trd-v5e.tar.gz")], capture_output=True,
                           text=True, check=True).stdout.split()
    assert "trd_jax/distributed.py" in names and "launch/tpu.sh" in names
    assert not any(n.startswith(".venv/") for n in names)


def test_tpu_install_git(env):
    r = run(TPU, "install", "--name", "trd-v5e", "--zone", "us-west4-a", "--git-url", "https://example.com/trd.git",
            "--git-ref", "v1.2", "--no-gcsfuse", "--dry-run", env=env)
    (ssh,) = commands(r.stdout)
    remote = remote_command(ssh)
    assert "--worker=all" in shlex.split(ssh)
    assert "git clone --quiet https://example.com/trd.git trd_jax" in remote and "fetch --quiet origin v1.2" in remote
    assert "gcsfuse" not in remote and "scp" not in r.stdout


def test_tpu_run_command(env):
    r = run(TPU, "run", "--name", "trd-v5e", "--zone", "us-west4-a", "--config", "configs/qwen3.py:opsd,4b,trd,v5e-16",
            "--workdir", "gs://my-bucket/runs/q", "--config.student.path=gs://models/Qwen3-4B",
            "--config.train.steps=10", "--config.eval.note=a b", "--env", "HF_HOME=/tmp/hf", "--dry-run", env=env)
    (ssh,) = commands(r.stdout)
    assert "--worker=all" in shlex.split(ssh) and "--zone=us-west4-a" in shlex.split(ssh)
    remote = remote_command(ssh)
    main = ('setsid nohup .venv/bin/python -m trd_jax.main --config configs/qwen3.py:opsd,4b,trd,v5e-16 '
            '--workdir "$HOME"/gcs/my-bucket/runs/q --config.student.path="$HOME"/gcs/models/Qwen3-4B '
            "--config.train.steps=10 --config.eval.note='a b' > \"$LOG\" 2>&1 < /dev/null &")
    assert main in remote
    assert "LOG=logs/trd.worker$TPU_WORKER_ID.log" in remote and "echo $! > logs/trd.pid" in remote
    assert "export HF_HOME=/tmp/hf" in remote
    for bucket in ("my-bucket", "models"):
        assert f'gcsfuse --implicit-dirs --rename-dir-limit=200000 {bucket} "$HOME"/gcs/{bucket}' in remote
    assert calls(env) == []


def test_tpu_run_remote_command_executes(env, tmp_path, monkeypatch):
    """The remote command of `run`, run here as worker 1 of 2: metadata -> TPU_WORKER_*, the run in the
    background in its own process group with its log and pid files; then `stop`'s remote command ends it."""
    home = tmp_path / "home"
    out = tmp_path / "out"
    out.mkdir()
    _write_exe(home / "trd_jax" / ".venv" / "bin" / "python", FAKE_PYTHON)
    env = {**env, "HOME": str(home), "FAKE_OUT": str(out), "FAKE_SLEEP": "60"}
    r = run(TPU, "run", "--name", "t", "--zone", "us-west4-a", "--config", "configs/default.py", "--workdir",
            "/shared/run 1", "--config.train.steps=3", "--dry-run", "--", "-v=1", env=env)
    remote = remote_command(commands(r.stdout)[0])
    started = subprocess.run(["bash", "-c", remote], cwd=home, env=env, capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    assert "worker 1: pid" in started.stdout
    wait_for(out / "proc1.done")
    args = (out / "proc1.args").read_text().splitlines()
    assert args == ["-m", "trd_jax.main", "--config", "configs/default.py", "--workdir", "/shared/run 1",
                    "--config.train.steps=3", "-v=1"]
    penv = read_env(out / "proc1.env")
    assert penv["TPU_WORKER_ID"] == "1" and penv["TPU_WORKER_HOSTNAMES"] == "10.0.0.1,10.0.0.2"
    assert multi_process(monkeypatch, penv)  # so trd_jax starts jax.distributed on the slice
    assert (home / "trd_jax" / "logs" / "trd.worker1.log").exists()
    pid = int((home / "trd_jax" / "logs" / "trd.pid").read_text())
    try:
        assert os.getpgid(pid) == pid  # its own process group: what stop signals
        # A second start while it runs is refused.
        again = subprocess.run(["bash", "-c", remote], cwd=home, env=env, capture_output=True, text=True, timeout=30)
        assert again.returncode == 1 and "still running" in again.stderr
        stop = run(TPU, "stop", "--name", "t", "--zone", "us-west4-a", "--dry-run", env=env)
        stopped = subprocess.run(["bash", "-c", remote_command(commands(stop.stdout)[0])], cwd=home, env=env,
                                 capture_output=True, text=True, timeout=30)
        assert "stopped trd" in stopped.stdout
        end = time.time() + 10
        while _alive(pid):
            assert time.time() < end, "stop left the run alive"
            time.sleep(0.05)
    finally:
        if _alive(pid):
            os.kill(pid, 9)
    assert [c.split()[0] for c in calls(env)] == ["curl", "curl"]  # the metadata reads, nothing else


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_tpu_run_local_workdir_notes_multi_host(env):
    r = run(TPU, "run", "--name", "t", "--zone", "us-west4-a", "--config", "configs/default.py", "--workdir", "runs/x",
            "--dry-run", env=env)
    assert "--workdir runs/x" in remote_command(commands(r.stdout)[0])
    assert "gcsfuse" not in remote_command(commands(r.stdout)[0])
    assert "# --workdir runs/x is on each worker's own disk" in r.stdout


def test_tpu_logs_stop_status_delete(env):
    base = ["--name", "trd-v5e", "--zone", "us-west4-a", "--dry-run"]
    (logs,) = commands(run(TPU, "logs", *base, env=env).stdout)
    assert "--worker=0" in shlex.split(logs) and remote_command(logs) == "tail -n 200 -F trd_jax/logs/trd.worker0.log"
    (logs,) = commands(run(TPU, "logs", *base, "--worker", "3", "--run-name", "exp2", env=env).stdout)
    assert "--worker=3" in shlex.split(logs) and remote_command(logs).endswith("trd_jax/logs/exp2.worker3.log")
    (stop,) = commands(run(TPU, "stop", *base, env=env).stdout)
    assert "--worker=all" in shlex.split(stop)
    assert 'kill -TERM -- "-$(cat trd_jax/logs/trd.pid)"' in remote_command(stop)
    (status,) = commands(run(TPU, "status", *base, "--queued", env=env).stdout)
    assert status == "gcloud compute tpus queued-resources describe trd-v5e --zone=us-west4-a"
    (delete,) = commands(run(TPU, "delete", *base, env=env).stdout)
    assert delete == "gcloud compute tpus tpu-vm delete trd-v5e --zone=us-west4-a"
    (delete,) = commands(run(TPU, "delete", *base, "--queued", "--qr-id", "my-qr", "--yes", env=env).stdout)
    assert delete == "gcloud compute tpus queued-resources delete my-qr --zone=us-west4-a --force --quiet"
    assert calls(env) == []


TPU_OK = ["--name", "t", "--zone", "us-west4-a"]


@pytest.mark.parametrize("args,flag", [
    (["create", *TPU_OK, "--accelerator-type", "v5e-16"], "--accelerator-type"),
    (["create", *TPU_OK, "--accelerator-type", "v5litepod-12"], "--accelerator-type"),
    (["create", *TPU_OK, "--accelerator-type", "v5p-4"], "--accelerator-type"),
    (["create", *TPU_OK], "--accelerator-type"),
    (["cost", "--accelerator-type", "v4-8"], "--accelerator-type"),
    (["create", "--name", "t", "--accelerator-type", "v6e-8"], "--zone"),
    (["create", "--name", "t", "--zone", "--accelerator-type", "v6e-8"], "--zone"),
    (["create", "--name", "t", "--zone", "uswest4a", "--accelerator-type", "v6e-8"], "--zone"),
    (["create", "--zone", "us-west4-a", "--accelerator-type", "v6e-8"], "--name"),
    (["create", "--name", "Bad_Name", "--zone", "us-west4-a", "--accelerator-type", "v6e-8"], "--name"),
    (["create", *TPU_OK, "--accelerator-type", "v6e-8", "--runtime-version", "v2-alpha-tpuv5-lite"],
     "--runtime-version"),
    (["create", *TPU_OK, "--accelerator-type", "v6e-8", "--queued", "--preemptible"], "--preemptible"),
    (["create", *TPU_OK, "--accelerator-type", "v6e-8", "--spot=yes"], "--spot"),
    (["run", *TPU_OK, "--workdir", "gs://b/x"], "--config"),
    (["run", *TPU_OK, "--config", "configs/nope.py", "--workdir", "gs://b/x"], "--config"),
    (["run", *TPU_OK, "--config", "configs/default.py"], "--workdir"),
    (["run", *TPU_OK, "--config", "configs/default.py", "--workdir", "gs://B@d/x"], "--workdir"),
    (["run", *TPU_OK, "--config", "configs/default.py", "--workdir", "x", "--config.train.steps", "3"],
     "--config.train.steps"),
    (["run", *TPU_OK, "--config", "configs/default.py", "--workdir", "x", "--env", "1X=2"], "--env"),
    (["run", *TPU_OK, "--config", "configs/default.py", "--workdir", "x", "--spot"], "--spot"),
    (["run", *TPU_OK, "--config", "configs/default.py", "--workdir", "x", "--", "--dry-run"], "--dry-run"),
    (["logs", *TPU_OK, "--worker", "x"], "--worker"),
    (["delete", *TPU_OK, "--accelerator-type", "v6e-8"], "--accelerator-type"),
    (["create", *TPU_OK, "--accelerator-type", "v6e-8", "--frobnicate"], "--frobnicate"),
    (["launch", *TPU_OK], "unknown command 'launch'"),
    ([], "missing COMMAND"),
])
def test_tpu_bad_arguments(env, args, flag):
    r = run(TPU, *args, "--dry-run", env=env, check=False)
    assert r.returncode == 2, r.stdout
    assert flag in r.stderr.splitlines()[0], r.stderr
    assert calls(env) == []


# ------------------------------------------------------------------------------------------ gpu_slurm.sh

SLURM_OK = ["--config", "configs/default.py"]


def test_slurm_dry_run_script(env, tmp_path):
    workdir = tmp_path / "runs" / "x"
    r = run(SLURM, "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "12:00:00",
            *SLURM_OK, "--workdir", str(workdir), "--config.train.steps=10", "--config.student.path=/m/a b",
            "--env", "HF_HOME=/shared/hf", "--dry-run", env=env)
    out = r.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=12:00:00", f"#SBATCH --output={workdir}/slurm/%x-%j.out",
                 'mapfile -t NODE_NAMES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
                 'export JAX_COORDINATOR_ADDRESS="${NODE_NAMES[0]}:12321"', "export JAX_NUM_PROCESSES=2",
                 "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
                 "export HF_HOME=/shared/hf"):
        assert line in out.splitlines(), line
    assert "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --gpus-per-node=8" in out
    assert "bash -c 'export JAX_PROCESS_ID=\"$SLURM_PROCID\"; exec \"$@\"' trd_jax \"${CMD[@]}\"" in out
    assert (f"CMD=({REPO}/.venv/bin/python -m trd_jax.main --config configs/default.py --workdir {workdir} "
            "--config.train.steps=10 --config.student.path='/m/a b')") in out
    lines = out.splitlines()
    assert lines[1] == f"mkdir -p {workdir}/slurm"
    assert lines[2] == f"cat > {workdir}/slurm/trd_jax.sbatch <<'SBATCH_EOF'"
    assert [l for l in lines if l.startswith("sbatch ")] == [f"sbatch {workdir}/slurm/trd_jax.sbatch"]
    assert lines.index(f"sbatch {workdir}/slurm/trd_jax.sbatch") > lines.index("SBATCH_EOF")
    assert not workdir.exists() and calls(env) == []


def test_slurm_submit_and_run_the_script(env, tmp_path, monkeypatch):
    """Without --dry-run: the script is written and handed to (stub) sbatch; run under stub scontrol / srun
    on a 2-node allocation, each process gets its own JAX_PROCESS_ID and the shared coordinator."""
    workdir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    python = _write_exe(tmp_path / "bin" / "python", FAKE_PYTHON)
    r = run(SLURM, "--nodes=2", "--gpus-per-node=4", *SLURM_OK, "--workdir", str(workdir), "--python", str(python),
            "--port", "23456", "--config.train.steps=5", "--config.eval.note=x y", "--", "--alsologtostderr", env=env)
    script = workdir / "slurm" / "trd_jax.sbatch"
    assert calls(env) == [f"sbatch {script}"] and script.exists()
    assert f"sbatch {script}" in r.stdout
    job = subprocess.run(["bash", str(script)], env={**env, "FAKE_OUT": str(out), "SLURM_JOB_ID": "7",
                                                      "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2"},
                         capture_output=True, text=True, timeout=60)
    assert job.returncode == 0, job.stderr
    for p in (0, 1):
        penv = read_env(out / f"proc{p}.env")
        assert (penv["JAX_COORDINATOR_ADDRESS"], penv["JAX_NUM_PROCESSES"], penv["JAX_PROCESS_ID"]) == \
            ("gpu01:23456", "2", str(p))
        assert (out / f"proc{p}.args").read_text().splitlines() == [
            "-m", "trd_jax.main", "--config", "configs/default.py", "--workdir", str(workdir),
            "--config.train.steps=5", "--config.eval.note=x y", "--alsologtostderr"]
        assert multi_process(monkeypatch, penv)
        assert penv["SLURM_LOCALID"] == "0" and penv["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
        assert jax_local_device_ids(monkeypatch, penv) == [0, 1, 2, 3]  # all 4 GPUs, not SLURM_LOCALID's one
        no_ids = {k: v for k, v in penv.items() if k != "JAX_LOCAL_DEVICE_IDS"}
        assert jax_local_device_ids(monkeypatch, no_ids) == [0]  # what the export prevents
    assert calls(env)[1:] == ['scontrol show hostnames gpu[01-02]',
                              'srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --gpus-per-node=4 --distribution=block '
                              f'--kill-on-bad-exit=1 bash -c export JAX_PROCESS_ID="$SLURM_PROCID"; exec "$@" trd_jax '
                              f'{python} -m trd_jax.main --config configs/default.py --workdir {workdir} '
                              '--config.train.steps=5 --config.eval.note=x y --alsologtostderr']


def test_slurm_single_node_starts_no_distributed(env, tmp_path, monkeypatch):
    r = run(SLURM, "--nodes", "1", "--gpus-per-node", "8", *SLURM_OK, "--workdir", str(tmp_path), "--dry-run", env=env)
    assert "export JAX_NUM_PROCESSES=1" in r.stdout.splitlines()
    assert not multi_process(monkeypatch, {"JAX_COORDINATOR_ADDRESS": "gpu01:12321", "JAX_NUM_PROCESSES": "1",
                                           "SLURM_NTASKS": "1"})


@pytest.mark.parametrize("args,flag", [
    (["--nodes", "0", "--gpus-per-node", "8", *SLURM_OK, "--workdir", "/w"], "--nodes"),
    (["--nodes", "two", "--gpus-per-node", "8", *SLURM_OK, "--workdir", "/w"], "--nodes"),
    (["--gpus-per-node", "8", *SLURM_OK, "--workdir", "/w"], "--nodes"),
    (["--nodes", "2", "--gpus-per-node", "0", *SLURM_OK, "--workdir", "/w"], "--gpus-per-node"),
    (["--nodes", "2", *SLURM_OK, "--workdir", "/w"], "--gpus-per-node"),
    (["--nodes", "2", "--gpus-per-node", "8", "--workdir", "/w"], "--config"),
    (["--nodes", "2", "--gpus-per-node", "8", "--config", "configs/missing.py", "--workdir", "/w"], "--config"),
    (["--nodes", "2", "--gpus-per-node", "8", *SLURM_OK], "--workdir"),
    (["--nodes", "2", "--gpus-per-node", "8", *SLURM_OK, "--workdir", "gs://b/x"], "--workdir"),
    (["--nodes", "2", "--gpus-per-node", "8", *SLURM_OK, "--workdir", "/w", "--time", "1h"], "--time"),
    (["--nodes", "2", "--gpus-per-node", "8", *SLURM_OK, "--workdir", "/w", "--port", "80"], "--port"),
    (["--nodes", "2", "--gpus-per-node", "8", *SLURM_OK, "--workdir", "/w", "--config.train.steps"],
     "--config.train.steps"),
    (["--nodes", "2", "--gpus-per-node", "8", *SLURM_OK, "--workdir", "/w", "--partiton", "gpu"], "--partiton"),
    (["--nodes", "2", "--gpus-per-node", "8", *SLURM_OK, "--workdir", "/w", "--", "--dry-run"], "--dry-run"),
])
def test_slurm_bad_arguments(env, args, flag):
    r = run(SLURM, *args, "--dry-run", env=env, check=False)
    assert r.returncode == 2, r.stdout
    assert flag in r.stderr.splitlines()[0], r.stderr
    assert calls(env) == []


# ------------------------------------------------------------------------------------------ gpu_env.sh

GPU_ENV_OK = ["--coordinator", "node0:12321", "--num-processes", "2", "--process-id", "1"]


def test_gpu_env_exports(env, monkeypatch):
    r = run(GPU_ENV, *GPU_ENV_OK, env=env)
    assert r.stdout.splitlines() == ["export JAX_COORDINATOR_ADDRESS=node0:12321", "export JAX_NUM_PROCESSES=2",
                                     "export JAX_PROCESS_ID=1"]
    got = subprocess.run(["bash", "-c", f'eval "$(bash {GPU_ENV} {" ".join(GPU_ENV_OK)})"; env'], env=env,
                         capture_output=True, text=True, check=True, timeout=30).stdout
    penv = read_env_text(got)
    assert multi_process(monkeypatch, penv)
    assert run(GPU_ENV, *GPU_ENV_OK, "--dry-run", env=env).stdout == r.stdout  # nothing runs either way


def read_env_text(text: str) -> dict[str, str]:
    return dict(l.split("=", 1) for l in text.splitlines() if "=" in l)


def test_gpu_env_exec_and_dry_run(env):
    r = run(GPU_ENV, *GPU_ENV_OK, "--", "bash", "-c",
            'echo "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID $0"',
            "arg one", env=env)
    assert r.stdout == "node0:12321 2 1 arg one\n"
    r = run(GPU_ENV, *GPU_ENV_OK, "--dry-run", "--", "python", "-m", "trd_jax.main", "--workdir", "/a b", env=env)
    assert r.stdout == ("env JAX_COORDINATOR_ADDRESS=node0:12321 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 "
                        "python -m trd_jax.main --workdir '/a b'\n")
    r = run(GPU_ENV, *GPU_ENV_OK, "--local-device-ids", "0,1,2,3", "--", "bash", "-c", "echo $JAX_LOCAL_DEVICE_IDS",
            env=env)
    assert r.stdout == "0,1,2,3\n"


@pytest.mark.parametrize("args,flag", [
    (["--coordinator", "node0:12321", "--num-processes", "2", "--process-id", "one"], "--process-id"),
    (["--coordinator", "node0:12321", "--num-processes", "2", "--process-id", "1.0"], "--process-id"),
    (["--coordinator", "node0:12321", "--num-processes", "2", "--process-id", "2"], "--process-id"),
    (["--coordinator", "node0:12321", "--num-processes", "2"], "--process-id"),
    (["--coordinator", "node0:12321", "--num-processes", "0", "--process-id", "0"], "--num-processes"),
    (["--coordinator", "node0:12321", "--num-processes", "x", "--process-id", "0"], "--num-processes"),
    (["--coordinator", "node0", "--num-processes", "2", "--process-id", "0"], "--coordinator"),
    (["--coordinator", "node0:0", "--num-processes", "2", "--process-id", "0"], "--coordinator"),
    (["--num-processes", "2", "--process-id", "0"], "--coordinator"),
    ([*GPU_ENV_OK, "--rank", "0"], "--rank"),
    ([*GPU_ENV_OK, "--local-device-ids", "0-3"], "--local-device-ids"),
    ([*GPU_ENV_OK, "--"], "--"),
])
def test_gpu_env_bad_arguments(env, args, flag):
    r = run(GPU_ENV, *args, env=env, check=False)
    assert r.returncode == 2, r.stdout
    assert flag in r.stderr.splitlines()[0], r.stderr


# ------------------------------------------------------------------------------------------ offline_pair.sh

PAIR_OK = ["--config", "configs/default.py", "--rounds", "3", "--steps-per-round", "4"]
SHARED = ["--config.offline.teacher_job=true", "--config.offline.rounds=3", "--config.offline.steps_per_round=4",
          "--config.offline.max_lag=1", "--config.train.steps=12", "--config.seed=5"]


def test_offline_pair_slurm_starts_a_teacher_job_and_a_training_job(env, tmp_path):
    """Two sbatch scripts, each resolving as a valid run of trd_jax: the teacher job in generate mode, the
    training job in train mode, with the same offline settings and folder."""
    import json

    from trd_jax.config import resolve
    from trd_jax.recipes import apply_overrides, default_config

    def settings_of(cmd):
        """The command's settings: configs/default.py with its --config.KEY=VALUE words (typed as the flag
        parser types them: true, numbers, else text)."""
        def typed(v):
            try:
                return json.loads(v)
            except ValueError:
                return v

        words = [w[len("--config."):].split("=", 1) for w in cmd if w.startswith("--config.")]
        return resolve(apply_overrides(default_config(), {k: typed(v) for k, v in words}))

    workdir = tmp_path / "pair"
    r = run(PAIR, "slurm", *PAIR_OK, "--workdir", str(workdir), "--max-lag", "1", "--teacher=--nodes=1",
            "--teacher=--gpus-per-node=2", "--student=--nodes=2", "--student=--gpus-per-node=8",
            "--student=--job-name=mine", "--config.seed=5", "--dry-run", env=env)
    out = r.stdout
    assert [l for l in out.splitlines() if l.startswith("sbatch ")] == [
        f"sbatch {workdir}/teacher/slurm/trd_teacher.sbatch", f"sbatch {workdir}/train/slurm/mine.sbatch"]
    cmds = [shlex.split(l[len("CMD=("):-1]) for l in out.splitlines() if l.startswith("CMD=(")]
    assert len(cmds) == 2
    offline = f"--config.offline.dir={workdir}/targets"
    for cmd, role_dir in zip(cmds, ("teacher", "train")):
        assert cmd[cmd.index("--workdir") + 1] == f"{workdir}/{role_dir}"
        assert offline in cmd and all(flag in cmd for flag in SHARED)
        assert cmd[cmd.index("--config") + 1] == "configs/default.py"
        settings = settings_of(cmd)
        assert settings.offline.teacher_job and settings.offline.rounds == 3 and settings.offline.max_lag == 1
    assert "--config.mode=generate" in cmds[0] and not any(w.startswith("--config.mode") for w in cmds[1])
    assert "#SBATCH --nodes=1" in out and "#SBATCH --nodes=2" in out
    assert out.index("the teacher job") < out.index("the training job")
    assert not workdir.exists() and calls(env) == []


def test_offline_pair_tpu_runs_on_two_tpus(env):
    r = run(PAIR, "tpu", *PAIR_OK, "--workdir", "gs://my-bucket/runs/p", "--teacher=--name=t1",
            "--teacher=--zone=us-east5-a", "--student=--name=s1", "--student=--zone=us-east5-a", "--top-k", "32",
            "--dry-run", env=env)
    teacher, student = commands(r.stdout)
    assert "t1" in shlex.split(teacher) and "s1" in shlex.split(student)
    t, s = remote_command(teacher), remote_command(student)
    assert "--config.mode=generate" in t and "--config.mode" not in s
    for remote in (t, s):
        assert '--config.offline.dir="$HOME"/gcs/my-bucket/runs/p/targets' in remote
        assert "--config.offline.top_k=32" in remote and "--config.offline.max_lag=0" in remote
    assert "logs/trd_teacher.pid" in t and "logs/trd_train.pid" in s
    assert calls(env) == []


@pytest.mark.parametrize("args,flag", [
    ([*PAIR_OK, "--workdir", "/w"], "backend"),
    (["slurm", *PAIR_OK, "--workdir", "/w", "--max-lag", "3"], "--max-lag"),
    (["slurm", *PAIR_OK, "--workdir", "/w", "--rounds", "0"], "--rounds"),
    (["slurm", *PAIR_OK, "--workdir", "/w", "--teacher", "--nodes=2"], "--teacher"),
    (["slurm", *PAIR_OK, "--workdir", "/w", "--config.offline.dir=/x"], "--config.offline.dir"),
    (["slurm", *PAIR_OK, "--workdir", "/w", "--config.train.steps=3"], "--config.train.steps"),
    (["slurm", "tpu", *PAIR_OK, "--workdir", "/w"], "one backend"),
    (["slurm", "--rounds", "2", "--steps-per-round", "1", "--workdir", "/w"], "--config"),
])
def test_offline_pair_bad_arguments(env, args, flag):
    r = run(PAIR, *args, "--dry-run", env=env, check=False)
    assert r.returncode == 2, r.stdout
    assert flag in r.stderr.splitlines()[0], r.stderr
    assert calls(env) == []
