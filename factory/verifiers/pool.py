"""A small process pool whose per-item wall-clock deadline is enforced by the parent process.

math-verify (and sympy under it) can hang for minutes on adversarial input such as
``9^{9^{9^{9^{9}}}}``. Its own timeouts rely on ``signal.alarm``, which only works in the main
thread and cannot interrupt C code that holds the GIL, so the only reliable limit is to run the
work in separate processes and SIGKILL a worker that overruns. This module does exactly that:

* workers come from the ``forkserver`` context (cheap to replace: they fork from a server that
  already imported the heavy modules, and they never inherit the parent's threads or CUDA state);
* items are sent in chunks, to keep IPC overhead small, but each result is sent back as soon as
  it is ready, so the parent knows when every single item started and can time it exactly;
* a worker that passes the deadline is killed and replaced; its current item gets
  ``on_timeout(item, reason)`` and the rest of its chunk is requeued, so only the culprit times out;
* results come back in input order.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

_MISSING = object()


def _default_on_timeout(item: Any, reason: str) -> dict:
    return {"status": "timeout", "detail": reason}


def _worker_main(conn, fn: Callable[[Any], Any], memory_limit_mb: int | None) -> None:
    """Worker loop: receive chunks of ``(index, item)``, send back one message per item."""
    if memory_limit_mb:
        import resource

        # A runaway bignum should die with MemoryError instead of swapping a shared machine.
        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send(("ready", -1, None))
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        for index, item in chunk:
            try:
                message = ("ok", index, fn(item))
            except Exception:
                message = ("error", index, traceback.format_exc(limit=8))
            try:
                conn.send(message)
            except Exception:
                # The result itself could not be pickled; report that rather than dying silently.
                conn.send(("error", index, traceback.format_exc(limit=8)))


@dataclass
class _Worker:
    process: Any
    conn: Any
    queue: deque = field(default_factory=deque)  # (index, item) still owed; queue[0] is running
    started: float = 0.0  # monotonic time at which queue[0] started


class DeadlinePool:
    """Process pool applying ``fn`` to items with a per-item wall-clock timeout.

    Use as a context manager so the workers are always shut down::

        with DeadlinePool(fn, workers=2, timeout=5.0) as pool:
            results = pool.map(items)

    Args:
        fn: Picklable (module-level) function of one item. Must not rely on signals for timeouts.
        workers: Number of worker processes.
        timeout: Seconds of wall-clock time allowed per item (measured by the parent).
        chunk_size: Items sent to a worker per message.
        on_timeout: ``(item, reason) -> result`` for items that overran or whose worker died.
        on_error: ``(item, traceback_text) -> result`` for items where ``fn`` raised; None re-raises
            the error in the parent as RuntimeError.
        preload: Modules the fork server imports once, so that new workers start fast.
        memory_limit_mb: Address-space limit per worker (None: unlimited).
        start_method: ``"forkserver"`` (default) or ``"spawn"``; ``"fork"`` is refused because a
            forked copy of a multi-threaded parent (torch, tokenizers) can deadlock.
        startup_timeout: Seconds a new worker may take to become ready.

    Raises:
        ValueError: On bad arguments.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        *,
        workers: int = 2,
        timeout: float = 5.0,
        chunk_size: int = 64,
        on_timeout: Callable[[Any, str], Any] = _default_on_timeout,
        on_error: Callable[[Any, str], Any] | None = None,
        preload: Sequence[str] = (),
        memory_limit_mb: int | None = None,
        start_method: str = "forkserver",
        startup_timeout: float = 120.0,
    ) -> None:
        if workers < 1 or chunk_size < 1 or timeout <= 0:
            raise ValueError("workers and chunk_size must be >= 1 and timeout > 0")
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
        self.fn, self.timeout, self.chunk_size = fn, timeout, chunk_size
        self.on_timeout, self.on_error = on_timeout, on_error
        self.memory_limit_mb, self.startup_timeout = memory_limit_mb, startup_timeout
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver" and preload:
            # Keep "__main__" (the default) so functions defined in scripts stay picklable.
            self._ctx.set_forkserver_preload(["__main__", *preload])
        self._workers: list[_Worker] = []
        self._num_workers = workers
        self.replaced = 0  # how many workers were killed or died; handy for tests and logs

    def __enter__(self) -> DeadlinePool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main, args=(child_conn, self.fn, self.memory_limit_mb), daemon=True
        )
        process.start()
        child_conn.close()
        if not parent_conn.poll(self.startup_timeout):
            process.kill()
            raise RuntimeError(f"pool worker did not start within {self.startup_timeout} s")
        parent_conn.recv()  # the "ready" message
        return _Worker(process, parent_conn)

    def _kill(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()

    def close(self) -> None:
        """Stop all workers (politely, then by force)."""
        for worker in self._workers:
            with contextlib.suppress(OSError):  # a worker that already died cannot be told
                worker.conn.send(None)
        for worker in self._workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
            worker.conn.close()
        self._workers = []

    def _drain(self, worker: _Worker, results: list) -> bool:
        """Read every message the worker has sent; return False if its pipe broke (it died)."""
        try:
            while worker.queue and worker.conn.poll():
                kind, index, value = worker.conn.recv()
                _, item = worker.queue.popleft()
                if kind == "ok":
                    results[index] = value
                elif self.on_error is None:
                    raise RuntimeError(f"pool function failed on item {index}:\n{value}")
                else:
                    results[index] = self.on_error(item, value)
                worker.started = time.monotonic()
        except (EOFError, OSError):
            return False
        return True

    def _replace(self, worker: _Worker, results: list, pending: deque, reason: str) -> None:
        """Kill ``worker``, give its current item ``on_timeout``, requeue the rest of its chunk."""
        self._kill(worker)
        self.replaced += 1
        index, item = worker.queue.popleft()
        results[index] = self.on_timeout(item, reason)
        if worker.queue:
            pending.appendleft(list(worker.queue))
        position = self._workers.index(worker)
        self._workers[position] = self._start_worker()

    def map(self, items: Iterable[Any], *, timeout: float | None = None) -> list:
        """Apply the function to every item; results are in input order.

        Args:
            items: The inputs.
            timeout: Per-item seconds for this call (default: the pool's timeout).

        Returns:
            One result per item: ``fn(item)``, ``on_timeout(item, reason)`` or ``on_error(...)``.
        """
        limit = self.timeout if timeout is None else timeout
        indexed = list(enumerate(items))
        results: list = [_MISSING] * len(indexed)
        pending = deque(indexed[i : i + self.chunk_size] for i in range(0, len(indexed), self.chunk_size))
        while len(self._workers) < self._num_workers and pending:
            self._workers.append(self._start_worker())
        while True:
            for worker in self._workers:
                if not worker.queue and pending:
                    chunk = pending.popleft()
                    worker.queue.extend(chunk)
                    worker.conn.send(chunk)
                    worker.started = time.monotonic()
            busy = [w for w in self._workers if w.queue]
            if not busy:
                break
            now = time.monotonic()
            next_deadline = min(w.started for w in busy) + limit
            wait([w.conn for w in busy], timeout=max(0.0, next_deadline - now))
            for worker in busy:
                if not self._drain(worker, results):
                    self._replace(worker, results, pending, "worker process died")
                elif worker.queue and time.monotonic() - worker.started > limit:
                    self._replace(worker, results, pending, f"exceeded {limit:g} s")
        return results


def map_with_deadline(fn: Callable[[Any], Any], items: Iterable[Any], **pool_kwargs: Any) -> list:
    """One-shot helper: start a :class:`DeadlinePool`, map ``items``, shut the pool down.

    Args:
        fn: Picklable function of one item.
        items: The inputs.
        **pool_kwargs: Passed to :class:`DeadlinePool` (workers, timeout, on_timeout, ...).

    Returns:
        One result per item, in input order.
    """
    with DeadlinePool(fn, **pool_kwargs) as pool:
        return pool.map(items)
