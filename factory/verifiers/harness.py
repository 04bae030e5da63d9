"""The test harness that runs inside a sandbox child (see ``sandbox.py``): untrusted program, then tests.

It is imported by the sandbox server before any untrusted code exists, and everything it needs after the
program ran (``os.write``, the proof descriptor, the nonce, a pristine copy of the builtins, the set of
trusted types) is captured in local variables first, so a program that patches modules, builtins,
``sys.exit`` or ``atexit`` cannot change what the harness reports.

The verdict is what the harness writes to the private proof descriptor *after the last test*: the run's
nonce followed by JSON per-test results. A program that exits early (``sys.exit``/``os._exit``, a signal,
a crash) leaves no proof, and printing "passed" on stdout proves nothing. Known limit: the program runs in
the same interpreter as the harness, so code written to walk the harness's stack frames could read the
nonce; the process isolation (namespaces, limits) still holds in that case.

Two modes:
* ``function``: ``program`` is executed as a module, then each test snippet runs in a fresh namespace with
  pristine builtins, the trusted ``prelude`` (e.g. HumanEval's ``check``), and the program's names that the
  tests use, wrapped so that every returned value is rebuilt from plain built-in types: an object whose
  ``__eq__`` always says True never reaches a comparison.
  ``call`` names a function (or ``Solution`` method, APPS) exposed to the tests as ``candidate``.
* ``stdio``: ``program`` runs as ``__main__`` with stdin from the job's input; ``SystemExit`` with code 0 or
  None counts as finishing. The caller compares stdout with the expected output.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import sys
import traceback
import types

# Scalars passed through (after conversion of subclasses to the exact base type) and containers rebuilt.
_SCALARS = {
    bool: None,
    int: int.__index__,
    float: float.__float__,
    complex: complex.__complex__,
    str: str.__str__,
    bytes: bytes.__bytes__,
    type(None): None,
}
_ITERATORS = (
    types.GeneratorType,
    map,
    filter,
    zip,
    enumerate,
    reversed,
    type(iter([])),
    type(iter(())),
    type(iter("")),
    type(iter(range(0))),
    type({}.keys()),
    type({}.values()),
    type({}.items()),
)
# C types whose equality, truth and hash are fixed (identity or plain data): returned as they are.
_OPAQUE = (range, re.Match, re.Pattern)
MAX_DEPTH = 50


class UntrustedValue(TypeError):
    """A returned value is not built from plain built-in types (it could fake an equality)."""


def sanitize(value, depth: int = 0):
    """Rebuild ``value`` from exact built-in types; raise :class:`UntrustedValue` for anything else.

    Subclasses of int/str/float/list/tuple/dict/set (Counter, namedtuple, ...) become their base type,
    iterators become generators that sanitize each item, and ``range`` objects stay (they hold ints).
    """
    if depth > MAX_DEPTH:
        raise UntrustedValue("returned value nested too deeply")
    kind = type(value)
    if kind in _SCALARS:
        convert = _SCALARS[kind]
        return value if convert is None else convert(value)
    if kind in _OPAQUE:
        return value
    for base, convert in _SCALARS.items():
        if convert is not None and isinstance(value, base):
            return convert(value)
    if isinstance(value, list):
        return [sanitize(v, depth + 1) for v in list.__iter__(value)]
    if isinstance(value, tuple):
        return tuple(sanitize(v, depth + 1) for v in tuple.__iter__(value))
    if isinstance(value, dict):
        return {sanitize(k, depth + 1): sanitize(v, depth + 1) for k, v in dict.items(value)}
    if isinstance(value, frozenset):
        return frozenset(sanitize(v, depth + 1) for v in frozenset.__iter__(value))
    if isinstance(value, set):
        return {sanitize(v, depth + 1) for v in set.__iter__(value)}
    if kind in _ITERATORS:
        return (sanitize(v, depth + 1) for v in value)
    raise UntrustedValue(f"returned a {kind.__qualname__!r} object; only built-in types are compared")


def _wrap(function):
    """Wrap a program's callable so that its return value is sanitized."""

    def guarded(*args, **kwargs):
        return sanitize(function(*args, **kwargs))

    guarded.__name__ = getattr(function, "__name__", "candidate")
    guarded.__wrapped_untrusted__ = function
    return guarded


def _expose(program_ns: dict, names: set[str], entry_point: str | None) -> dict:
    """The program's names that the tests use, wrapped (callables) or sanitized (data).

    Classes other than the entry point stay as they are, so tests can build inputs with them (MBPP's
    ``Pair``, ``Node``); the entry point is always wrapped, so a class posing as the tested function
    cannot return an object with a rigged ``__eq__``.
    """
    exposed = {}
    for name in names:
        if name not in program_ns or name.startswith("__"):
            continue
        value = program_ns[name]
        if isinstance(value, types.ModuleType) or (isinstance(value, type) and name != entry_point):
            exposed[name] = value
        elif callable(value):
            exposed[name] = _wrap(value)
        else:
            exposed[name] = sanitize(value)
    return exposed


def _names(code: str) -> set[str]:
    """Every name a piece of test code reads, including inside nested functions."""
    found: set[str] = set()
    pending = [compile(code, "<test>", "exec")]
    while pending:
        unit = pending.pop()
        found.update(unit.co_names)
        pending.extend(c for c in unit.co_consts if isinstance(c, types.CodeType))
    return found


def _short_error(error: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    return text[-300:] if text else type(error).__name__


def run(payload: dict, *, proof_fd: int, nonce: bytes) -> None:
    """Run one job and write the proof; never returns (``os._exit`` skips the program's exit hooks)."""
    write, exit_now, dumps, restore = os.write, os._exit, json.dumps, _restore_builtins
    pristine = dict(builtins.__dict__)
    flush_out = sys.stdout.flush
    mode = payload["mode"]
    report: dict = {"mode": mode, "tests": []}
    try:
        if mode == "function":
            _run_function(payload, report, pristine)
        elif mode == "stdio":
            _run_stdio(payload, report)
        else:
            report["error"] = f"unknown mode {mode!r}"
    except BaseException as error:  # noqa: BLE001 - the program may raise anything, even SystemExit
        report["error"] = _short_error(error)
    restore(pristine)
    try:
        flush_out()
    except BaseException:  # noqa: BLE001 - a closed or patched stdout must not stop the proof
        report["error"] = report.get("error") or "could not flush stdout"
    message = nonce + dumps(report, default=str).encode("utf-8", "replace")
    while message:
        message = message[write(proof_fd, message) :]
    exit_now(0)


def _run_function(payload: dict, report: dict, pristine: dict) -> None:
    program_ns: dict = {"__name__": "__main__", "__builtins__": builtins}
    tests = list(payload["tests"])
    prelude = payload.get("prelude") or ""
    wanted = set().union(*(_names(t) for t in tests), _names(prelude))
    try:
        compiled = compile(payload["program"], "<program>", "exec")
    except (SyntaxError, ValueError) as error:
        report["syntax_error"] = _short_error(error)
        report["tests"] = [{"passed": False, "error": "not run"} for _ in tests]
        return
    try:
        exec(compiled, program_ns)
        _restore_builtins(pristine)
        exposed = _expose(program_ns, wanted, payload.get("entry_point"))
        if payload.get("call"):
            exposed["candidate"] = _wrap(_resolve_call(program_ns, payload["call"]))
    except BaseException as error:  # noqa: BLE001 - SystemExit at import time is a failure too
        report["error"] = f"program failed to load: {_short_error(error)}"
        report["tests"] = [{"passed": False, "error": "not run"} for _ in tests]
        return
    for test in tests:
        test_ns = {"__name__": "__test__", "__builtins__": dict(pristine)}
        try:
            test_ns.update(exposed)
            if prelude:  # after the program's names: the prelude's own definitions (check) win
                exec(compile(prelude, "<prelude>", "exec"), test_ns)
            exec(compile(test, "<test>", "exec"), test_ns)
            report["tests"].append({"passed": True, "error": None})
        except BaseException as error:  # noqa: BLE001 - SystemExit in a test is a failed test
            report["tests"].append({"passed": False, "error": _short_error(error)})


def _restore_builtins(pristine: dict) -> None:
    """Undo a program's changes to ``builtins`` (``builtins.isinstance = ...``) before tests and report."""
    namespace = builtins.__dict__
    for name in [n for n in namespace if n not in pristine]:
        del namespace[name]
    namespace.update(pristine)


def _resolve_call(program_ns: dict, name: str):
    """APPS call-based problems: a top-level function, or a method of LeetCode's ``class Solution``."""
    solution = program_ns.get("Solution")
    if isinstance(solution, type) and hasattr(solution, name):
        return getattr(solution(), name)
    if name in program_ns and callable(program_ns[name]):
        return program_ns[name]
    raise NameError(f"the program defines no function {name!r}")


def _run_stdio(payload: dict, report: dict) -> None:
    program_ns: dict = {"__name__": "__main__", "__builtins__": builtins}
    try:
        compiled = compile(payload["program"], "<program>", "exec")
    except (SyntaxError, ValueError) as error:
        report["syntax_error"] = _short_error(error)
        return
    try:
        exec(compiled, program_ns)
        report["tests"].append({"passed": True, "error": None})
    except SystemExit as stop:
        ok = stop.code is None or stop.code == 0
        report["tests"].append({"passed": ok, "error": None if ok else f"exit code {stop.code!r}"})
    except BaseException as error:  # noqa: BLE001
        report["tests"].append({"passed": False, "error": _short_error(error)})


def preload() -> None:
    """Import what programs commonly use and warm the harness up, once in the server, so each forked
    child starts warm: a child that imports a module, or runs the harness's code for the first time
    (CPython 3.11 rewrites a function's bytecode as it specializes it, and fills lazy caches), pays for
    it in every job, both in the work itself and in the copy-on-write page faults its writes cause."""
    import bisect  # noqa: F401
    import collections  # noqa: F401
    import functools  # noqa: F401
    import heapq  # noqa: F401
    import itertools  # noqa: F401
    import math  # noqa: F401
    import re  # noqa: F401
    import string  # noqa: F401
    import typing  # noqa: F401

    _warm_up()


# Trusted jobs run through the harness's own code paths in the server (never a program from a caller):
# passing and failing tests, a prelude, sanitized containers, an exception message, stdin/stdout mode.
_WARM_UP_JOBS = (
    {
        "mode": "function",
        "program": "from typing import List\ndef f(x: List[int]) -> list:\n    return [x, (1.5,), {'a': None}, True]\n",
        "tests": [
            "assert f([1])[0] == [1]",
            "check(candidate)",
            "assert f(2) == 3, 'no'",
            "candidate(0)[1][0] / 0",
        ],
        "prelude": "def check(c):\n    assert c(3)[2] == {'a': None}\n",
        "entry_point": "f",
        "call": "f",
    },
    {"mode": "stdio", "program": "import sys\nprint(sys.stdin.read().upper())\nraise SystemExit(0)\n"},
)


def _warm_up(rounds: int = 40) -> None:
    import io

    pristine = dict(builtins.__dict__)
    stdin, stdout = sys.stdin, sys.stdout
    try:
        for _ in range(rounds):
            for payload in _WARM_UP_JOBS:
                sys.stdin, sys.stdout = io.StringIO("warm"), io.StringIO()
                report: dict = {"mode": payload["mode"], "tests": []}
                if payload["mode"] == "function":
                    _run_function(payload, report, pristine)
                else:
                    _run_stdio(payload, report)
                json.dumps(report, default=str)
    finally:
        sys.stdin, sys.stdout = stdin, stdout
        _restore_builtins(pristine)
