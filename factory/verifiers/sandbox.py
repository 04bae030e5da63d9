"""Run untrusted Python programs in isolated, resource-limited child processes: the caller's side.

Layout: the calling process starts one small **server** (``python -I -m factory.verifiers.sandbox_server``,
single-threaded, scrubbed environment, the harness and common stdlib modules imported once) and sends it
jobs over a pipe. For every job the server forks a fresh child, so a job costs a ``fork`` instead of a new
interpreter (what makes ``multiprocessing``-based executors slow), and runs up to ``workers`` of them at
once. Each child is born PID 1 of its own PID namespace, starts a new session (one process group the
server can ``killpg``), enters the namespaces the kernel grants (``isolation.py``: no network, read-only
nodev mounts with a tmpfs work directory and a read-only ``/proc`` of its own), sets resource limits,
drops every capability, clears the environment, gets stdin from the job's input and stdout/stderr
on capped pipes, and runs ``harness.run``.

The server (``sandbox_server.py``) enforces the wall-clock timeout by killing the process group, kills a
job whose output passes ``Limits.max_output_bytes`` (it keeps the first ``Limits.capture_bytes`` of each
stream), and accepts the harness's report only when it carries the job's random nonce on the private proof
pipe. Which isolation the kernel granted is probed once per server and logged once per process when
something is missing (:meth:`Sandbox.isolation`). Design notes: docs/code_verifier.md.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field

from factory.verifiers.isolation import FEATURES
from factory.verifiers.sandbox_server import HEADER

log = logging.getLogger(__name__)

_warned: set[str] = set()


@dataclass(frozen=True)
class Limits:
    """Resource limits of one job.

    Attributes:
        timeout: Wall-clock seconds before the job's process group is killed.
        memory_mb: Address-space limit (``RLIMIT_AS``).
        max_processes: Processes the job may have (``RLIMIT_NPROC``; counted per user namespace).
        max_file_mb: Largest file the job may write (``RLIMIT_FSIZE``).
        capture_bytes: Bytes of stdout and of stderr kept in the result.
        max_output_bytes: stdout + stderr bytes after which the job is killed (status ``output_limit``).
    """

    timeout: float = 5.0
    memory_mb: int = 1024
    max_processes: int = 32
    max_file_mb: int = 16
    capture_bytes: int = 65536
    max_output_bytes: int = 8 * 1024 * 1024


@dataclass
class JobResult:
    """What happened to one job.

    ``status`` is ``finished`` (the harness proved it ran to the end; see ``report``), ``no_proof`` (the
    process ended without a valid proof: it exited early, crashed or was killed by a limit), ``timeout``,
    ``output_limit`` or ``error`` (the sandbox itself failed).
    """

    status: str
    report: dict | None = None
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    seconds: float = 0.0
    detail: str = ""
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- client


class Sandbox:
    """Client of one sandbox server; use as a context manager (``with Sandbox() as box: box.run(jobs)``).

    Args:
        workers: Jobs that run at the same time.
        limits: Default limits of every job.
    """

    def __init__(self, *, workers: int = 2, limits: Limits | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers, self.limits = workers, limits or Limits()
        self._proc: subprocess.Popen | None = None
        self.support: dict = {}
        self.restarts = 0

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _start(self) -> None:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "factory.verifiers.sandbox_server", str(self.workers)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=tempfile.gettempdir(),
            close_fds=True,
            start_new_session=True,  # a job cannot signal the caller's process group through the server's
        )
        hello = recv(self._proc.stdout)
        if not hello or hello[0] != "hello":
            raise RuntimeError("the sandbox server did not start (see stderr)")
        self.support = hello[1]
        _warn_once(self.support)

    def isolation(self) -> dict:
        """What the kernel granted (``isolation.FEATURES``: user, network, pid, readonly_mounts, proc, ipc,
        seccomp; each True or False); starts the server if needed."""
        if self._proc is None:
            self._start()
        return self.support

    def close(self) -> None:
        """Stop the server (running jobs are killed)."""
        if self._proc is None:
            return
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        self._proc = None

    def run(self, payloads: list[dict], *, limits: Limits | None = None) -> list[JobResult]:
        """Run harness payloads (see ``harness.py``); results in input order.

        A job in flight when the server dies (only possible without a PID namespace) is run again once;
        a second loss gives status ``error``.
        """
        limits = limits or self.limits
        results: list[JobResult | None] = [None] * len(payloads)
        attempts = [0] * len(payloads)
        todo = list(range(len(payloads)))
        while todo:
            if self._proc is None:
                self._start()
            proc = self._proc
            jobs = [(i, payloads[i], asdict(limits)) for i in todo]
            writer = threading.Thread(target=_send_all, args=(proc.stdin, jobs), daemon=True)
            writer.start()
            pending = set(todo)
            while pending:
                message = recv(proc.stdout)
                if message is None:  # the server died: restart it and retry what it held
                    break
                index, outcome = message
                results[index] = JobResult(**outcome)
                pending.discard(index)
            writer.join()
            if pending:
                self.close()
                self.restarts += 1
                for i in pending:
                    attempts[i] += 1
                    if attempts[i] >= 2:
                        results[i] = JobResult(
                            "error", detail="the sandbox server died twice during this job"
                        )
                todo = sorted(i for i in pending if results[i] is None)
            else:
                todo = []
        return results  # type: ignore[return-value]


def _send_all(stream, jobs: list) -> None:
    with contextlib.suppress(BrokenPipeError, OSError, ValueError):
        for job in jobs:
            data = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
            stream.write(HEADER.pack(len(data)) + data)
        stream.flush()


def recv(stream):
    """One length-prefixed pickled message from ``stream``; None at end of stream."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    data = stream.read(size)
    return pickle.loads(data) if len(data) == size else None


def _warn_once(support: dict) -> None:
    missing = [n for n in FEATURES if not support.get(n)]
    key = ",".join(missing)
    if missing and key not in _warned:
        _warned.add(key)
        log.warning(
            "code sandbox: the kernel refused %s isolation (%s); jobs still run in their own process "
            "group with resource limits, scrubbed environment and a temporary directory, but %s",
            "/".join(missing),
            support.get("reason", ""),
            "can reach the network" if "network" in missing else "may affect the host more than usual",
        )
