"""E-step: sample K completions per problem with the current policy and write parquet shards.

Command: ``restem-sample iteration=2`` samples the training problems with ``iter_1/model``.
Shards are the unit of resume: a rerun after a crash keeps finished shards and generates only the rest
(only shards of the same inputs: ``rundir.claim_partial``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import polars as pl
from omegaconf import DictConfig
from tqdm.auto import tqdm

from factory.config import hydra_entry
from factory.faults import kill_point
from factory.rundir import claim_partial, finish_partial, partial_dir
from factory.sampling.completions import merge_stops, task_stop_strings
from factory.sampling.hf import generate, load_policy
from factory.sampling.seeds import derive_seed, problem_seed
from factory.sampling.vllm_backend import vllm_engine_options

__all__ = ["derive_seed", "e_step", "generate", "open_vllm", "problem_seed", "sample_problems"]

log = logging.getLogger(__name__)

SAMPLE_SCHEMA = {
    "problem_id": pl.String,
    "sample_idx": pl.Int32,
    "prompt": pl.String,
    "completion": pl.String,
    "num_tokens": pl.Int32,
    "finish_reason": pl.String,
    "policy": pl.String,
    "seed": pl.Int64,
}


def sample_problems(
    *,
    model,
    tokenizer,
    task,
    problems: list[dict],
    out_dir: Path,
    settings: DictConfig,
    policy: str,
    iteration: int,
    draw: int = 0,
    sampler=None,
    dtype: str = "float32",
    cluster: DictConfig | None = None,
    num_samples: dict[str, int] | None = None,
) -> dict:
    """Samples every problem into ``out_dir/shard-*.parquet``, resuming finished shards.

    Shards are written to ``<out_dir>``'s hidden ``.partial`` sibling; the folder is renamed into place
    with its ``stage.json`` only when every shard exists; ``stage.json`` records the inputs the caller
    claimed the folder for (``rundir.claim_partial``; ``e_step`` does). ``settings.backend`` picks the
    backend: ``hf`` samples with ``model``; ``vllm`` starts a vLLM process on the ``policy`` folder (or
    uses ``sampler``, an open ``VllmSampler``) once a shard needs generating, and stops it before
    returning. With ``settings.workers`` > 1 the HF backend samples in that many worker processes, each
    loading the ``policy`` folder in ``dtype`` (``model`` is then unused). ``draw`` counts earlier E-steps of the same policy in this run (after an empty snapshot),
    so that a repeated E-step draws new samples; it is 0 otherwise and then leaves the seeds alone.
    With ``cluster.kind == "ray"`` (``cfg.cluster``) the shards still to sample go to an actor pool of
    ``cluster.replicas`` engine replicas (``factory.sampling.ray_pool``), each loading ``policy``; the same
    samples, written here. ``num_samples`` (problem id -> samples; ``factory.curriculum``) overrides
    ``settings.num_samples`` per problem: problems are then grouped by their count (fewest first, each
    group in its given order) so that every shard has one count.
    """
    start = time.time()
    out_dir = Path(out_dir)
    work = partial_dir(out_dir)
    work.mkdir(parents=True, exist_ok=True)
    size = int(settings.shard_size)
    # The task's stops for its prompt layout (the next few-shot "Question:"), then the sampler's own.
    stop = merge_stops(task_stop_strings(task), settings.get("stop"))
    default = int(settings.num_samples)
    groups: dict[int, list[dict]] = {}
    for p in problems:
        groups.setdefault((num_samples or {}).get(p["problem_id"], default), []).append(p)
    shards, shard_counts = [], []
    for count in sorted(groups):
        group = groups[count]
        shards += [group[i : i + size] for i in range(0, len(group), size)]
        shard_counts += [count] * ((len(group) + size - 1) // size)
    # Shards finished before a crash or stop are never regenerated.
    pending = [n for n in range(len(shards)) if not (work / f"shard-{n:05d}.parquet").exists()]

    def job(shard_no: int) -> dict:
        """One shard's sampler call: its prompts, per-problem seeds and the sampling settings."""
        shard = shards[shard_no]
        return {
            "prompts": [task.format_prompt(p, tokenizer=tokenizer) for p in shard],
            "seeds": [problem_seed(settings.seed, p["problem_id"], draw) for p in shard],
            "num_samples": shard_counts[shard_no],
            "temperature": float(settings.temperature),
            "top_k": int(settings.top_k),
            "top_p": float(settings.top_p),
            "max_new_tokens": int(settings.max_new_tokens),
            "stop": stop,
        }

    def write(shard_no: int, prompts: list[str], samples: list[list[dict]]) -> int:
        rows = [
            {"problem_id": p["problem_id"], "sample_idx": j, "prompt": prompt, **s, "policy": policy}
            for p, prompt, per_problem in zip(shards[shard_no], prompts, samples, strict=True)
            for j, s in enumerate(per_problem)
        ]
        path = work / f"shard-{shard_no:05d}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pl.DataFrame(rows, schema=SAMPLE_SCHEMA).write_parquet(tmp)
        os.replace(tmp, path)
        return len(rows)

    generated, ray_pids = 0, None
    if cluster is not None and cluster.kind == "ray" and pending:
        from factory.sampling.ray_pool import RayReplicas, ray_session

        # Each shard is one job, sampled whole by one replica exactly as below; the driver writes it.
        jobs = {f"{n:05d}": {**job(n), "batch_size": int(settings.batch_size)} for n in pending}
        with ray_session(cluster):
            pool = RayReplicas(cluster, settings, policy=policy, dtype=dtype)
            ray_pids = pool.pids
            desc = f"E-step iter {iteration} shards ({int(cluster.replicas)} Ray replicas)"
            for key, samples in tqdm(pool.run(jobs), total=len(jobs), desc=desc, unit="shard"):
                kill_point("sample.shard")
                generated += write(int(key), jobs[key]["prompts"], samples)
        lost = [n for n in pending if not (work / f"shard-{n:05d}.parquet").exists()]
        if lost:  # never mark an E-step done with shards missing
            raise RuntimeError(
                f"Ray returned no samples for shards {lost[:5]} of {len(pending)}; rerun to resume"
            )
        pending = []
    with contextlib.ExitStack() as stack:
        for shard_no in tqdm(
            pending, desc=f"E-step iter {iteration} shards", unit="shard", disable=not pending
        ):
            kwargs = job(shard_no)
            prompts = kwargs.pop("prompts")
            if settings.backend == "vllm":
                if sampler is None:
                    sampler = stack.enter_context(open_vllm(policy, tokenizer=tokenizer, settings=settings))
                samples = sampler.generate(prompts, **kwargs)
            elif int(settings.get("workers") or 1) > 1:
                if sampler is None:
                    sampler = stack.enter_context(worker_pool(settings))
                samples = sampler.generate(
                    policy,
                    prompts,
                    tokenizer=tokenizer,
                    dtype=dtype,
                    batch_size=int(settings.batch_size),
                    desc=f"shard {shard_no}",
                    **kwargs,
                )
            else:
                samples = generate(
                    model,
                    tokenizer,
                    prompts,
                    batch_size=int(settings.batch_size),
                    desc=f"shard {shard_no}",
                    **kwargs,
                )
            kill_point("sample.shard")
            generated += write(shard_no, prompts, samples)
    num_rows = sum(
        pl.scan_parquet(p).select(pl.len()).collect().item() for p in sorted(work.glob("*.parquet"))
    )
    finish_partial(
        work,
        out_dir,
        seconds=time.time() - start,
        num_problems=len(problems),
        num_samples=num_rows,
        num_shards=len(shards),
        policy=policy,
        backend=str(settings.backend),
    )
    result = {"num_samples": num_rows, "generated": generated, "seconds": time.time() - start}
    if ray_pids is not None:
        result["ray_replicas"] = len(ray_pids)  # replicas that sampled shards
    return result


class NothingToSampleError(RuntimeError):
    """The curriculum skipped every training problem: there is nothing left for an E-step to sample."""


def worker_pool(settings: DictConfig):
    """The HF backend's ``GenerationWorkers`` for ``settings.workers`` / ``settings.threads``."""
    from factory.sampling.workers import GenerationWorkers

    return GenerationWorkers(int(settings.workers), threads=settings.get("threads"))


def open_vllm(model_path, *, tokenizer, settings: DictConfig):
    """A ``VllmSampler`` for ``model_path`` with the engine keys of ``settings`` (conf/sampler/vllm.yaml)."""
    from factory.sampling.vllm_backend import VllmSampler

    options, dtype = vllm_engine_options(settings)
    return VllmSampler(model_path, tokenizer=tokenizer, options=options, dtype=dtype, seed=int(settings.seed))


def e_step(cfg: DictConfig, *, stages, iteration: int) -> dict:
    """Iteration ``iteration``'s E-step: served from the sample cache when it can be, else sampled.

    ``stages`` (``factory.stage_inputs.StageInputs``) gives the policy, the problems and the inputs the
    finished stage records.
    """
    from factory.models import load_tokenizer
    from factory.sample_cache import sample_or_reuse
    from factory.versioning import sampling_inputs

    out = stages.run_dir.stage(iteration, "samples")
    problems, counts = stages.plan(iteration)
    if not problems:
        raise NothingToSampleError(
            f"iteration {iteration}: the curriculum left no training problem to sample (every one was "
            f"solved at >= curriculum.skip_solved_at={cfg.curriculum.skip_solved_at} of the time)"
        )
    sampling, inputs = stages.sampling(iteration), stages.samples(iteration)
    policy = sampling["policy"]

    def generate() -> dict:
        claim_partial(out, inputs)  # shards of other inputs are never resumed
        return sample_problems(
            # vLLM loads the policy in its own process; the HF backend samples with it here.
            # Worker processes (sampler.workers > 1) and Ray replicas (cluster=ray) load it themselves.
            model=None
            if cfg.sampler.backend == "vllm"
            or int(cfg.sampler.get("workers") or 1) > 1
            or cfg.cluster.kind == "ray"
            else load_policy(policy, dtype=cfg.model.dtype),
            tokenizer=load_tokenizer(policy),
            task=stages.task,
            problems=problems,
            out_dir=out,
            settings=cfg.sampler,
            policy=str(policy),
            iteration=iteration,
            draw=sampling["draw"],
            dtype=str(cfg.model.dtype),
            cluster=cfg.cluster,
            num_samples=counts,
        )

    if counts is not None:  # a curriculum's plan: the cache holds whole E-steps of K samples per problem
        return generate()
    key_inputs = sampling_inputs(
        cfg,
        policy_fingerprint=sampling["policy_fingerprint"],
        problems_sha=sampling["problems_sha"],
        prompts_sha=sampling["prompts_sha"],
        iteration=iteration,
    )
    return sample_or_reuse(
        cfg,
        key_inputs=key_inputs,
        policy=policy,
        problems=stages.train_problems,
        iteration=iteration,
        out_dir=out,
        generate=generate,
        stage_inputs=inputs,
    )


def run(cfg: DictConfig) -> dict:
    """Samples the training problems of ``iteration`` with the previous iteration's policy (a finished
    E-step of the same inputs is skipped, one of other inputs refused)."""
    from factory.stage_inputs import stage_inputs

    k = int(cfg.iteration)
    with stage_inputs(cfg) as stages:
        if stages.is_current(k, "samples"):
            return {"skipped": str(stages.run_dir.stage(k, "samples"))}
        return e_step(cfg, stages=stages, iteration=k)


main = hydra_entry(run)
