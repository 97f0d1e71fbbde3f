"""Grading of final answers to math problems (DeepScaleR / DAPO-Math training, AIME / HMMT / MATH-500 eval).

The answer is the last ``\\boxed{...}`` of the response; it is compared to the gold answer with math-verify
(sympy). Sympy can take unbounded time (or memory) on adversarial model output, and math-verify's own
timeout uses ``signal.alarm``, which only works on the main thread. So the sympy work runs in worker
*subprocesses*, where it is the main thread, under two limits:

* a soft limit (``setitimer`` in the worker) that interrupts Python-level sympy work at ``timeout_s``;
* a hard limit in the parent: a worker that has not answered by ``timeout_s + _KILL_GRACE_S`` (stuck in C
  code, signals blocked, ...) is killed and replaced.

Either way the answer counts as wrong and is reported as ``"timeout"``. Workers are started with
``subprocess`` (fork+exec of a fresh interpreter), never by forking this process: the trainer has JAX
threads, and multiprocessing's spawn/forkserver would re-import the trainer's ``__main__`` script.

Answers whose normalised strings are equal are graded 1.0 on the host without a worker.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from functools import cache, lru_cache
from multiprocessing.connection import Connection, wait
from typing import Self

import numpy as np

from trd_jax.rewards.answers import last_boxed

DEFAULT_TIMEOUT_S = 5.0
# How long after the soft limit a silent worker is killed: covers pipe latency and a soft timeout that
# fires late; small enough that a C-level hang costs little more than the timeout.
_KILL_GRACE_S = 0.5
# A worker imports sympy + math-verify (~0.5 s); far longer means the environment is broken.
_START_TIMEOUT_S = 60.0

# Per-answer outcomes. "exact" and "match" score 1.0, the others 0.0.
STATUSES = ("exact", "match", "mismatch", "no_answer", "parse_error", "gold_parse_error", "timeout", "error")
_CORRECT = frozenset(("exact", "match"))

# The comparison run in the worker: (predicted answer, gold answer) -> a status from STATUSES, or a bool
# (True = "match"). Must be importable by reference (a module-level function) since it is pickled.
VerifyFn = Callable[[str, str], "str | bool"]

# ----------------------------------------------------------------------------- answer normalisation

# Thousands separators written as spaces / LaTeX spacing ("1 000", "1\\,000"): math-verify reads them as
# a product of two numbers (1*0 = 0, a false match for gold 0), so they are removed before parsing.
_THOUSANDS_SEP = re.compile(r"(?<=\d)(?:\\[ ,;:!]|~|\s)+(?=\d{3}(?!\d))")
# Markup that never changes the value; dropped only for the exact-match fast path.
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_SPACING = re.compile(r"\\[ ,;:!]|~|\\displaystyle(?![A-Za-z])")
# Whitespace is insignificant except between a control word and a following letter ("\\pi r").
_SPACE = re.compile(r"(?<![A-Za-z])\s+|\s+(?![A-Za-z])")


def clean_answer(answer: str) -> str:
    """An answer made parseable: outer ``$`` and a trailing full stop removed (math-verify fails on
    ``2.``), spaced thousands separators joined."""
    s = answer.strip()
    if len(s) >= 2 and s[0] == s[-1] == "$" and not s.endswith("\\$"):  # "$...$", not "5\\$"
        s = s.strip("$").strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    return _THOUSANDS_SEP.sub("", s)


def _canonical(answer: str) -> str:
    """A presentation-free form for the exact-match fast path: equal forms are equal answers."""
    s = _LEFT_RIGHT.sub("", clean_answer(answer))
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = _SPACING.sub(" ", s)
    return _SPACE.sub("", s).strip()


def _gold_answer(gold: str) -> str:
    """Datasets sometimes store a whole solution: grade against its last boxed answer then."""
    boxed = last_boxed(gold)
    return boxed if boxed is not None else gold


# ----------------------------------------------------------------------------- work done in the worker


@cache
def _mv():
    """math-verify and its extraction config, imported lazily: the parent process never needs sympy."""
    import math_verify

    # The answer is wrapped in \boxed{} so the boxed pattern (priority 0) takes all of it; the
    # expression config is math-verify's fallback for plain numbers / "1/2"-style input.
    config = (math_verify.LatexExtractionConfig(boxed_match_priority=0), math_verify.ExprExtractionConfig())
    return math_verify, config


def _parse(answer: str) -> list:
    mv, config = _mv()
    # parsing_timeout=None: the worker's own timer bounds the whole answer (parse + verify).
    return mv.parse("\\boxed{" + answer + "}", extraction_config=config, parsing_timeout=None)


# Gold answers repeat across the samples of a prompt: parse each once per worker.
_parse_gold = lru_cache(maxsize=4096)(_parse)


def _is_math(parsed: list) -> bool:
    """Whether math-verify got a sympy object (not just its string fallback)."""
    return any(not isinstance(x, str) for x in parsed)


def math_verify_status(pred: str, gold: str) -> str:
    """The default comparison (runs in a worker): math-verify equivalence of two bare answers."""
    mv, _ = _mv()
    gold_parsed, pred_parsed = _parse_gold(gold), _parse(pred)
    # verify(gold, target): the order matters (e.g. "x=3" as gold accepts "3").
    if mv.verify(gold_parsed, pred_parsed, timeout_seconds=None):
        return "match"
    if not _is_math(gold_parsed):
        return "gold_parse_error"
    return "mismatch" if _is_math(pred_parsed) else "parse_error"


class _SoftTimeout(BaseException):
    """Raised by the worker's timer; a BaseException so math-verify's ``except Exception`` can't eat it."""


def _on_alarm(signum, frame) -> None:
    raise _SoftTimeout


def _grade_in_worker(fn: VerifyFn, pred: str, gold: str, timeout_s: float) -> str:
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            result = fn(pred, gold)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        # The outer handlers also catch a timer that fires between fn's return and its cancellation.
    except _SoftTimeout:
        return "timeout"
    except Exception:  # noqa: BLE001  a sympy bug on odd input: the answer is wrong, the worker lives on
        return "error"
    if isinstance(result, bool):
        return "match" if result else "mismatch"
    return result if result in STATUSES else "error"


def _worker_main(read_fd: int, write_fd: int) -> None:
    """Worker loop: an init message, then one (task id, pred, gold, timeout) at a time; None or EOF ends."""
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    init = inbox.recv()
    sys.path.extend(p for p in init["sys_path"] if p not in sys.path)  # so a custom verify_fn imports
    if init["memory_limit_mb"]:
        import resource

        limit = init["memory_limit_mb"] << 20  # a MemoryError (answer wrong) beats the host OOM killer
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    fn: VerifyFn = pickle.loads(init["verify_fn"]) if init["verify_fn"] else math_verify_status
    # Timeouts are reported through our statuses; math-verify would warn about them on stderr.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    math_verify_status("1", "1")  # import and warm sympy before the first timed answer
    signal.signal(signal.SIGALRM, _on_alarm)
    outbox.send(("ready", os.getpid()))
    while True:
        try:
            task = inbox.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        task_id, pred, gold, timeout_s = task
        outbox.send((task_id, _grade_in_worker(fn, pred, gold, timeout_s)))


# ----------------------------------------------------------------------------- the pool (parent side)

_WORKER_CMD = "import sys; from trd_jax.rewards.math_grading import _worker_main; " \
              "_worker_main(int(sys.argv[1]), int(sys.argv[2]))"
# The directory holding the trd_jax package, so a worker imports this very copy of it.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class _Worker:
    proc: subprocess.Popen
    inbox: Connection  # worker -> parent
    outbox: Connection  # parent -> worker
    started: float
    ready: bool = False
    task: int | None = None  # index of the answer being graded
    deadline: float = float("inf")  # hard limit of that answer


def _kill(worker: _Worker) -> None:
    worker.proc.kill()
    worker.proc.wait()
    worker.inbox.close()
    worker.outbox.close()


def _kill_all(workers: list[_Worker]) -> None:
    """Also the exit-time finaliser: it holds the pool's list, not the pool."""
    while workers:
        _kill(workers.pop())


@dataclasses.dataclass
class BatchGrades:
    scores: np.ndarray  # float32, 1.0 correct / 0.0 wrong
    statuses: list[str]  # one of STATUSES per answer

    def counts(self) -> dict[str, int]:
        """Answers per status, every status present (stable keys for logging)."""
        return {s: self.statuses.count(s) for s in STATUSES}


class MathGrader:
    """A lazily started, reusable pool of grading workers. Thread-safe: concurrent calls take turns.

    ``verify_fn`` replaces the comparison run in the workers (tests use it to inject slow grading).
    ``memory_limit_mb`` caps each worker's address space (None: no cap).
    """

    def __init__(self, workers: int = 2, timeout_s: float = DEFAULT_TIMEOUT_S,
                 verify_fn: VerifyFn | None = None, memory_limit_mb: int | None = 4096):
        self.workers = max(1, workers)
        self.timeout_s = timeout_s
        self._init = {"verify_fn": pickle.dumps(verify_fn) if verify_fn else None,
                      "memory_limit_mb": memory_limit_mb}
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        # Kills the workers at interpreter exit or when the grader is garbage collected.
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers. The grader stays usable: the next call starts new ones."""
        with self._lock:
            _kill_all(self._workers)

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def grade(self, response: str, gold: str, timeout_s: float | None = None) -> float:
        return float(self.grade_batch([response], [gold], timeout_s, workers=1).scores[0])

    def grade_batch(self, responses: Sequence[str], golds: Sequence[str], timeout_s: float | None = None,
                    workers: int | None = None) -> BatchGrades:
        """Grade ``responses[i]`` against ``golds[i]`` in parallel on up to ``workers`` processes."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        statuses = [""] * len(responses)
        tasks: deque[tuple[int, str, str]] = deque()
        for i, (response, gold) in enumerate(zip(responses, golds)):
            pred = clean_answer(last_boxed(response) or "")
            if not pred:  # no box, an empty one, or one holding only "$" / "."
                statuses[i] = "no_answer"
                continue
            gold = clean_answer(_gold_answer(gold))
            if _canonical(pred) == _canonical(gold):
                statuses[i] = "exact"
            else:
                tasks.append((i, pred, gold))
        if tasks:
            with self._lock:
                self._run(tasks, statuses, timeout_s, min(workers or self.workers, len(tasks)))
        scores = np.array([s in _CORRECT for s in statuses], dtype=np.float32)
        return BatchGrades(scores, statuses)

    # -- internals: called with self._lock held

    def _spawn(self) -> _Worker:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.Popen([sys.executable, "-c", _WORKER_CMD, str(to_child_r), str(from_child_w)],
                                    pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, env=env)
        except BaseException:
            for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
                os.close(fd)
            raise
        os.close(to_child_r)
        os.close(from_child_w)
        worker = _Worker(proc, Connection(from_child_r, writable=False), Connection(to_child_w, readable=False),
                         started=time.monotonic())
        worker.outbox.send(dict(self._init, sys_path=[p for p in sys.path if isinstance(p, str)]))
        return worker

    def _replace(self, k: int) -> None:
        _kill(self._workers[k])
        self._workers[k] = self._spawn()  # starts in the background; used once it says "ready"

    def _run(self, tasks: deque[tuple[int, str, str]], statuses: list[str], timeout_s: float,
             n_workers: int) -> None:
        while len(self._workers) < n_workers:
            self._workers.append(self._spawn())
        pool = range(n_workers)
        while True:
            now = time.monotonic()
            for k in pool:  # hand out work
                w = self._workers[k]
                if w.ready and w.task is None and tasks:
                    i, pred, gold = tasks.popleft()
                    w.outbox.send((i, pred, gold, timeout_s))
                    w.task, w.deadline = i, now + timeout_s + _KILL_GRACE_S
            busy = [k for k in pool if not self._workers[k].ready or self._workers[k].task is not None]
            if not tasks and all(self._workers[k].task is None for k in pool):
                return
            deadline = min(w.deadline if w.ready else w.started + _START_TIMEOUT_S
                           for w in (self._workers[k] for k in busy))
            wait([self._workers[k].inbox for k in busy], timeout=max(0.0, deadline - now))
            for k in busy:
                self._poll(k, statuses)

    def _poll(self, k: int, statuses: list[str]) -> None:
        """Take worker k's messages, or time it out / replace it when it is overdue or dead."""
        w = self._workers[k]
        try:
            while w.inbox.poll():
                msg = w.inbox.recv()
                if msg[0] == "ready":
                    w.ready = True
                elif msg[0] == w.task:
                    statuses[w.task], w.task, w.deadline = msg[1], None, float("inf")
        except (EOFError, OSError):  # the worker died (e.g. killed by the OS)
            if not w.ready:
                _kill(w)
                self._workers.pop(k)
                raise RuntimeError("a math grading worker died while starting; see its stderr above") from None
            if w.task is not None:
                statuses[w.task] = "error"
            self._replace(k)
            return
        now = time.monotonic()
        if not w.ready and now > w.started + _START_TIMEOUT_S:
            _kill(w)
            self._workers.pop(k)
            raise RuntimeError(f"a math grading worker did not start within {_START_TIMEOUT_S:.0f} s")
        if w.task is not None and now > w.deadline:  # stuck where the soft timer can't reach
            statuses[w.task] = "timeout"
            self._replace(k)


# ----------------------------------------------------------------------------- module-level API

_default: MathGrader | None = None
_default_lock = threading.Lock()


def default_grader() -> MathGrader:
    """The process-wide grader behind grade_math / grade_math_batch (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathGrader(workers=max(1, min(8, (os.cpu_count() or 2) // 2)))
        return _default


def close_default_grader() -> None:
    """Stop the default grader's workers (they are also stopped at interpreter exit)."""
    with _default_lock:
        if _default is not None:
            _default.close()


def _add_counts(stats: dict[str, int] | None, grades: BatchGrades) -> None:
    if stats is not None:
        for status, n in grades.counts().items():
            stats[status] = stats.get(status, 0) + n


def grade_math(response: str, gold: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
               stats: dict[str, int] | None = None) -> float:
    """1.0 if the last ``\\boxed{}`` of ``response`` equals ``gold`` mathematically, else 0.0 (also on no
    boxed answer, unparseable answer or timeout). Counts per status are added to ``stats`` if given."""
    grades = default_grader().grade_batch([response], [gold], timeout_s, workers=1)
    _add_counts(stats, grades)
    return float(grades.scores[0])


def grade_math_batch(responses: Sequence[str], golds: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S,
                     workers: int | None = None, stats: dict[str, int] | None = None) -> np.ndarray:
    """grade_math over a batch, in parallel on ``workers`` processes (default: the default grader's size).
    Returns float32 scores; counts per status (e.g. "timeout", "parse_error") are added to ``stats``."""
    grader = default_grader()
    grades = grader.grade_batch(responses, golds, timeout_s, workers=workers or grader.workers)
    _add_counts(stats, grades)
    return grades.scores
