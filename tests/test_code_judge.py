"""The judge of assert-style code tests (trd_jax/rewards/judge.py): hostile programs written to pass
tests they fail, against the verdict; what honest programs need (objects, generators, exceptions, every
plain type) still working; and the wire format against an independent round trip."""

import dataclasses
import math

import pytest

from trd_jax.rewards import judge, sandbox
from trd_jax.rewards.code import AssertTests, HumanEvalTests, grade_code, grade_code_batch
from trd_jax.rewards.sandbox import SandboxConfig

# The audit hook (a bypassable second layer) is off: a hostile program may use ctypes, kill and fork, so
# what holds is the judge's own design.
NO_HOOK = SandboxConfig(audit_hook=False, timeout_s=20.0, cpu_s=5.0)
ADD = HumanEvalTests(prompt='def add(a: int, b: int) -> int:\n    """The sum of a and b."""\n',
                     test="def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-7, 4) == -3\n",
                     entry_point="add")
WRONG = "def add(a, b):\n    return a * b\n"


@pytest.fixture(scope="module", autouse=True)
def namespaces():
    available, reason = sandbox.probe_isolation()
    if not available and "unshare(" in reason:
        pytest.skip(f"no namespaces on this machine: {reason}")
    assert available, reason


def grades(programs: dict[str, str], tests=ADD, config=NO_HOOK) -> dict:
    names = list(programs)
    return dict(zip(names, grade_code_batch([programs[n] for n in names], [tests] * len(names), config)))


# ------------------------------------------------------------------------------------------------
# Cheats: each is a wrong program that the marker-at-the-end grading passed


def test_cheats_that_fooled_the_pass_marker_fail():
    cheats = {
        # the pass marker of the old grading, printed after reading it from the program's own source
        "marker from own source": WRONG + "import re\nsrc = open(__file__).read()\n"
                                          "print(*re.findall(r'tests-passed-[0-9a-f]+', src))\n",
        # an excepthook that prints success instead of the failing assertion's traceback
        "excepthook": WRONG + "import sys\nsys.excepthook = lambda *a: print('all tests passed')\n",
        # a trace function that skips every line of the caller after the call (the asserts)
        "settrace": WRONG + "import sys\ndef skip(frame, event, arg):\n    frame.f_trace_lines = False\n"
                            "    return None\nsys.settrace(skip)\n",
        "eq always true": "class Anything:\n    def __eq__(self, other):\n        return True\n"
                          "    __hash__ = object.__hash__\ndef add(a, b):\n    return Anything()\n",
        "int subclass": "class Int(int):\n    def __eq__(self, other):\n        return True\n"
                        "    __hash__ = int.__hash__\ndef add(a, b):\n    return Int(0)\n",
        "exit 0 before the tests": WRONG + "import os\nos._exit(0)\n",
        "exit 0 in the call": "import os\ndef add(a, b):\n    os._exit(0)\n",
        "sys.exit in the call": "import sys\ndef add(a, b):\n    sys.exit(0)\n",
        "read the tests file": "import json\ntests = open('tests.json').read()\n" + WRONG,
    }
    result = grades(cheats)
    assert {name: g.reward for name, g in result.items()} == {name: 0.0 for name in cheats}
    assert "cannot be compared" in result["eq always true"].cases[0].detail
    assert "cannot be compared" in result["int subclass"].cases[0].detail
    assert "AssertionError" in result["settrace"].cases[0].detail
    assert "ended before the tests finished" in result["exit 0 in the call"].cases[0].detail
    assert "FileNotFoundError" in result["read the tests file"].cases[0].detail


def test_stop_iteration_from_a_call_cannot_cut_a_test_loop_short():
    tests = AssertTests(tests=("assert all(map(lambda x: square(x) == x * x, range(5)))",))
    cheat = "def square(x):\n    raise StopIteration\n"  # map() would end at once: all() of nothing holds
    result = grades({"cheat": cheat, "honest": "def square(x):\n    return x * x\n"}, tests)
    assert result["cheat"].reward == 0.0 and "StopIteration raised by call" in result["cheat"].cases[0].detail
    assert result["honest"].reward == 1.0


def test_truth_and_membership_are_the_judges():
    tests = AssertTests(tests=("assert is_prime(7)", "assert not is_prime(8)", "assert 3 in primes_below(5)"))
    always_true = ("class Yes:\n    def __bool__(self):\n        return True\n    def __contains__(self, x):\n"
                   "        return True\ndef is_prime(n):\n    return Yes()\ndef primes_below(n):\n    return Yes()\n")
    honest = ("def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))\n"
              "def primes_below(n):\n    return [p for p in range(n) if is_prime(p)]\n")
    result = grades({"always true": always_true, "honest": honest}, tests)
    assert result["always true"].reward == 0.0 and "cannot be compared" in result["always true"].cases[0].detail
    assert result["honest"].reward == 1.0, result["honest"].cases


def test_the_program_cannot_replace_builtins_or_the_setup_the_tests_use():
    tests = AssertTests(setup="import math", tests=("assert len(digits(120)) == 3",
                                                    "assert math.isclose(area(1.0), 3.14159, rel_tol=1e-4)"))
    cheat = ("def digits(n):\n    return [0]\nlen = lambda x: 3\nclass FakeMath:\n"
             "    def isclose(self, *args, **kwargs):\n        return True\nmath = FakeMath()\n"
             "def area(r):\n    return 0.0\n")
    honest = ("import math\ndef digits(n):\n    return [int(c) for c in str(n)]\n"
              "def area(r):\n    return math.pi * r * r\n")
    result = grades({"cheat": cheat, "honest": honest}, tests)
    assert result["cheat"].reward == 0.0 and result["honest"].reward == 1.0, result
    # A module the tests import after the program started, shadowed by a file the program wrote in the
    # shared working directory: the judge's import path is the standard library only.
    late_import = AssertTests(tests=("import statistics\nassert mean(4, 6) == statistics.mean([4, 6])",))
    shadow = "open('statistics.py', 'w').write('def mean(values):\\n    return 0\\n')\ndef mean(a, b):\n    return 0\n"
    assert grade_code(shadow, late_import, NO_HOOK).reward == 0.0
    assert grade_code("def mean(a, b):\n    return (a + b) / 2\n", late_import, NO_HOOK).reward == 1.0


def test_the_judge_is_out_of_the_programs_reach():
    """The program runs as the judge's uid, without the audit hook: the judge's memory, descriptors and
    environment under /proc and ptrace are still closed to it (non-dumpable), and killing it only fails."""
    probe = (
        "import ctypes, os\njudge = os.getppid()\nseen = []\n"
        "for entry in ('mem', 'environ', 'maps', 'fd'):\n"
        "    try:\n        path = f'/proc/{judge}/{entry}'\n"
        "        os.listdir(path) if entry == 'fd' else open(path, 'rb').read(1)\n"
        "        seen.append(entry + ' read')\n"
        "    except OSError as e:\n        seen.append(entry + ' denied')\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "seen.append('ptrace ' + ('denied' if libc.ptrace(16, judge, None, None) != 0 else 'attached'))\n"
        "print(seen)\n" + WRONG)
    result = sandbox.run_program(probe, NO_HOOK, tests=_spec(ADD))
    assert result.status == "failed"
    assert result.stdout.strip() == str(["mem denied", "environ denied", "maps denied", "fd denied",
                                         "ptrace denied"]), result.stdout
    killer = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + WRONG.replace("*", "+")
    killed = sandbox.run_program(killer, NO_HOOK, tests=_spec(ADD))
    assert killed.status == "killed" and not killed.ok


def test_garbage_on_the_pipe_is_a_failure_not_a_crash():
    # The program writes to the judge's pipe itself: a 4 GiB length header, then forged bytes.
    forger = ("import os, sys\nfd = int(sys.orig_argv[-2])  # the candidate's end of the reply pipe\n"
              "os.write(fd, b'\\xff\\xff\\xff\\xff')\n" + WRONG)
    result = sandbox.run_program(forger, NO_HOOK, tests=_spec(ADD))
    assert result.status == "failed" and "4294967295-byte message" in result.stderr, result.stderr[-500:]


def test_resource_failures_keep_their_status():
    config = dataclasses.replace(NO_HOOK, cpu_s=1.0, memory_mb=256)
    result = grades({"loop": "def add(a, b):\n    while True:\n        pass\n",
                     "memory": "def add(a, b):\n    return bytearray(1 << 30)\n"}, config=config)
    assert result["loop"].cases[0].status == "timeout" and result["memory"].cases[0].status == "memory"


def test_broken_tests_are_an_error_not_a_zero_reward():
    with pytest.raises(RuntimeError, match="could not set the tests up"):
        grade_code("def f():\n    return 1\n", AssertTests(tests=("assert f( == 1",)), NO_HOOK)


# ------------------------------------------------------------------------------------------------
# What honest programs need


def test_objects_generators_exceptions_and_plain_types_work():
    tests = AssertTests(setup="import math", tests=(
        "s = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2 and s.size() == 1 and s.items == [1]",
        "assert list(evens(7)) == [0, 2, 4, 6] and len(Stack()) == 0 and str(Stack()) == 'Stack[]'",
        "try:\n    root(-1)\nexcept ValueError as e:\n    assert 'negative' in str(e)\nelse:\n    raise AssertionError",
        "assert everything() == (None, True, -2**100, 0.1, math.inf, 1+2j, 'é\\ud800', b'\\x00\\xff', [1], {2}, "
        "frozenset({3}), {'k': (4,)})",
        "assert math.isnan(everything_nan())",
        "assert kinds(1, x=2.5) == ('int', 'float')",
    ))
    program = ("import math\nclass Stack:\n    def __init__(self):\n        self.items = []\n"
               "    def push(self, x):\n        self.items.append(x)\n"
               "    def pop(self):\n        return self.items.pop()\n"
               "    def size(self):\n        return len(self.items)\n"
               "    def __len__(self):\n        return len(self.items)\n"
               "    def __str__(self):\n        return 'Stack' + str(self.items)\n"
               "def evens(n):\n    yield from range(0, n, 2)\n"
               "def root(x):\n    if x < 0:\n        raise ValueError('negative input')\n    return math.sqrt(x)\n"
               "def everything():\n"
               "    return (None, True, -2**100, 0.1, math.inf, 1+2j, 'é\\ud800', b'\\x00\\xff', [1], {2},"
               " frozenset({3}), {'k': (4,)})\n"
               "def everything_nan():\n    return math.nan\n"
               "def kinds(a, x):\n    return (type(a).__name__, type(x).__name__)\n")
    grade = grade_code(program, tests, NO_HOOK)
    assert grade.reward == 1.0, grade.cases


def test_humaneval_helpers_come_from_the_trusted_prompt():
    """HumanEval/38-style: check() calls a helper of the prompt; a program that redefines the helper
    does not change what the test computes."""
    tests = HumanEvalTests(
        prompt="def encode(s):\n    return s[::-1]\n\ndef decode(s):\n    \"\"\"Undo encode.\"\"\"\n",
        test="def check(candidate):\n    for word in ('abc', 'hello'):\n"
             "        assert candidate(encode(word)) == word\n",
        entry_point="decode")
    honest = "    return s[::-1]\n"  # the body continues the prompt
    cheat = "def encode(s):\n    return s\ndef decode(s):\n    return s\n"  # consistent with its own encode
    result = grades({"honest": honest, "cheat": cheat}, tests)
    assert result["honest"].reward == 1.0 and result["cheat"].reward == 0.0, result


# ------------------------------------------------------------------------------------------------
# The wire format


class Int(int):
    pass


def test_encode_decode_round_trip_exact_types():
    values = [None, True, False, 0, -(2**200), 3.5, -0.0, math.inf, 1 - 2j, "", "a\ud800é", b"\x00",
              [1, [2]], (1,), {1, 2}, frozenset({"x"}), {(1, 2): [None]}]
    for value in values:
        back = judge.decode(judge.encode(value), resolve_ref=None)
        assert back == value and type(back) is type(value) and repr(back) == repr(value)
    assert math.isnan(judge.decode(judge.encode(math.nan), None))
    refs = []
    tree = judge.encode([Int(3), print], ref=lambda v: (refs.append(v), ["r", len(refs) - 1])[1])
    assert tree == ["l", [["r", 0], ["r", 1]]] and refs == [3, print] and type(refs[0]) is Int
    with pytest.raises(TypeError, match="cannot send a Int"):
        judge.encode(Int(3))


@pytest.mark.parametrize("tree", [[], "x", ["i", 3], ["i", "zz"], ["f", "1.5x"], ["d", [["N"]]], ["q"],
                                  ["l", "notalist"], ["r", "0"], ["M", "os"], ["N", 1]])
def test_decode_rejects_malformed_trees(tree):
    with pytest.raises(judge.ProtocolError):
        judge.decode(tree, resolve_ref=lambda i: i)


def test_program_exceptions_map_to_builtins_but_never_to_base_exceptions():
    assert type(judge._program_exception(["e", "ValueError", "bad"])) is ValueError
    for name in ("SystemExit", "KeyboardInterrupt", "MyError", "UnicodeDecodeError"):
        error = judge._program_exception(["e", name, "x"])
        assert type(error) is judge.ProgramError and name in str(error)


def _spec(tests: HumanEvalTests) -> dict:
    return dict(style="humaneval", prompt=tests.prompt, test=tests.test, entry_point=tests.entry_point)
