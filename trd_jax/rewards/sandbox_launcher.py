"""The sandbox's launcher (see sandbox.py for the layers and SANDBOX_GUARANTEES): run by the parent as
``python -I -S -B sandbox_launcher.py --launch SPEC``, a fresh single-threaded interpreter that enters the
namespaces, builds the filesystem, sets the limits and execs the program (or, in judge mode, the judge of
judge.py). It also holds the program's prelude and the names and exit codes both sides share. Standard
library only: it runs as a script, outside the package.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from collections.abc import Sequence

# Exit code of the prelude when the program dies of MemoryError (Python would exit 1 like any error).
MEMORY_EXIT_CODE = 86
# Exit code of the judge (tests given) when it cannot set the tests up: the tests are broken, not the program.
JUDGE_ERROR_EXIT_CODE = 87
PROGRAM_NAME = "main.py"
TESTS_NAME = "tests.json"  # the judge's trusted tests (judge mode): read and deleted before the program starts
_DEVICES = ("null", "zero", "full", "random", "urandom")


# ------------------------------------------------------------------------------------------------
# The program's prelude: run by the sandboxed interpreter (``-c``) before the program. argv:
# [-c, "1" to install the audit hook | "0", program path]. Its head (the audit hook and exit()) also
# starts the judge's candidate process (rewards/judge.py, whose source follows it).

PRELUDE_HEAD = r'''
import os, sys

def _install_audit_hook():
    root = os.path.realpath(os.getcwd())
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    denied = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
              "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "socket.connect", "socket.bind",
              "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "ctypes.dlopen", "ctypes.dlsym",
              "ctypes.cdata", "sys.remote_exec"}
    # Events that modify a path: the index(es) of the path argument(s).
    path_events = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
                   "os.symlink": (1,), "os.link": (1,), "os.chmod": (0,), "os.chown": (0,),
                   "os.truncate": (0,), "os.utime": (0,), "shutil.rmtree": (0,), "os.mknod": (0,)}

    def inside(path):
        if isinstance(path, int):  # an already open descriptor
            return True
        real = os.path.realpath(os.path.join(root, os.fsdecode(path)))
        return real == root or real.startswith(root + os.sep) or real == "/dev/null"

    def hook(event, args):
        if event in denied:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args[2] & write_flags and not inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} is not allowed")
        for i in path_events.get(event, ()):
            if args[i] is not None and not inside(args[i]):
                raise PermissionError(f"sandbox: {event} on {args[i]!r} is not allowed")

    sys.addaudithook(hook)

def _exit(code=None):
    raise SystemExit(code)

import builtins
builtins.exit = builtins.quit = _exit  # normally set by the site module, which -S skips
'''

_PRELUDE = PRELUDE_HEAD + r'''
if sys.argv[1] == "1":
    _install_audit_hook()
_path = sys.argv[2]
sys.argv = [_path]
with open(_path, encoding="utf-8") as _f:
    _code = compile(_f.read(), _path, "exec")
try:
    exec(_code, {"__name__": "__main__", "__file__": _path, "__builtins__": __builtins__})
except MemoryError:
    os.write(2, b"MemoryError\n")
    os._exit(MEMORY_EXIT_CODE)
'''.replace("MEMORY_EXIT_CODE", str(MEMORY_EXIT_CODE))


# ------------------------------------------------------------------------------------------------
# Launcher: ``python -I -S -B sandbox_launcher.py --launch SPEC``, a fresh single-threaded interpreter (the
# parent's session leader). Isolated, it enters the namespaces and forks an init (PID 1 of the new PID
# namespace), which builds the filesystem, drops privileges, sets the limits, forks the program, reaps
# every process and reports the program's wait status; when the init exits the kernel kills whatever is
# left in the namespace. (The program is not PID 1 itself because PID 1 ignores signals it has no
# handler for, SIGXCPU and its own kill() included.) Unsandboxed, the launcher's child is the program.
# The launcher exits the way the program did, so the parent sees the program's status. Setup errors go
# to the status pipe; a good exec closes it unwritten.

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = (
    0x00020000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _AT_RECURSIVE, _AT_FDCWD = 0x1, 0x2, 0x8000, -100
_SYS_MOUNT_SETATTR = 442  # the same number on x86_64 and aarch64 (the unified syscall table)
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS = 1, 4, 38


class _Libc:
    """The few libc calls Python 3.11's os module lacks (unshare, mount, mount_setattr, prctl)."""

    def __init__(self):
        import ctypes  # launcher only

        self._ctypes = ctypes
        self._libc = ctypes.CDLL(None, use_errno=True)

    def _check(self, result: int, what: str) -> None:
        if result < 0:
            err = self._ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def unshare(self, flags: int) -> None:
        self._check(self._libc.unshare(flags), f"unshare({flags:#x})")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        def enc(text: str | None) -> bytes | None:
            return None if text is None else text.encode()

        self._check(self._libc.mount(enc(source), enc(target), enc(fstype), self._ctypes.c_ulong(flags), enc(data)),
                    f"mount {fstype or source} on {target}")

    def mount_setattr(self, path: str, set_attr: int, clear_attr: int, recursive: bool) -> None:
        c = self._ctypes
        attr = (c.c_uint64 * 4)(set_attr, clear_attr, 0, 0)  # struct mount_attr
        self._check(self._libc.syscall(c.c_long(_SYS_MOUNT_SETATTR), c.c_long(_AT_FDCWD), path.encode(),
                                       c.c_long(_AT_RECURSIVE if recursive else 0), c.byref(attr),
                                       c.c_size_t(c.sizeof(attr))), f"mount_setattr {path}")

    def prctl(self, option: int, value: int) -> None:
        c = self._ctypes
        self._check(self._libc.prctl(option, c.c_ulong(value), c.c_ulong(0), c.c_ulong(0), c.c_ulong(0)),
                    f"prctl({option})")


def _launch(spec: dict) -> None:
    status_fd = spec["status_fd"]
    isolate = spec["isolate"]
    try:
        if spec["cgroup_procs"]:  # first: every process of the sandbox descends from this one
            with open(spec["cgroup_procs"], "w") as f:
                f.write(str(os.getpid()))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # it may re-raise the program's fatal signal
        libc = _Libc()
        uid = spec["uid"] if os.geteuid() == 0 else None  # the program's uid when we are root
        if isolate and uid is not None:
            # Root builds every namespace but the user one (so its mounts belong to the initial user
            # namespace: the unprivileged program cannot undo them); the init drops to `uid`.
            libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWPID)
        elif isolate:
            # Unprivileged: a user namespace gives the capabilities to build the others. Our uid maps to
            # itself (not to 0), so the exec'd program has no capability left.
            real_uid, real_gid = os.geteuid(), os.getegid()
            libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWPID)
            _write_id_maps(real_uid, real_gid)
        elif uid is not None and not _can_run_as(uid, spec):
            uid = None  # unsandboxed root whose interpreter the uid cannot reach: stays root (documented)
        report_read, report_write = os.pipe()  # the init's report of the program's wait status
        pid = os.fork()
    except BaseException as e:  # noqa: BLE001 - everything goes to the parent
        _report_and_exit(status_fd, f"sandbox launcher: {e!r}")
    if pid == 0:
        try:
            os.close(report_read)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # the launcher killed (timeout) -> all dies
            if isolate:
                _run_init(spec, libc, uid, report_write)
            else:
                _drop_privileges(uid)
                _set_limits(spec, charged=_count_tasks(os.getuid(), os.getpid()))
                _exec_program(spec, libc)
        except BaseException as e:  # noqa: BLE001
            _report_and_exit(status_fd, f"sandbox setup: {e!r}")
    os.close(status_fd)
    os.close(report_write)
    _, wait_status = os.waitpid(pid, 0)
    with os.fdopen(report_read, "rb") as f:
        report = f.read()
    _exit_like(int(report) if report else wait_status)


def _exit_like(wait_status: int) -> None:
    """Exit the way a process with this wait status did (its signal, or its exit code)."""
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal whose default is not to terminate
    os._exit(os.waitstatus_to_exitcode(wait_status))


def _report_and_exit(status_fd: int, message: str) -> None:
    try:
        os.write(status_fd, message.encode("utf-8", "replace") or b"?")
    finally:
        os._exit(127)


def _write_id_maps(uid: int, gid: int) -> None:
    # An unprivileged process may map only its own ids, and only after denying setgroups.
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _can_run_as(uid: int, spec: dict) -> bool:
    """Whether `uid` can start the interpreter (unsandboxed root only: with namespaces the mount setup
    shows the interpreter to it wherever it is installed)."""
    os.setegid(uid)
    os.seteuid(uid)
    try:
        return os.access(spec["python"], os.X_OK, effective_ids=True) and all(
            os.access(d, os.R_OK | os.X_OK, effective_ids=True) for d in spec["exposed"])
    finally:
        os.seteuid(0)
        os.setegid(0)


def _drop_privileges(uid: int | None) -> None:
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)


def _run_init(spec: dict, libc: _Libc, uid: int | None, report_fd: int) -> None:
    """PID 1 of the sandbox's PID namespace: build it, run the program, report its wait status."""
    # RLIMIT_NPROC counts a uid's processes per user namespace. Unprivileged, the launcher made one and
    # counts in it with this init (2). As root, count what `uid` already runs on the host, in case no
    # user namespace of our own can be made below (the count is racy but bounded).
    charged = 2 if uid is None else _count_tasks(uid, os.getpid())
    _build_filesystem(spec, libc, *((os.geteuid(), os.getegid()) if uid is None else (uid, uid)))
    _close_sysv_ipc()
    if uid is not None:
        _drop_privileges(uid)
        # A user namespace of our own, so that this sandbox's process count starts at zero whatever
        # other sandboxes, all running as `uid`, do; this init counts 1 in it.
        try:
            libc.prctl(_PR_SET_DUMPABLE, 1)  # the uid change left /proc/self (uid_map) to root
            libc.unshare(_CLONE_NEWUSER)
            _write_id_maps(uid, uid)
            charged = 1
        except OSError:
            pass  # keep the host-wide count
    _set_limits(spec, charged)
    program = os.fork()
    if program == 0:
        os.close(report_fd)
        _exec_program(spec, libc)
    os.close(spec["status_fd"])
    while True:  # reap every process (orphans come to PID 1) until the program itself exits
        pid, wait_status = os.wait()
        if pid == program:
            break
    os.write(report_fd, str(wait_status).encode())
    os._exit(0)


# The sandbox's own IPC namespace: no SysV shared memory segment, no message queue (their memory escapes
# RLIMIT_AS: it belongs to no process). /proc/sys/kernel shows the namespace of the writer.
_SYSV_LIMITS = {"shmmax": "0", "shmall": "0", "shmmni": "0", "msgmni": "0"}


def _close_sysv_ipc() -> None:
    for name, value in _SYSV_LIMITS.items():
        try:
            with open(f"/proc/sys/kernel/{name}", "w") as f:
                f.write(value)
        except OSError:  # a kernel that does not let this namespace's owner set it: documented below
            pass


def _set_limits(spec: dict, charged: int) -> None:
    """The program's resource limits (`charged`: processes already counted against RLIMIT_NPROC that
    are not the program's)."""
    nproc = spec["max_processes"] + charged
    cpu, mib = spec["cpu_s"], 1 << 20
    for limit, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU first, SIGKILL a second later
                         (resource.RLIMIT_AS, (spec["memory_mb"] * mib,) * 2),
                         (resource.RLIMIT_FSIZE, (spec["file_size_mb"] * mib,) * 2),
                         (resource.RLIMIT_NOFILE, (spec["max_open_files"],) * 2),
                         (resource.RLIMIT_CORE, (0, 0)),
                         (resource.RLIMIT_MSGQUEUE, (0, 0)),  # POSIX message queues hold kernel memory
                         (resource.RLIMIT_NPROC, (nproc, nproc))):
        resource.setrlimit(limit, value)


def _exec_program(spec: dict, libc: _Libc) -> None:
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries do not elevate
    os.set_inheritable(spec["status_fd"], False)  # closed by a good exec: the parent reads EOF
    python = spec["python"]
    if spec["judge"]:  # the judge runs first, without the audit hook; it starts the program itself
        judge_spec = dict(python=python, audit_hook=spec["audit_hook"], program=PROGRAM_NAME, tests=TESTS_NAME,
                          candidate_source=spec["judge"]["candidate_source"], memory_exit_code=MEMORY_EXIT_CODE,
                          error_exit_code=JUDGE_ERROR_EXIT_CODE)
        argv = [python, "-I", "-S", "-B", "-c", spec["judge"]["source"], "judge", json.dumps(judge_spec)]
    else:
        argv = [python, "-I", "-S", "-B", "-c", _PRELUDE, "1" if spec["audit_hook"] else "0", PROGRAM_NAME]
    try:
        os.execve(python, argv, dict(os.environ))
    except OSError as e:
        # Typically a directory above the interpreter that the uid cannot enter (and that hidden_paths
        # does not cover: the sandbox re-shows the interpreter only inside the hidden paths).
        raise OSError(e.errno, f"cannot execute {python} as uid {os.getuid()}: {e.strerror}") from None


def _count_tasks(uid: int, exclude: int) -> int:
    """Processes and threads owned by `uid` (what RLIMIT_NPROC counts), but process `exclude`."""
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != exclude:
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{name}/task"))
            except OSError:
                pass  # exited meanwhile
    return count


def _build_filesystem(spec: dict, libc: _Libc, uid: int, gid: int) -> None:
    """In the new mount namespace: everything read-only, the hidden paths and /dev emptied, the
    interpreter shown, a private tmpfs as the working directory, /proc of our PID namespace."""
    workdir, hidden = spec["workdir"], [p for p in spec["hidden"] if os.path.isdir(p) and not os.path.islink(p)]
    libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount propagates to the host
    files = {}  # the cwd is the host's working directory, still visible
    for name in (PROGRAM_NAME, TESTS_NAME):
        if os.path.exists(name):
            with open(name, "rb") as f:
                files[name] = f.read()
    # Descriptors of what gets covered below, to bind it back (binding needs a mount of this namespace,
    # so they are opened here, not before the unshare).
    exposed = {d: os.open(d, os.O_PATH) for d in spec["exposed"] if _is_under(d, hidden + ["/dev"])}
    devices = {name: os.open(f"/dev/{name}", os.O_PATH) for name in _DEVICES}
    # /proc of this PID namespace: the program sees its own processes only (no parent environ).
    libc.mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    for path in hidden:
        libc.mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
    libc.mount("tmpfs", "/dev", "tmpfs", _MS_NOSUID | _MS_NOEXEC, "size=64k,mode=0755")
    for name, fd in devices.items():
        os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
        libc.mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, _MS_BIND)
        os.close(fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")
    os.mkdir("/dev/shm")
    for path, fd in exposed.items():
        os.makedirs(path, exist_ok=True)  # inside one of our tmpfs
        libc.mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
        os.close(fd)
    os.makedirs(workdir, exist_ok=True)
    libc.mount("tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV,
               f"size={spec['disk_mb']}m,nr_inodes={spec['max_files']},mode=0700,uid={uid},gid={gid}")
    libc.mount_setattr("/", _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, recursive=True)
    libc.mount_setattr(workdir, 0, _MOUNT_ATTR_RDONLY, recursive=False)
    # /proc stays writable: a process writes its own uid_map there (the program cannot write more than
    # any unprivileged process can, in its own PID namespace).
    libc.mount_setattr("/proc", 0, _MOUNT_ATTR_RDONLY, recursive=False)
    os.chdir(workdir)
    for name, content in files.items():
        fd = os.open(name, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644 if name == PROGRAM_NAME else 0o600)
        os.write(fd, content)
        os.close(fd)
        os.chown(name, uid, gid)


def _is_under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


if __name__ == "__main__" and sys.argv[1:2] == ["--launch"]:
    _launch(json.loads(sys.argv[2]))
