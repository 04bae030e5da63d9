"""E-step: sample K completions per problem with the current policy and write parquet shards.

Command: ``restem-sample iteration=2`` samples the training problems with ``iter_1/model``.
Shards are the unit of resume: a rerun after a crash keeps finished shards and generates only the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import polars as pl
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from factory.config import hydra_entry
from factory.faults import kill_point
from factory.rundir import STAGE_FILE, mark_done
from factory.sampling.completions import merge_stops, task_stop_strings
from factory.sampling.hf import generate, load_policy
from factory.sampling.seeds import derive_seed, problem_seed

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
) -> dict:
    """Samples every problem into ``out_dir/shard-*.parquet``, resuming finished shards.

    Shards are written to ``<out_dir>``'s hidden ``.partial`` sibling; the folder is renamed into place
    with its ``stage.json`` only when every shard exists. ``settings.backend`` picks the backend: ``hf``
    samples with ``model``; ``vllm`` starts a vLLM process on the ``policy`` folder (or uses ``sampler``,
    an open ``VllmSampler``) once a shard needs generating, and stops it before returning. ``draw``
    counts earlier E-steps of the same policy in this run (after an empty snapshot), so that a repeated
    E-step draws new samples; it is 0 otherwise and then leaves the seeds alone.
    """
    start = time.time()
    out_dir = Path(out_dir)
    work = out_dir.with_name(f".{out_dir.name}.partial")
    work.mkdir(parents=True, exist_ok=True)
    size = int(settings.shard_size)
    # The task's stops for its prompt layout (the next few-shot "Question:"), then the sampler's own.
    stop = merge_stops(task_stop_strings(task), settings.get("stop"))
    shards = [problems[i : i + size] for i in range(0, len(problems), size)]
    generated = 0
    with contextlib.ExitStack() as stack:
        for shard_no, shard in enumerate(tqdm(shards, desc=f"E-step iter {iteration} shards", unit="shard")):
            path = work / f"shard-{shard_no:05d}.parquet"
            if path.exists():
                continue  # finished before a crash or stop: never regenerate
            seeds = [problem_seed(settings.seed, p["problem_id"], draw) for p in shard]
            prompts = [task.format_prompt(p, tokenizer=tokenizer) for p in shard]
            kwargs = {
                "num_samples": int(settings.num_samples),
                "temperature": float(settings.temperature),
                "top_k": int(settings.top_k),
                "top_p": float(settings.top_p),
                "max_new_tokens": int(settings.max_new_tokens),
                "seeds": seeds,
                "stop": stop,
            }
            if settings.backend == "vllm":
                if sampler is None:
                    sampler = stack.enter_context(open_vllm(policy, tokenizer=tokenizer, settings=settings))
                samples = sampler.generate(prompts, **kwargs)
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
            rows = [
                {"problem_id": p["problem_id"], "sample_idx": j, "prompt": prompt, **s, "policy": policy}
                for p, prompt, per_problem in zip(shard, prompts, samples, strict=True)
                for j, s in enumerate(per_problem)
            ]
            tmp = path.with_suffix(".parquet.tmp")
            pl.DataFrame(rows, schema=SAMPLE_SCHEMA).write_parquet(tmp)
            os.replace(tmp, path)
            generated += len(rows)
    num_rows = sum(
        pl.scan_parquet(p).select(pl.len()).collect().item() for p in sorted(work.glob("*.parquet"))
    )
    mark_done(
        work,
        seconds=time.time() - start,
        num_problems=len(problems),
        num_samples=num_rows,
        num_shards=len(shards),
        policy=policy,
        backend=str(settings.backend),
    )
    os.replace(work, out_dir)
    return {"num_samples": num_rows, "generated": generated, "seconds": time.time() - start}


def vllm_engine_options(settings: DictConfig) -> tuple[dict, str]:
    """(engine keys, weights' dtype) of a vLLM sampler config (conf/sampler/vllm.yaml)."""
    from factory.config import SamplerConfig, VllmSamplerConfig

    engine_keys = set(VllmSamplerConfig.__dataclass_fields__) - set(SamplerConfig.__dataclass_fields__)
    values = OmegaConf.to_container(settings, resolve=True)
    options = {k: values[k] for k in engine_keys if k in values}
    return options, options.pop("dtype", "auto")


def open_vllm(model_path, *, tokenizer, settings: DictConfig):
    """A ``VllmSampler`` for ``model_path`` with the engine keys of ``settings`` (conf/sampler/vllm.yaml)."""
    from factory.sampling.vllm_backend import VllmSampler

    options, dtype = vllm_engine_options(settings)
    return VllmSampler(model_path, tokenizer=tokenizer, options=options, dtype=dtype, seed=int(settings.seed))


def policy_draw(run_dir, iteration: int) -> int:
    """How many earlier iterations sampled the same policy as ``iteration`` (0 unless snapshots were
    empty and ``loop.stop_on_empty_snapshot=false`` went on with the same policy)."""
    for j in range(iteration - 1, 0, -1):
        if run_dir.is_done(j, "model"):
            return iteration - 1 - j
    return iteration - 1


def policy_path(run_dir, base_path, iteration: int):
    """The policy that samples iteration k: the newest trained model before k (p_{k-1}), else the base.

    An iteration whose snapshot was empty trains no model; the next one samples with the same policy.
    """
    for j in range(iteration - 1, 0, -1):
        if run_dir.is_done(j, "model"):
            return run_dir.stage(j, "model")
    return base_path


def e_step(cfg: DictConfig, *, run_dir, task, problems: list[dict], policy, iteration: int) -> dict:
    """Iteration ``iteration``'s E-step: served from the sample cache when it can be, else sampled."""
    from factory.models import load_tokenizer
    from factory.sample_cache import sample_or_reuse

    out = run_dir.stage(iteration, "samples")

    def generate() -> dict:
        return sample_problems(
            # vLLM loads the policy in its own process; the HF backend samples with it here.
            model=None if cfg.sampler.backend == "vllm" else load_policy(policy, dtype=cfg.model.dtype),
            tokenizer=load_tokenizer(policy),
            task=task,
            problems=problems,
            out_dir=out,
            settings=cfg.sampler,
            policy=str(policy),
            iteration=iteration,
            draw=policy_draw(run_dir, iteration),
        )

    return sample_or_reuse(
        cfg, policy=policy, problems=problems, iteration=iteration, out_dir=out, generate=generate
    )


def run(cfg: DictConfig) -> dict:
    """Samples the training problems of ``iteration`` with the previous iteration's policy."""
    from factory.base_model import ensure_base_model
    from factory.rundir import RunDir
    from factory.tasks import build_task

    run_dir = RunDir(cfg.paths.run_dir)
    k = int(cfg.iteration)
    out = run_dir.stage(k, "samples")
    if (out / STAGE_FILE).exists():
        return {"skipped": str(out)}
    policy = policy_path(run_dir, ensure_base_model(cfg), k)
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    problems = task.load_problems(split="train")
    return e_step(cfg, run_dir=run_dir, task=task, problems=problems, policy=policy, iteration=k)


main = hydra_entry(run)
