"""E-step: sample K completions per problem with the current policy and write parquet shards.

Command: ``restem-sample iteration=2`` samples the training problems with ``iter_1/model``.
Shards are the unit of resume: a rerun after a crash keeps finished shards and generates only the rest
(only shards of the same inputs: ``rundir.claim_partial``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path

import polars as pl
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from factory.config import hydra_entry
from factory.faults import kill_point
from factory.rundir import claim_partial, finish_partial, partial_dir
from factory.sampling.hf import generate

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


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (Python's hash() is salted per process)."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def problem_seed(seed: int, problem_id: str, draw: int = 0) -> int:
    """The seed of sample 0 of a problem; sample j uses ``problem_seed + j`` (on both backends).

    It depends on the sampler seed and the problem id only (and ``draw``, see ``sample_problems``), so
    sample j of a problem is the same for any K, shard, batch or prompt order, and a K'-sample run is the
    first K' samples of a K-sample run of the same policy.
    """
    return derive_seed(seed, problem_id) if draw == 0 else derive_seed(seed, problem_id, draw)


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
    with its ``stage.json`` only when every shard exists; ``stage.json`` records the inputs the caller
    claimed the folder for (``rundir.claim_partial``; ``e_step`` does). ``settings.backend`` picks the
    backend: ``hf`` samples with ``model``; ``vllm`` starts a vLLM process on the ``policy`` folder (or
    uses ``sampler``, an open ``VllmSampler``) once a shard needs generating, and stops it before
    returning. ``draw`` counts earlier E-steps of the same policy in this run (after an empty snapshot),
    so that a repeated E-step draws new samples; it is 0 otherwise and then leaves the seeds alone.
    """
    start = time.time()
    out_dir = Path(out_dir)
    work = partial_dir(out_dir)
    work.mkdir(parents=True, exist_ok=True)
    size = int(settings.shard_size)
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
                "stop": list(settings.get("stop") or ()),
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
    return {"num_samples": num_rows, "generated": generated, "seconds": time.time() - start}


def open_vllm(model_path, *, tokenizer, settings: DictConfig):
    """A ``VllmSampler`` for ``model_path`` with the engine keys of ``settings`` (conf/sampler/vllm.yaml)."""
    from factory.config import SamplerConfig, VllmSamplerConfig
    from factory.sampling.vllm_backend import VllmSampler

    engine_keys = set(VllmSamplerConfig.__dataclass_fields__) - set(SamplerConfig.__dataclass_fields__)
    values = OmegaConf.to_container(settings, resolve=True)
    options = {k: values[k] for k in engine_keys if k in values}
    dtype = options.pop("dtype", "auto")
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


def e_step(cfg: DictConfig, *, stages, iteration: int) -> dict:
    """Iteration ``iteration``'s E-step: served from the sample cache when it can be, else sampled.

    ``stages`` (``factory.stage_inputs.StageInputs``) gives the policy, the problems and the inputs the
    finished stage records.
    """
    from factory.models import load_model, load_tokenizer
    from factory.sample_cache import sample_or_reuse
    from factory.versioning import sampling_inputs

    out = stages.run_dir.stage(iteration, "samples")
    sampling, inputs = stages.sampling(iteration), stages.samples(iteration)
    policy = sampling["policy"]

    def generate() -> dict:
        claim_partial(out, inputs)  # shards of other inputs are never resumed
        return sample_problems(
            # vLLM loads the policy in its own process; the HF backend samples with it here.
            model=None if cfg.sampler.backend == "vllm" else load_model(policy, dtype=cfg.model.dtype),
            tokenizer=load_tokenizer(policy),
            task=stages.task,
            problems=stages.train_problems,
            out_dir=out,
            settings=cfg.sampler,
            policy=str(policy),
            iteration=iteration,
            draw=sampling["draw"],
        )

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
