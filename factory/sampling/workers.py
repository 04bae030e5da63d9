"""Data-parallel sampling with the HF backend on one machine: worker processes, each running
:func:`factory.sampling.hf.generate` on whole batches of prompts with a fixed number of threads.

Why processes: on a CPU, one process per core keeps every core busy, while one process with several
threads splits small matrix products poorly and, on a machine with other work, its OpenMP threads stall
each other at every barrier (measured here: a training step of the tiny model took 5 s instead of 0.1 s
with 2 spinning threads on a loaded 2-core VM). Why the results do not change: the prompts are sorted by
token length and cut into batches exactly as one ``generate`` call cuts them, each batch is decoded whole
by one worker, and sample j of prompt i is seeded by ``seeds[i] + j`` wherever it runs, so any number of
workers returns what one process returns (tested).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from tqdm.auto import tqdm

from factory.sampling.cores import usable_cores

# Per worker process: the model it last loaded, by (path, dtype) (a worker serves one policy at a time).
_LOADED: dict[tuple[str, str], tuple] = {}


# How often (seconds) a worker checks that the process that started it is still alive.
PARENT_POLL_S = 1.0


def _exit_when_orphaned(parent_pid: int) -> None:
    """Ends this worker process once ``parent_pid`` is gone (its parent pid changes on reparenting).

    A worker whose parent is killed (SIGKILL, OOM) would otherwise stay alive, idle, holding its model
    (0.6-1.4 GB each were found hours after their run was killed): the executor's shutdown never runs.
    """
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(0)


def _start_worker(threads: int | None, parent_pid: int | None = None) -> None:
    if parent_pid is not None:
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    import torch

    if threads:
        torch.set_num_threads(int(threads))


def _generate_batch(model_path: str, dtype: str, prompts: list[str], kwargs: dict) -> list[list[dict]]:
    from factory.models import load_tokenizer
    from factory.sampling.hf import generate, load_policy

    key = (model_path, dtype)
    if key not in _LOADED:
        _LOADED.clear()  # a new policy replaces the old one
        _LOADED[key] = (load_policy(model_path, dtype=dtype), load_tokenizer(model_path))
    model, tokenizer = _LOADED[key]
    return generate(model, tokenizer, prompts, progress=False, **kwargs)


class GenerationWorkers:
    """A pool of ``workers`` sampling processes with ``threads`` torch threads each; a context manager.

    Args:
        workers: processes (>= 1).
        threads: torch threads per process (None: the cores this process may use, its CPU affinity,
            divided by ``workers``, at least 1, so the workers never oversubscribe them).
    """

    def __init__(self, workers: int, *, threads: int | None = None):
        if workers < 1:
            raise ValueError(f"config error: sampler.workers must be >= 1, got {workers}")
        self.workers = workers
        if threads is None:
            threads = max(1, usable_cores() // workers)
        self.threads = threads
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            # spawn, not fork: a forked child of a process whose OpenMP threads already ran can hang.
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(threads, os.getpid()),
        )

    def generate(
        self,
        model_path: str | Path,
        prompts: list[str],
        *,
        tokenizer,
        dtype: str,
        batch_size: int,
        seeds: list[int] | None = None,
        seed: int = 0,
        desc: str = "sampling",
        progress: bool = True,
        **kwargs,
    ) -> list[list[dict]]:
        """``hf.generate(load_policy(model_path), tokenizer, prompts, ...)`` spread over the workers.

        ``tokenizer`` (the model's) orders the prompts by token length here, as ``generate`` does, so the
        batches are the ones one process would decode. Other keyword arguments go to ``generate``.
        """
        from factory.sampling.seeds import derive_seed
        from factory.tokens import batches_by_length

        if not prompts:
            return []
        if seeds is None:
            seeds = [derive_seed(seed, i) for i in range(len(prompts))]
        batches = batches_by_length(tokenizer, prompts, batch_size)
        pending = {}
        for batch in batches:
            job = {**kwargs, "batch_size": batch_size, "seeds": [seeds[i] for i in batch]}
            future = self._pool.submit(
                _generate_batch, str(model_path), dtype, [prompts[i] for i in batch], job
            )
            pending[future] = batch
        results: list[list[dict] | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False) as bar:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    batch = pending.pop(future)
                    for i, samples in zip(batch, future.result(), strict=True):
                        results[i] = samples
                    bar.update(len(batch))
        return results

    def close(self) -> None:
        """Stops the worker processes (and frees their models)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> GenerationWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
