"""Test-only fault injection: SIGKILL this process at a named point, to prove crash safety.

Set ``RESTEM_KILL_AT=<point>`` (or ``<point>@<n>`` for the n-th time the point is reached, default 1) and
the process kills itself there with SIGKILL: no cleanup, no ``finally``, exactly like a pre-empted job or
a machine that dies. tests/test_kill_resume.py kills the loop inside every stage this way and checks that
rerunning the same command ends with the same run directory as an uninterrupted run. Unset (always, outside
tests), a point costs one environment lookup.

Points: ``sample.shard`` (a shard generated, not yet written), ``verify.shard`` (a verdict shard written),
``snapshot.write`` (the dataset written, its manifest and stage.json not yet), ``train.step`` (an optimizer
step of the M-step), ``eval.generate`` (greedy answers generated, sampled ones not yet), and with
``cluster=ray`` ``ray.replica`` (in a Ray replica: a job sampled, not yet returned to the driver).

``RESTEM_KILL_ONCE=<file>`` makes the kill happen once across processes: the first process to reach the
point creates the file and dies, later ones (a restarted Ray actor) run on.
"""

from __future__ import annotations

import collections
import os
import signal

KILL_ENV = "RESTEM_KILL_AT"
ONCE_ENV = "RESTEM_KILL_ONCE"
_hits: collections.Counter = collections.Counter()


def kill_point(name: str) -> None:
    """SIGKILLs the current process when ``$RESTEM_KILL_AT`` names this point (and its hit count)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] != int(nth or 1):
        return
    once = os.environ.get(ONCE_ENV)
    if once:
        try:
            with open(once, "x"):  # atomic: exactly one process creates it
                pass
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
