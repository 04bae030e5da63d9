"""Data-parallel generation on Ray (``cluster=ray``): a Ray Data pipeline over generation jobs (the
E-step's shards, the evaluation's batches), mapped by an actor pool of engine replicas.

Each replica is a Ray actor holding the whole policy: a vLLM engine (built in the actor, which is a
process of its own) or the HF sampler (:func:`factory.sampling.hf.generate`). It asks Ray for
``cluster.num_cpus`` CPUs and ``cluster.num_gpus`` GPUs (default: ``sampler.tensor_parallel_size`` for
vLLM, 1 for HF, on a cluster with GPUs; 0 without), so 8 GPUs run 8 replicas of a 1-GPU model, and a
cluster of several nodes runs replicas on all of them. A job is one call of the sampler on a list of
prompts with per-prompt seeds; sample j of prompt i is seeded with ``seeds[i] + j`` wherever it runs,
and an E-step job is exactly a shard that one process would sample, so R replicas return the samples one
process returns (tests/test_ray.py). The driver writes what comes back (the same parquet shards as
``cluster=local``), so a replica that dies in the middle of a job loses nothing: Ray Data restarts the
actor and runs the job again (its actor pools retry without limit), and the job's rows arrive once.

Why Ray Data and not ``ray.data.llm``: its vLLM processor sends one request per row and targets GPUs;
the E-step needs ``n`` samples per prompt with seed ``s + j``, both backends, and CPU replicas.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

from omegaconf import DictConfig


@contextlib.contextmanager
def ray_session(cluster: DictConfig):
    """Joins ``cluster.address`` (or ``$RAY_ADDRESS``; ``auto``: the ``ray start`` cluster of this
    machine), else starts a new local Ray instance with ``cluster.local_cpus`` logical CPUs (default: the
    cores this process may use) and stops it on exit. A session that is already connected (a Ray job's
    driver, a test) is used as it is and left running."""
    import ray

    from factory.sampling.cores import usable_cores

    if ray.is_initialized():
        yield
        return
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    options = {"log_to_driver": True, "logging_level": "WARNING"}
    if address:
        ray.init(address=address, **options)
    else:
        cpus = int(cluster.local_cpus or usable_cores())
        # address="local": a new instance, even where a `ray start` cluster runs on this machine.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, **options)
    try:
        yield
    finally:
        ray.shutdown()


def replica_gpus(cluster: DictConfig, settings: DictConfig) -> float:
    """GPUs each replica asks for: ``cluster.num_gpus``, else the engine's share where there are GPUs."""
    import ray

    if cluster.num_gpus is not None:
        return float(cluster.num_gpus)
    if ray.cluster_resources().get("GPU", 0) <= 0:
        return 0.0
    # (tensor_parallel_size > 1 inside one replica is untested: vLLM then starts workers of its own.)
    return float(settings.get("tensor_parallel_size") or 1) if settings.backend == "vllm" else 1.0


def replica_threads(cluster: DictConfig, settings: DictConfig) -> int:
    """Torch threads of a CPU replica: ``cluster.threads``; else its CPUs (``cluster.num_cpus``, >= 1),
    or ``sampler.threads`` where that is fewer (a local engine's setting never oversubscribes replicas)."""
    if cluster.threads:
        return int(cluster.threads)
    cpus = max(1, int(cluster.num_cpus))
    return min(cpus, int(settings.threads)) if settings.get("threads") else cpus


def check_fits(cluster: DictConfig, gpus: float, replicas: int) -> None:
    """Refuses, naming the keys, ``replicas`` replicas the nodes cannot hold all at once (the pool waits
    for every replica to start, so it would wait ``cluster.start_timeout_s`` and fail).

    Only checked against a local instance: a remote cluster may add nodes (autoscaling) on demand."""
    import ray

    if cluster.address or os.environ.get("RAY_ADDRESS"):
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]

    def holds(node: dict) -> int:
        by_cpu = node.get("CPU", 0) // cluster.num_cpus
        return int(min(by_cpu, node.get("GPU", 0) // gpus) if gpus else by_cpu)

    room = sum(holds(n) for n in nodes)
    if room < replicas:
        have = ", ".join(f"{n.get('CPU', 0):g} CPUs and {n.get('GPU', 0):g} GPUs" for n in nodes)
        raise ValueError(
            f"config error: {replicas} replicas of cluster.num_cpus={cluster.num_cpus:g} CPUs and {gpus:g} "
            f"GPUs (cluster.num_gpus) each do not fit the local Ray instance ({have}), which holds {room}: "
            "lower cluster.replicas or the resources per replica"
        )


class Replica:
    """One engine replica (a Ray Data actor): loads the policy once, then runs one job per row.

    A row is ``{"key": str, "job": json}``, the job a dict of ``prompts``, ``seeds`` and the sampler's
    keyword arguments (``num_samples``, ``temperature``, ``stop``, ...; ``batch_size`` for HF). The
    result row is ``{"key", "samples": json, "pid"}``, the sampler's per-prompt lists of sample dicts and
    the replica's process id.
    """

    def __init__(self, *, policy: str, backend: str, dtype: str, engine: dict, seed: int, threads: int):
        import ray

        if not ray.get_gpu_ids():
            # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for an actor without GPUs: hide them, or every
            # such replica would load its model onto cuda:0.
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        import torch

        from factory.models import load_tokenizer

        torch.set_num_threads(threads)
        tokenizer = load_tokenizer(policy)
        self.backend = backend
        if backend == "vllm":
            from factory.sampling.vllm_backend import InProcessEngine

            self.engine = InProcessEngine(
                policy, tokenizer=tokenizer, options={**engine, "threads": threads}, dtype=dtype, seed=seed
            )
        else:
            from factory.sampling.hf import load_policy

            self.model, self.tokenizer = load_policy(policy, dtype=dtype), tokenizer

    def __call__(self, batch: dict) -> dict:
        from factory.faults import kill_point

        keys, results = [], []
        for key, text in zip(batch["key"], batch["job"], strict=True):
            job = json.loads(text)
            prompts = job.pop("prompts")
            if self.backend == "vllm":
                job.pop("batch_size", None)  # vLLM schedules the whole job itself
                samples = self.engine.generate(prompts, **job)
            else:
                from factory.sampling.hf import generate

                samples = generate(self.model, self.tokenizer, prompts, progress=False, **job)
            kill_point("ray.replica")  # tests: a replica dies with a job done but not yet returned
            keys.append(str(key))
            results.append(json.dumps(samples))
        return {"key": keys, "samples": results, "pid": [os.getpid()] * len(keys)}


class RayReplicas:
    """Runs generation jobs on ``cluster.replicas`` replicas of ``policy`` (inside :func:`ray_session`).

    Args:
        cluster: ``cfg.cluster``.
        settings: ``cfg.sampler`` (the backend and, for vLLM, its engine keys).
        policy: the model folder every replica loads.
        dtype: the weights' dtype (``model.dtype``).
    """

    def __init__(self, cluster: DictConfig, settings: DictConfig, *, policy, dtype: str):
        self.cluster, self.settings = cluster, settings
        self.policy, self.dtype = str(policy), dtype
        self.pids: set[int] = set()  # the replicas' process ids (a check that several replicas ran)

    def _constructor_kwargs(self) -> dict:
        engine = {}
        if self.settings.backend == "vllm":
            from factory.sampling.vllm_backend import vllm_engine_options

            engine, dtype = vllm_engine_options(self.settings)
            engine.pop("threads", None)
        else:
            dtype = self.dtype
        return {
            "policy": self.policy,
            "backend": str(self.settings.backend),
            "dtype": dtype,
            "engine": engine,
            "seed": int(self.settings.seed),
            "threads": replica_threads(self.cluster, self.settings),
        }

    def run(self, jobs: dict[str, dict]) -> Iterator[tuple[str, list[list[dict]]]]:
        """Yields ``(key, samples)`` for every job as its replica finishes it (in no fixed order).

        Every replica has started (its model loaded) before the first job is dealt, within
        ``cluster.start_timeout_s``; the process ids of the replicas that ran jobs go to ``self.pids``.
        """
        import ray.data

        if not jobs:
            return
        if self.settings.backend == "vllm":
            from factory.sampling.vllm_backend import INSTALL_VLLM, is_available

            if not is_available():
                raise RuntimeError(INSTALL_VLLM)
        gpus = replica_gpus(self.cluster, self.settings)
        size = min(int(self.cluster.replicas), len(jobs))
        check_fits(self.cluster, gpus, size)
        context = ray.data.DataContext.get_current()
        wanted = {
            "enable_progress_bars": False,  # the callers' own bars count jobs
            "print_on_execution_start": False,
            "wait_for_min_actors_s": int(self.cluster.start_timeout_s),
        }
        saved = {key: getattr(context, key) for key in wanted}
        for key, value in wanted.items():
            setattr(context, key, value)
        rows = [{"key": key, "job": json.dumps(job)} for key, job in jobs.items()]
        try:
            # One block per job: a replica takes jobs one at a time, and a retried job is one job.
            data = ray.data.from_items(rows, override_num_blocks=len(rows))
            out = data.map_batches(
                Replica,
                fn_constructor_kwargs=self._constructor_kwargs(),
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=size),
                num_cpus=float(self.cluster.num_cpus),
                num_gpus=gpus,
            )
            for row in out.iter_rows():
                self.pids.add(int(row["pid"]))
                yield row["key"], json.loads(row["samples"])
        except ray.exceptions.GetTimeoutError as err:
            raise RuntimeError(
                f"{self.cluster.replicas} Ray replicas (each {self.cluster.num_cpus:g} CPUs, {gpus:g} GPUs) did "
                f"not all start within cluster.start_timeout_s={self.cluster.start_timeout_s}: the cluster "
                "lacks the resources, or loading the model takes longer (raise the timeout)"
            ) from err
        finally:
            for key, value in saved.items():
                setattr(context, key, value)


def batch_jobs(
    name: str, prompts: list[str], *, tokenizer, seeds: list[int], per_job: int, **kwargs
) -> tuple[dict[str, dict], dict[str, list[int]]]:
    """Jobs of ``prompts`` cut as one ``hf.generate`` call with ``batch_size=per_job`` cuts them: sorted
    by token length, ``per_job`` prompts each (so each HF batch is decoded whole by one replica and its
    samples are the ones one process draws). Returns the jobs by key and the prompt indices of each key."""
    from factory.tokens import batches_by_length

    jobs, index = {}, {}
    for number, idx in enumerate(batches_by_length(tokenizer, prompts, per_job)):
        key = f"{name}-{number:06d}"
        jobs[key] = {
            **kwargs,
            "batch_size": per_job,
            "prompts": [prompts[i] for i in idx],
            "seeds": [int(seeds[i]) for i in idx],
        }
        index[key] = idx
    return jobs, index


def generate_calls(pool: RayReplicas, calls: dict[str, dict], *, tokenizer, desc: str) -> dict:
    """Several sampler calls in one pass of the pool (one model load per replica).

    ``calls`` maps a name to ``{"prompts", "seeds", "per_job", **sampler keyword arguments}``; returns
    each name's per-prompt sample lists in prompt order, as the sampler called on all its prompts would.
    """
    from tqdm.auto import tqdm

    jobs, index, sizes = {}, {}, {}
    for name, call in calls.items():
        call = dict(call)
        prompts = call.pop("prompts")
        sizes[name] = len(prompts)
        more, where = batch_jobs(name, prompts, tokenizer=tokenizer, **call)
        jobs.update(more)
        index.update(where)
    results = {name: [None] * size for name, size in sizes.items()}
    for key, samples in tqdm(pool.run(jobs), total=len(jobs), desc=desc, unit="batch"):
        name = key.rsplit("-", 1)[0]
        for i, per in zip(index[key], samples, strict=True):
            results[name][i] = per
    missing = [name for name, per in results.items() if any(x is None for x in per)]
    if missing:
        raise RuntimeError(f"Ray returned no samples for some prompts of {missing}")
    return results
