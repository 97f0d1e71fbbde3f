"""The judge of assert-style code tests (HumanEval, MBPP): the tests run in a process that the candidate
program does not control, so that no object, hook or exit of the program's can decide a verdict.

Standard library only: the sandbox (rewards/sandbox.py) runs this file's source with ``python -c``.

Inside the sandbox the launcher starts the judge (argv ``judge SPEC``), not the program. The judge
1. makes itself non-dumpable (a process of the same uid can then neither ptrace it nor open its memory or
   descriptors under /proc), reads the trusted tests from tests.json and deletes the file;
2. runs the trusted definitions in its own namespace: HumanEval's prompt and ``check``, MBPP's setup;
3. forks the candidate, a fresh interpreter (argv ``candidate AUDIT PROGRAM FD_IN FD_OUT``, with the
   sandbox's audit hook) that runs the program as ``__main__``, sends the manifest of its globals and then
   serves requests on two pipes;
4. binds the program's functions and classes in its namespace as `Remote` handles (never over a name the
   trusted code defined or over a builtin; HumanEval's entry point excepted), runs the tests, and exits 0
   only when every test ran to the end.

Values cross the pipes as length-prefixed JSON of a tagged tree of exact builtin types (None, bool, int,
float, complex, str, bytes, list, tuple, dict, set, frozenset): what the program returns is rebuilt in the
judge as plain data and compared by the judge's own ``==``. Anything else the program returns stays in
the program and comes back as a `Remote`, which refuses ``==``, ordering, hashing, truth and ``in``: an
``__eq__`` that always holds never runs. Limitations (documented in SANDBOX_GUARANTEES): arguments are
copies (a test that checks the program mutated its argument in place fails), and the judge passes the
program plain data and its own handles only (not callbacks or objects of classes the tests define).
"""

import builtins
import json
import os
import select
import signal
import struct
import sys

MAX_MESSAGE_BYTES = 64 << 20  # a larger message from the program is a failure, not an allocation
_HEADER = struct.Struct(">I")
# Stdlib modules the judge does not import when the program's globals name them (side effects on import).
_UNIMPORTABLE = frozenset({"antigravity", "this", "__hello__", "__phello__", "idlelib", "turtle", "tkinter"})


class ProtocolError(Exception):
    """The program sent something that is not a well-formed message."""


class ProgramError(Exception):
    """An exception raised in the program whose type is not a builtin exception."""


class CandidateGone(BaseException):
    """The program's process ended while the judge waited for it (a BaseException: tests' ``except
    Exception`` must not swallow it)."""

    def __init__(self, wait_status: int):
        super().__init__(wait_status)
        self.wait_status = wait_status


# ------------------------------------------------------------------------------------------------
# The wire format


def encode(value, ref=None):
    """`value` as a tagged tree of exact builtin types. Any other object becomes ``ref(value)``, or raises
    TypeError when ref is None."""
    kind = type(value)
    if value is None:
        return ["N"]
    if kind is bool:
        return ["b", value]
    if kind is int:
        return ["i", hex(value)]
    if kind is float:
        return ["f", value.hex()]
    if kind is complex:
        return ["c", value.real.hex(), value.imag.hex()]
    if kind is str:
        return ["s", value]
    if kind is bytes:
        return ["y", value.hex()]
    if kind in (list, tuple, set, frozenset):
        tag = {list: "l", tuple: "t", set: "S", frozenset: "F"}[kind]
        return [tag, [encode(item, ref) for item in value]]
    if kind is dict:
        return ["d", [[encode(k, ref), encode(v, ref)] for k, v in value.items()]]
    if ref is None:
        raise TypeError(f"cannot send a {kind.__name__} to the program: only plain data and its own objects")
    return ref(value)


def decode(tree, resolve_ref, resolve_module=None):
    """The value of a tagged tree; ``resolve_ref(id)`` gives the object of a ref, ``resolve_module(name)``
    a module's. Raises ProtocolError on anything malformed."""
    if type(tree) is not list or not tree or type(tree[0]) is not str:
        raise ProtocolError(f"not a tagged value: {str(tree)[:80]}")
    tag, args = tree[0], tree[1:]
    try:
        if tag == "N" and not args:
            return None
        if tag == "b" and type(args[0]) is bool:
            return args[0]
        if tag == "i" and type(args[0]) is str:
            return int(args[0], 16)
        if tag == "f" and type(args[0]) is str:
            return float.fromhex(args[0])
        if tag == "c" and type(args[0]) is str and type(args[1]) is str:
            return complex(float.fromhex(args[0]), float.fromhex(args[1]))
        if tag == "s" and type(args[0]) is str:
            return args[0]
        if tag == "y" and type(args[0]) is str:
            return bytes.fromhex(args[0])
        if tag in ("l", "t", "S", "F") and type(args[0]) is list:
            items = [decode(item, resolve_ref, resolve_module) for item in args[0]]
            return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
        if tag == "d" and type(args[0]) is list:
            pairs = []
            for pair in args[0]:
                if type(pair) is not list or len(pair) != 2:
                    raise ProtocolError("a dict entry is not a [key, value] pair")
                pairs.append(tuple(decode(item, resolve_ref, resolve_module) for item in pair))
            return dict(pairs)
        if tag == "r" and type(args[0]) is int:
            return resolve_ref(args[0])
        if tag == "M" and type(args[0]) is str and resolve_module is not None:
            return resolve_module(args[0])
    except (IndexError, ValueError, OverflowError) as e:
        raise ProtocolError(f"malformed {tag!r} value: {e}") from None
    raise ProtocolError(f"unknown or malformed tag {tag!r}")


def send(fd: int, message) -> None:
    data = json.dumps(message, separators=(",", ":")).encode("ascii")  # ascii: lone surrogates survive
    data = _HEADER.pack(len(data)) + data
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def receive(fd: int, alive=None):
    """The next message on `fd`; None at end of file. `alive()` is polled while waiting: it raises when the
    writer is gone for good (a process that exited while a child of its still holds the pipe)."""
    header = _read_exact(fd, _HEADER.size, alive)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"a {size}-byte message (the limit is {MAX_MESSAGE_BYTES})")
    data = _read_exact(fd, size, alive)
    if data is None:
        raise ProtocolError("the message was cut short")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"not JSON: {e}") from None


def _read_exact(fd: int, size: int, alive) -> bytes | None:
    chunks, missing = [], size
    while missing:
        if alive is not None:
            while not select.select([fd], [], [], 0.5)[0]:
                alive()
        chunk = os.read(fd, min(missing, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------------------------------------------
# Judge side


class Remote:
    """An object that lives in the program. Calls, attributes, iteration, len, indexing and str go to the
    program; comparison, hashing, truth and ``in`` are refused (the program's answer to them would be the
    verdict)."""

    __slots__ = ("_ref", "_channel")

    def __init__(self, ref: int, channel: "Channel"):
        object.__setattr__(self, "_ref", ref)
        object.__setattr__(self, "_channel", channel)

    def __call__(self, *args, **kwargs):
        return self._channel.request("call", self._ref, encode(list(args), self._channel.ref_of),
                                     encode(kwargs, self._channel.ref_of))

    def __getattr__(self, name: str):
        if name.startswith("__"):  # protocol probes (copy, pickle, ...) stay local
            raise AttributeError(name)
        return self._channel.request("getattr", self._ref, name)

    def __setattr__(self, name, value):
        raise TypeError("the judge does not set attributes of the program's objects")

    def __iter__(self):
        return self._channel.request("iter", self._ref)

    def __next__(self):
        return self._channel.request("next", self._ref)

    def __len__(self):
        return self._channel.request("len", self._ref)

    def __getitem__(self, key):
        return self._channel.request("getitem", self._ref, encode(key, self._channel.ref_of))

    def __str__(self):
        return self._channel.request("str", self._ref)

    def __repr__(self):
        return f"<program object #{self._ref}>"

    def _refuse(self, *_):
        raise TypeError("an object of the program cannot be compared, hashed or tested for truth by the "
                        "tests: only plain data (None, bool, numbers, str, bytes, list, tuple, dict, set) can")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __hash__ = __bool__ = __contains__ = _refuse


class Channel:
    """The judge's end of the pipes to the candidate process `pid`."""

    def __init__(self, to_program: int, from_program: int, pid: int):
        self._to, self._from, self.pid = to_program, from_program, pid

    def ref_of(self, value):
        if type(value) is Remote and object.__getattribute__(value, "_channel") is self:
            return ["r", object.__getattribute__(value, "_ref")]
        raise TypeError(f"cannot send a {type(value).__name__} to the program: only plain data and its own objects")

    def remote(self, ref: int) -> Remote:
        return Remote(ref, self)

    def _alive(self) -> None:
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid:
            raise CandidateGone(status)

    def _reply(self):
        reply = receive(self._from, self._alive)
        if reply is None:  # the program closed its end: it is exiting
            _, status = os.waitpid(self.pid, 0)
            raise CandidateGone(status)
        return reply

    def manifest(self) -> dict:
        """The program's globals after it ran (its first message)."""
        reply = self._reply()
        if type(reply) is list and reply[:1] == ["e"]:
            raise _program_exception(reply)
        if type(reply) is not list or len(reply) != 2 or reply[0] != "m" or type(reply[1]) is not dict:
            raise ProtocolError("the program's first message is not its manifest")
        names = {}
        for name, tree in reply[1].items():
            try:
                names[name] = decode(tree, self.remote, _stdlib_module)
            except ImportError:
                pass  # a module the judge does not import: the tests cannot rely on it
        return names

    def request(self, op: str, ref: int, *payload):
        try:
            send(self._to, [op, ref, *payload])
        except BrokenPipeError:  # the program closed its end (or died): its exit status says which
            _, status = os.waitpid(self.pid, 0)
            raise CandidateGone(status) from None
        reply = self._reply()
        if type(reply) is list and len(reply) == 2 and reply[0] == "v":
            return decode(reply[1], self.remote)
        if type(reply) is list and reply[:1] == ["e"]:
            error = _program_exception(reply)
            if isinstance(error, (StopIteration, StopAsyncIteration)) and op != "next":
                # Only next() may end an iteration: a call raising StopIteration inside the tests' map() or
                # filter() would silently cut the loop short (all(map(...)) of nothing holds).
                error = ProgramError(f"{type(error).__name__} raised by {op}: {error}")
            raise error
        raise ProtocolError("a reply that is neither a value nor an error")


def _program_exception(reply) -> Exception:
    """The program's exception, re-raised in the judge as the builtin exception of that name (so that tests
    expecting, say, a ValueError see one), else as ProgramError; never a BaseException such as SystemExit."""
    if len(reply) != 3 or type(reply[1]) is not str or type(reply[2]) is not str:
        return ProtocolError("a malformed error reply")
    kind = getattr(builtins, reply[1], None)
    message = reply[2][:2000]
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:  # noqa: BLE001 - an exception type whose constructor wants other arguments
            pass
    return ProgramError(f"{reply[1]}: {message}")


def _stdlib_module(name: str):
    import importlib

    if name.split(".")[0] not in sys.stdlib_module_names or name.split(".")[0] in _UNIMPORTABLE:
        raise ImportError(name)
    return importlib.import_module(name)


def _set_non_dumpable() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_dumpable = 4
    if libc.prctl(pr_set_dumpable, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")


def _trusted_definitions(tests: dict) -> tuple[dict, list]:
    """The judge's namespace after the trusted definitions, and the test code objects to run in it."""
    namespace = {"__name__": "__judge__", "__builtins__": builtins}
    style = tests.get("style")
    if style == "humaneval":
        for key in ("prompt", "test", "entry_point"):
            if type(tests.get(key)) is not str:
                raise ValueError(f"tests.json: humaneval needs a string {key!r}")
        exec(compile(tests["prompt"], "<tests:prompt>", "exec"), namespace)
        exec(compile(tests["test"], "<tests:test>", "exec"), namespace)
        checks = [compile(f"check({tests['entry_point']})", "<tests:check>", "exec")]
    elif style == "asserts":
        if type(tests.get("setup")) is not str or type(tests.get("tests")) is not list or not tests["tests"]:
            raise ValueError("tests.json: asserts needs a string 'setup' and a non-empty list 'tests'")
        exec(compile(tests["setup"], "<tests:setup>", "exec"), namespace)
        checks = [compile(source, f"<tests:assert {i}>", "exec") for i, source in enumerate(tests["tests"])]
    else:
        raise ValueError(f"tests.json: unknown style {style!r}")
    return namespace, checks


def _bind_program(namespace: dict, program: dict, trusted: set, entry_point: str | None) -> None:
    """The program's globals the tests may use: never over a trusted definition or a builtin (a program
    that defines ``len`` or replaces the setup's ``math`` must not answer the tests' own calls)."""
    for name, value in program.items():
        if name == entry_point or (name not in trusted and not hasattr(builtins, name) and not name.startswith("__")):
            namespace[name] = value


def _exit_like(wait_status: int, memory_exit_code: int) -> None:
    """Exit as the judge of a program that ended with this wait status before the tests finished: its
    signal (a timeout stays a timeout), the memory code, else 1."""
    try:
        sys.stderr.flush()
    finally:
        if os.WIFSIGNALED(wait_status):
            sig = os.WTERMSIG(wait_status)
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        os._exit(memory_exit_code if os.waitstatus_to_exitcode(wait_status) == memory_exit_code else 1)


def judge_main(spec: dict) -> None:
    """The judge process (see the module docstring). Exit codes: 0 the tests passed, 1 they failed,
    spec["memory_exit_code"] the program ran out of memory, the program's signal, spec["error_exit_code"]
    the judge could not be set up (broken tests: not the program's fault)."""
    import traceback

    memory_code, error_code = spec["memory_exit_code"], spec["error_exit_code"]
    try:
        _set_non_dumpable()
        with open(spec["tests"], encoding="utf-8") as f:
            tests = json.load(f)
        os.unlink(spec["tests"])
        namespace, checks = _trusted_definitions(tests)
        trusted = set(namespace)
        to_read, to_write = os.pipe()
        from_read, from_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(to_write)
                os.close(from_read)
                os.set_inheritable(to_read, True)
                os.set_inheritable(from_write, True)
                python = spec["python"]
                os.execve(python, [python, "-I", "-S", "-B", "-c", spec["candidate_source"], "candidate",
                                   "1" if spec["audit_hook"] else "0", spec["program"], str(to_read),
                                   str(from_write), str(memory_code)], dict(os.environ))
            finally:  # the judge then sees the program end before its manifest: a failure, never an error
                os.write(2, b"judge: cannot start the program's interpreter\n")
                os._exit(1)
        os.close(to_read)
        os.close(from_write)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        print("judge: the tests could not be set up", file=sys.stderr)
        os._exit(error_code)

    channel = Channel(to_write, from_read, pid)
    started = False
    try:
        _bind_program(namespace, channel.manifest(), trusted, tests.get("entry_point"))
        started = True
        for code in checks:
            exec(code, namespace)
    except CandidateGone as gone:
        print(f"judge: the program ended before the tests finished (wait status {gone.wait_status})", file=sys.stderr)
        _exit_like(gone.wait_status, memory_code)
    except BaseException as e:  # noqa: BLE001 - every way out but the end of the tests is a failure
        _kill(pid)
        if not started:
            print(f"judge: the program failed before the tests ran: {str(e)[:500]}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)
        message = str(e)[:500]
        print(f"judge: test failed: {type(e).__name__}{_where(traceback.extract_tb(e.__traceback__), tests)}"
              + (f" ({message})" if message else ""), file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    _kill(pid)
    os._exit(0)


def _where(frames, tests: dict) -> str:
    """' at <tests:NAME> line N: SOURCE LINE' of the innermost frame of the trusted test code."""
    frames = [frame for frame in frames if frame.filename.startswith("<tests:")]
    if not frames:
        return ""
    frame = frames[-1]
    name = frame.filename[len("<tests:"):-1]
    source = tests["tests"][int(name.split()[1])] if name.startswith("assert ") else tests.get(name, "")
    lines = source.splitlines() if isinstance(source, str) else []
    text = lines[frame.lineno - 1].strip() if 0 < (frame.lineno or 0) <= len(lines) else ""
    return f" at {frame.filename} line {frame.lineno}" + (f": {text[:200]}" if text else "")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------------
# Candidate side


def candidate_main(audit: bool, program_path: str, fd_in: int, fd_out: int, memory_exit_code: int) -> None:
    """Run the program as __main__, send the judge its manifest, then answer requests until the judge
    closes the pipe. Everything here runs under the program's control, so nothing here is trusted: the
    judge only ever believes plain data."""
    import traceback

    if audit:
        globals()["_install_audit_hook"]()  # defined by the sandbox's prelude, prepended to this source
    sys.argv = [program_path]
    namespace = {"__name__": "__main__", "__file__": program_path, "__builtins__": builtins}
    objects: list = []

    def ref(value):
        objects.append(value)
        return ["r", len(objects) - 1]

    def error(e: BaseException) -> list:
        return ["e", type(e).__name__, str(e)[:2000]]

    try:
        with open(program_path, encoding="utf-8") as f:
            exec(compile(f.read(), program_path, "exec"), namespace)
        manifest = {}
        for name, value in namespace.items():
            if name.startswith("__"):
                continue
            try:
                manifest[name] = ["M", value.__name__] if type(value) is type(sys) else encode(value, ref)
            except Exception:  # noqa: BLE001 - e.g. a cyclic global: the tests cannot use it
                pass
        message = ["m", manifest]
    except MemoryError:
        os.write(2, b"MemoryError\n")
        os._exit(memory_exit_code)
    except BaseException as e:  # noqa: BLE001 - SystemExit included: the program ended before the tests
        traceback.print_exc()
        message = error(e)
    send(fd_out, message)
    if message[0] == "e":
        os._exit(1)

    def resolve(ref_id: int):
        if not 0 <= ref_id < len(objects):
            raise ProtocolError(f"no object #{ref_id}")
        return objects[ref_id]

    handlers = {
        "call": lambda target, args, kwargs: target(*decode(args, resolve), **decode(kwargs, resolve)),
        "getattr": lambda target, name: getattr(target, name),
        "iter": iter, "next": next, "len": len, "str": str,
        "getitem": lambda target, key: target[decode(key, resolve)],
    }
    while True:
        request = receive(fd_in)
        if request is None:
            os._exit(0)
        try:
            result = handlers[request[0]](resolve(request[1]), *request[2:])
            reply = ["v", encode(result, ref)]
        except MemoryError:
            os.write(2, b"MemoryError\n")
            os._exit(memory_exit_code)
        except BaseException as e:  # noqa: BLE001 - the judge decides what an error means
            reply = error(e)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        send(fd_out, reply)


if __name__ == "__main__" and sys.argv[1:2] == ["judge"]:
    judge_main(json.loads(sys.argv[2]))
elif __name__ == "__main__" and sys.argv[1:2] == ["candidate"]:
    candidate_main(sys.argv[2] == "1", sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
