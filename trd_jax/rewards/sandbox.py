"""Run untrusted Python (model-written code) in a contained child process. Linux only.

Layers, outermost first (see ``SANDBOX_GUARANTEES`` below for what they do and do not promise):

1. Namespaces (when this machine allows them; otherwise ``run_program`` refuses unless
   ``SandboxConfig.allow_unsandboxed``): a new network namespace (no interface but a downed loopback:
   no network at all), PID namespace (the program sees only its own processes and the whole tree dies
   with it), IPC namespace, and mount namespace in which the whole filesystem is read-only, /tmp,
   /var/tmp, /run, /root and /home are empty, /dev holds only null/zero/full/random/urandom, and the
   working directory is a private size-bounded tmpfs.
2. Credentials: when the parent is root the program runs as ``sandbox_uid`` (nobody); the program
   never keeps a capability (it execs as a non-root uid of its user namespace, with no_new_privs).
3. Resource limits: a memory cgroup for the whole sandbox where the machine allows one
   (rewards/memory_cgroup.py), and setrlimit in the child before exec: CPU seconds, address space, file size,
   processes (counted per sandbox: each sandbox gets a fresh user namespace, whose process count starts
   at zero), open files, no core dumps; a wall-clock timeout kills the whole process group.
4. A scrubbed environment (PATH, LANG, HOME and TMPDIR only) and Python's isolated mode (-I -S -B).
5. An audit hook (sys.addaudithook, ``SandboxConfig.audit_hook``) refusing process creation, sockets,
   ctypes and writes outside the working directory. Audit hooks can be bypassed by determined code, so
   this is a second layer that turns likely mistakes into clean failures, not the containment.

This file is the parent's side: the configuration, running programs and reading their results. The
sandbox itself is built by sandbox_launcher.py, which the parent runs as ``python -I -S -B
sandbox_launcher.py --launch SPEC``: a fresh single-threaded interpreter that builds the sandbox and then
execs the program. (Doing this in a ``preexec_fn`` would run Python code in a fork of a multi-threaded
parent - ``run_many`` uses threads -, which can deadlock.)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from trd_jax.rewards import sandbox_launcher
from trd_jax.rewards.memory_cgroup import MemoryCgroup
from trd_jax.rewards.sandbox_launcher import (JUDGE_ERROR_EXIT_CODE, MEMORY_EXIT_CODE, PRELUDE_HEAD, PROGRAM_NAME,
                                              TESTS_NAME)

STATUSES = ("ok", "failed", "timeout", "killed", "memory", "error")
# Directories replaced by an empty read-only tmpfs in the sandbox: scratch space shared with other
# processes (and the sockets of /run), and home directories (credentials, tokens, caches).
DEFAULT_HIDDEN_PATHS = ("/tmp", "/var/tmp", "/run", "/root", "/home")
NOBODY_UID = 65534
_JUDGE_SOURCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "judge.py")

SANDBOX_GUARANTEES = """\
Guaranteed with namespaces (the default; run_program refuses without them):
- no network: the program's network namespace has only a downed loopback interface (TCP/UDP to any
  host, the parent's loopback included, fails), abstract unix sockets are per namespace, and the
  directories holding path unix sockets (/run, /tmp) are hidden;
- no write outside its working directory: every mount is read-only and nosuid (the program cannot undo
  this: it holds no capability), the working directory is a private tmpfs of disk_mb MiB that vanishes
  with the sandbox, /tmp, /var/tmp, /run, /root, /home (and hidden_paths) are empty, /dev has only
  null, zero, full, random, urandom;
- no secrets from the parent: the environment is PATH, LANG, HOME, TMPDIR only; /proc is the program's
  own PID namespace (no /proc/<parent>/environ); home directories are hidden;
- bounded resources: wall time (timeout_s, then SIGKILL of the whole tree: the PID namespace dies with
  its first process, which the launcher's death kills), CPU time per process (cpu_s), address space
  per process (memory_mb), file size (file_size_mb), processes and threads of the program together
  (max_processes), open files (max_open_files), no core dumps;
- no privilege: as root the program runs as sandbox_uid; it ends up with no capability and with
  no_new_privs (setuid binaries do not elevate).
Guaranteed in judge mode (run_program(..., tests=...), the HumanEval and MBPP styles of rewards/code.py):
- the verdict is the exit code of the judge (rewards/judge.py), a process that runs the trusted tests
  and starts the program as a separate interpreter; it is 0 only when every test ran to the end, so the
  program's exit code, early exit, excepthook, trace function or output cannot make it pass, and killing
  the judge fails the program;
- the tests are read and deleted before the program starts and the judge is non-dumpable: the program
  (same uid) cannot ptrace it or read its memory, environment or descriptors under /proc;
- what the program returns is rebuilt in the judge as plain data of exact builtin types and compared
  by the judge; its other objects stay in the program and refuse ==, ordering, hashing, truth and `in`
  (an always-true __eq__ or __bool__ never decides); names of builtins and of the trusted setup or
  prompt (HumanEval's helpers, MBPP's imports) are never replaced by the program's;
- not supported, so such tests fail: a test that checks the program mutated an argument in place (the
  program gets copies), and a test that passes the program a callback or an object of a class the tests
  define (only plain data and the program's own objects cross); a process of the program's that outlives
  it while holding the pipe is noticed within half a second.
Not guaranteed:
- kernel bugs: namespaces and rlimits are not a VM; there is no seccomp filter;
- files readable by the sandbox uid outside the hidden paths stay readable (e.g. /etc, /usr, /work),
  and so do /sys and the system-wide parts of /proc (hardware, load); /proc is writable as it is for any
  unprivileged process (its own entries);
- kernel keyrings: the session keyring is inherited from the parent (unreachable from the standard
  library without ctypes, which the audit hook refuses);
- memory as a whole where no memory cgroup can be made (SandboxResult.memory_cgroup False; with one,
  total_memory_mb bounds everything the sandbox holds: processes, working tmpfs, memfds, shared memory):
  memory is then limited per process, so the total is at most max_processes * memory_mb, and memfds
  (not blocked: no seccomp) add up to file_size_mb each, max_open_files per process. CPU time is per
  process in any case. SysV shared memory and message queues are closed in the sandbox's IPC namespace
  (where the kernel lets its owner set /proc/sys/kernel/shm*, msgmni; always as root), POSIX queues get
  RLIMIT_MSGQUEUE 0 and /dev/shm is read-only; the working directory holds at most max_files inodes;
- with allow_unsandboxed=True and no namespaces: no network isolation, no read-only filesystem, no
  hidden paths; a process that calls setsid() escapes the group kill; a parent running as root that
  cannot hand the interpreter to sandbox_uid runs the program as root (where RLIMIT_NPROC is void);
  only the rlimits, the environment scrub and the (bypassable) audit hook remain.
"""


class SandboxUnavailableError(RuntimeError):
    """The machine cannot build the namespaces and the caller did not allow running without them."""


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    timeout_s: float = 10.0  # wall clock, then SIGKILL of the whole process tree
    cpu_s: float = 10.0  # CPU seconds per process (RLIMIT_CPU, rounded up)
    memory_mb: int = 1024  # address space per process (RLIMIT_AS)
    file_size_mb: int = 16  # largest file the program may write (RLIMIT_FSIZE)
    disk_mb: int = 64  # size of the private working directory (tmpfs; with namespaces only)
    # Files and directories the working directory can hold (its tmpfs's inode limit: empty files cost
    # kernel memory that disk_mb does not count).
    max_files: int = 4096
    max_processes: int = 32  # processes and threads of the program, itself included (RLIMIT_NPROC)
    max_open_files: int = 64  # RLIMIT_NOFILE
    # Everything the sandbox holds together (its processes, working tmpfs, memfds, shared memory): a memory
    # cgroup, where this machine lets us create one (rewards/memory_cgroup.py); beyond it the kernel kills
    # a process of the sandbox and the status is "memory". None: twice memory_mb.
    total_memory_mb: int | None = None
    output_limit_bytes: int = 1 << 20  # stdout and stderr are each cut to this many bytes
    audit_hook: bool = True  # the second-layer audit hook (see the module docstring)
    # Emptied in the sandbox (absolute paths). The interpreter's installation is shown again when it lies
    # inside one; outside them, every directory above it must be enterable by the program's uid.
    hidden_paths: tuple[str, ...] = DEFAULT_HIDDEN_PATHS
    sandbox_uid: int = NOBODY_UID  # the uid the program runs as when the parent is root
    # Without namespaces the program would have the network and a writable filesystem: refuse unless set.
    allow_unsandboxed: bool = False

    def __post_init__(self):
        for name in ("timeout_s", "cpu_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"SandboxConfig.{name}={value!r}: must be a number > 0")
        # memory_mb >= 64: the interpreter itself needs some tens of MiB of address space to start.
        for name, low in (("memory_mb", 64), ("file_size_mb", 1), ("disk_mb", 1), ("max_files", 16),
                          ("max_processes", 1),
                          ("max_open_files", 16), ("output_limit_bytes", 1), ("sandbox_uid", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"SandboxConfig.{name}={value!r}: must be an int >= {low}")
        total = self.total_memory_mb
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 64):
            raise ValueError(f"SandboxConfig.total_memory_mb={total!r}: must be None or an int >= 64")
        for name in ("audit_hook", "allow_unsandboxed"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SandboxConfig.{name}={getattr(self, name)!r}: must be a bool")
        paths = self.hidden_paths
        if not isinstance(paths, (tuple, list)) or not all(isinstance(p, str) and os.path.isabs(p) and p != "/"
                                                            for p in paths):
            raise ValueError(f"SandboxConfig.hidden_paths={paths!r}: must be a tuple of absolute paths other than /")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    # ok: exit 0 | failed: other exit code | timeout: wall clock or CPU limit | killed: a signal |
    # memory: MemoryError | error: the sandbox could not be built (see `error`)
    status: str
    returncode: int  # negative: killed by that signal
    stdout: str
    stderr: str
    wall_s: float
    truncated: bool  # stdout or stderr was cut to output_limit_bytes
    isolated: bool  # ran inside the namespaces (False only with allow_unsandboxed)
    error: str = ""
    memory_cgroup: bool = False  # total_memory_mb was enforced by a memory cgroup

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ------------------------------------------------------------------------------------------------
# Parent side


@functools.lru_cache(maxsize=1)
def probe_isolation() -> tuple[bool, str]:
    """(whether this machine can build the sandbox's namespaces, why not). Runs a trivial program once."""
    result = _execute("pass", SandboxConfig(timeout_s=30.0), None, isolate=True)
    if result.ok:
        return True, ""
    return False, result.error or f"{result.status}: {result.stderr.strip()[-500:]}"


def run_program(source: str, config: SandboxConfig | None = None, stdin: str | bytes | None = None,
                tests: dict | None = None) -> SandboxResult:
    """Run the Python program ``source`` (stdin: text or bytes fed to it) in the sandbox.

    With ``tests`` (JSON-ready: ``{"style": "humaneval", "prompt", "test", "entry_point"}`` or
    ``{"style": "asserts", "setup", "tests": [statements]}``) the sandbox runs the judge of
    rewards/judge.py instead: the tests run in a process of their own that the program cannot reach, and
    the result's status is ``ok`` only when every test ran to the end."""
    config = config or SandboxConfig()
    available, reason = probe_isolation()
    if not available and not config.allow_unsandboxed:
        raise SandboxUnavailableError(
            f"cannot create the sandbox's namespaces here ({reason}); refusing to run untrusted code with "
            "network access and a writable filesystem. Set SandboxConfig.allow_unsandboxed=True to run anyway.")
    return _execute(source, config, stdin, isolate=available, tests=tests)


def run_many(sources: Sequence[str], config: SandboxConfig | None = None,
             stdins: Sequence[str | bytes | None] | None = None, max_workers: int | None = None,
             tests: Sequence[dict | None] | None = None) -> list[SandboxResult]:
    """``run_program`` over many programs, at most ``max_workers`` (default: the CPU count) at a time;
    results in the order of ``sources``."""
    from concurrent.futures import ThreadPoolExecutor

    for name, values in (("stdins", stdins), ("tests", tests)):
        if values is not None and len(values) != len(sources):
            raise ValueError(f"run_many: {name} has {len(values)} entries for {len(sources)} sources")
    if max_workers is not None and max_workers < 1:
        raise ValueError(f"run_many: max_workers={max_workers!r}: must be >= 1")
    if not sources:
        return []
    config = config or SandboxConfig()
    probe_isolation()  # once, before the threads (and its refusal raises here, not in a worker)
    inputs = stdins if stdins is not None else [None] * len(sources)
    judged = tests if tests is not None else [None] * len(sources)
    # Threads suffice: each one only waits on its child process.
    with ThreadPoolExecutor(max_workers=max_workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda job: run_program(*job), zip(sources, [config] * len(sources), inputs, judged)))


@functools.lru_cache(maxsize=1)
def _judge_sources() -> dict[str, str]:
    """The judge's source and the candidate's (the prelude's head, then the judge's), read once."""
    with open(_JUDGE_SOURCE_PATH, encoding="utf-8") as f:
        source = f.read()
    return dict(source=source, candidate_source=PRELUDE_HEAD + "\n" + source)


def _interpreter() -> tuple[str, list[str]]:
    """The real interpreter binary (a venv's python is a symlink to it; -I -S needs no venv) and the
    directories the sandbox must show for it to start: its installation prefix(es)."""
    python = os.path.realpath(sys.executable)
    dirs = sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix), os.path.dirname(python)})
    # Keep only the outermost (a directory inside another is shown with it).
    return python, [d for d in dirs if not any(d != o and d.startswith(o.rstrip("/") + "/") for o in dirs)]


def _execute(source: str, config: SandboxConfig, stdin: str | bytes | None, isolate: bool,
             tests: dict | None = None) -> SandboxResult:
    python, exposed = _interpreter()
    workdir = tempfile.mkdtemp(prefix="trd-sandbox-")
    group = MemoryCgroup.create((config.total_memory_mb or 2 * config.memory_mb) << 20)
    oom = False
    status_read, status_write = os.pipe()  # the launcher's setup errors (closed unread on a good exec)
    try:
        with open(os.path.join(workdir, PROGRAM_NAME), "w", encoding="utf-8") as f:
            f.write(source)
        judge = None
        if tests is not None:
            with open(os.path.join(workdir, TESTS_NAME), "w", encoding="utf-8") as f:
                json.dump(tests, f)
            judge = _judge_sources()
        stdin_path = os.path.join(workdir, ".stdin")
        with open(stdin_path, "wb") as f:
            f.write(stdin.encode("utf-8") if isinstance(stdin, str) else stdin or b"")
        if os.geteuid() == 0:  # the program runs as sandbox_uid: give it its directory
            for path in (workdir, *(os.path.join(workdir, name) for name in (PROGRAM_NAME, TESTS_NAME))):
                if os.path.exists(path):
                    os.chown(path, config.sandbox_uid, config.sandbox_uid)
        spec = dict(isolate=isolate, workdir=workdir, python=python, exposed=exposed,
                    hidden=list(config.hidden_paths), uid=config.sandbox_uid, status_fd=status_write,
                    cpu_s=math.ceil(config.cpu_s), memory_mb=config.memory_mb, file_size_mb=config.file_size_mb,
                    disk_mb=config.disk_mb, max_files=config.max_files, max_processes=config.max_processes,
                    max_open_files=config.max_open_files, audit_hook=config.audit_hook, judge=judge,
                    cgroup_procs=group.procs_file if group else None)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        start = time.monotonic()
        with open(stdin_path, "rb") as stdin_file:
            proc = subprocess.Popen(
                [python, "-I", "-S", "-B", os.path.abspath(sandbox_launcher.__file__), "--launch",
                 json.dumps(spec)],
                stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=env,
                start_new_session=True, close_fds=True, pass_fds=(status_write,))
        os.close(status_write)
        status_write = -1
        try:
            stdout, stderr, truncated, timed_out = _collect(proc, start + config.timeout_s, config.output_limit_bytes)
        finally:
            # Stragglers (or everything, if collecting failed). Before the wait: the group cannot be
            # recycled while its leader, the launcher, is unreaped.
            _kill_group(proc.pid)
            returncode = proc.wait()
        wall_s = time.monotonic() - start
        setup_error = _read_all(status_read).decode("utf-8", "replace")
        oom = group is not None and group.oom_killed()
    finally:
        for fd in (status_read, status_write):
            if fd >= 0:
                os.close(fd)
        _remove_tree(workdir)
        if group is not None:
            group.remove()
    stderr_text = stderr.decode("utf-8", "replace")
    if not setup_error and tests is not None and returncode == JUDGE_ERROR_EXIT_CODE:
        # Only the judge's own setup exits so (the program's exit codes never reach the launcher).
        setup_error = "the judge could not set the tests up: " + stderr_text.strip()[-1000:]
    return SandboxResult(status=_status(setup_error, timed_out, returncode, oom), returncode=returncode,
                         stdout=stdout.decode("utf-8", "replace"), stderr=stderr_text,
                         wall_s=wall_s, truncated=truncated, isolated=isolate, error=setup_error,
                         memory_cgroup=group is not None)


def _status(setup_error: str, timed_out: bool, returncode: int, oom: bool = False) -> str:
    if setup_error:
        return "error"
    if oom and returncode != 0:  # the memory cgroup's limit: the kernel killed a process of the sandbox
        return "memory"
    if timed_out or returncode == -signal.SIGXCPU:  # SIGXCPU: RLIMIT_CPU reached
        return "timeout"
    if returncode < 0:
        return "killed"
    if returncode == MEMORY_EXIT_CODE:
        return "memory"
    return "ok" if returncode == 0 else "failed"


def _collect(proc: subprocess.Popen, deadline: float, limit: int) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout and stderr until the process exits (plus a short grace for what is still in the
    pipes) or the deadline passes; keep the first ``limit`` bytes of each and drop the rest, so that a
    program printing forever costs no memory. Returns (stdout, stderr, truncated, timed_out)."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    buffers = {out_fd: bytearray(), err_fd: bytearray()}
    truncated = exited = False
    exit_fd = os.pidfd_open(proc.pid)  # readable once the launcher exits; does not reap it
    try:
        with selectors.DefaultSelector() as selector:
            for fd in (out_fd, err_fd, exit_fd):
                selector.register(fd, selectors.EVENT_READ)
            end = deadline
            while len(selector.get_map()) > 0:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in selector.select(remaining):
                    if key.fd == exit_fd:
                        # What it wrote is in the pipes by now; the grace bounds the wait for processes
                        # that outlive it holding the pipes (possible only unsandboxed).
                        exited = True
                        end = min(deadline, time.monotonic() + 0.5)
                        selector.unregister(exit_fd)
                        continue
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        selector.unregister(key.fd)
                        continue
                    buffer = buffers[key.fd]
                    room = max(limit - len(buffer), 0)
                    truncated |= len(chunk) > room
                    buffer += chunk[:room]
    finally:
        os.close(exit_fd)
    if not exited:
        _kill_group(proc.pid)
    proc.stdout.close()
    proc.stderr.close()
    return bytes(buffers[out_fd]), bytes(buffers[err_fd]), truncated, not exited


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)  # every writer is gone by now; never block on a surprise
    data = b""
    try:
        while chunk := os.read(fd, 1 << 16):
            data += chunk
    except BlockingIOError:
        pass
    return data


def _remove_tree(path: str) -> None:
    def make_writable_and_retry(func, failed_path, _exc):
        # A program may leave a directory without write or search permission (unsandboxed runs).
        try:
            os.chmod(os.path.dirname(failed_path), 0o700)
            os.chmod(failed_path, 0o700)
            func(failed_path)
        except OSError:
            pass

    # The same handler serves both keywords (it ignores its third argument); onerror is deprecated in 3.12.
    key = "onexc" if sys.version_info >= (3, 12) else "onerror"
    shutil.rmtree(path, **{key: make_writable_and_retry})
