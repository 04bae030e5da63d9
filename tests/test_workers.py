"""The HF sampling workers' lifetime: a worker whose parent process is killed exits by itself."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A parent that starts one worker, prints the worker's pid, and waits to be killed.
PARENT = """
import os, time
from factory.sampling.workers import GenerationWorkers
workers = GenerationWorkers(1, threads=1)
print(workers._pool.submit(os.getpid).result(), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_a_worker_exits_when_its_parent_is_killed():
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    worker = None
    try:
        ready, _, _ = select.select([parent.stdout], [], [], 180)
        assert ready, "the parent printed no worker pid within 180 s"
        worker = int(parent.stdout.readline())
        assert _alive(worker)
        parent.send_signal(signal.SIGKILL)  # no shutdown, no atexit: the worker is orphaned
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), f"worker {worker} outlived its killed parent"
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_default_threads_come_from_the_cores_this_process_may_use(monkeypatch):
    """In a container or a batch job's share the machine has more cores than the process may use: the
    workers' default threads divide the CPU affinity, not os.cpu_count(), so they never oversubscribe it."""
    from factory.sampling.workers import GenerationWorkers

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    with GenerationWorkers(2) as two, GenerationWorkers(8) as eight:
        assert (two.threads, eight.threads) == (2, 1)
    with GenerationWorkers(2, threads=3) as told:
        assert told.threads == 3
