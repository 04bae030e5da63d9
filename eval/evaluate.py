"""Evaluation: greedy accuracy, pass@k (unbiased) and maj@k of one model on held-out problems.

Command: ``restem-eval iteration=0`` evaluates the base model, ``iteration=k`` evaluates ``iter_k/model``.
Writes ``metrics.json`` and ``per_problem.parquet`` into the stage folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path

import polars as pl
from omegaconf import DictConfig, OmegaConf

from eval.metrics import aggregate, problem_metrics
from factory.config import hydra_entry
from factory.faults import kill_point
from factory.rundir import atomic_dir, mark_done, write_json

# One row per evaluated problem (read back by eval.significance and eval.sweep_report).
PER_PROBLEM = "per_problem.parquet"


def evaluate_model(
    *,
    model_path,
    task,
    problems: list[dict],
    settings: DictConfig,
    out_dir: Path,
    dtype: str = "float32",
    label: str = "eval",
    sampler_settings: DictConfig | None = None,
    inputs: dict | None = None,
    cluster: DictConfig | None = None,
) -> dict:
    """Evaluates one model and writes its results to ``out_dir`` atomically.

    Greedy accuracy uses one greedy completion per problem; pass@k and maj@k use ``settings.num_samples``
    samples per problem at ``settings.temperature`` / ``settings.top_p``. Correctness is the final answer
    (``answer`` strictness), the paper's metric. Generation uses the backend of ``sampler_settings``
    (``cfg.sampler``; default: the HF backend, on the best device there is), the task's stop strings and
    the sampler's ``stop`` strings. ``inputs`` (``StageInputs.eval``) are recorded in ``stage.json``.
    With ``cluster.kind == "ray"`` (``cfg.cluster``) the generation runs on Ray replicas
    (``factory.sampling.ray_pool``), HF batches cut as here, vLLM jobs of ``sampler.shard_size`` prompts.
    """
    from factory.models import load_tokenizer
    from factory.sample import generate, open_vllm, problem_seed, worker_pool
    from factory.sampling.completions import merge_stops, task_stop_strings
    from factory.sampling.hf import load_policy
    from factory.verify import judge

    if not problems:
        raise ValueError(f"no problems to evaluate on split {settings.split!r}")
    start = time.time()
    tokenizer = load_tokenizer(model_path)
    prompts = [task.format_prompt(p, tokenizer=tokenizer) for p in problems]
    n = int(settings.num_samples)
    batch, max_new = int(settings.batch_size), int(settings.max_new_tokens)
    stop = merge_stops(task_stop_strings(task), (sampler_settings or {}).get("stop"))
    greedy_kw = {"num_samples": 1, "temperature": 0.0, "max_new_tokens": max_new, "stop": stop}
    sampled_kw = {
        "num_samples": n,
        "temperature": float(settings.temperature),
        "top_p": float(settings.top_p),
        "max_new_tokens": max_new,
        "stop": stop,
        "seeds": [problem_seed(1, p["problem_id"]) for p in problems],
    }
    if cluster is not None and cluster.kind == "ray":
        greedy, sampled = _generate_on_ray(
            cluster,
            sampler_settings,
            model_path=model_path,
            dtype=dtype,
            tokenizer=tokenizer,
            prompts=prompts,
            greedy_kw=greedy_kw,
            sampled_kw=sampled_kw,
            batch=batch,
            label=label,
        )
        kill_point("eval.generate")
    elif sampler_settings is not None and sampler_settings.backend == "vllm":
        with open_vllm(model_path, tokenizer=tokenizer, settings=sampler_settings) as vllm:
            # One request each (vLLM schedules it whole); its own bar shows the prompts done.
            greedy = vllm.generate(prompts, seeds=[0] * len(prompts), progress=True, **greedy_kw)
            kill_point("eval.generate")
            sampled = vllm.generate(prompts, progress=True, **sampled_kw)
    else:
        with contextlib.ExitStack() as stack:
            if sampler_settings is not None and int(sampler_settings.get("workers") or 1) > 1:
                pool = stack.enter_context(worker_pool(sampler_settings))  # loads model_path per worker
                hf = functools.partial(pool.generate, model_path, tokenizer=tokenizer, dtype=dtype)
            else:
                hf = functools.partial(generate, load_policy(model_path, dtype=dtype), tokenizer)
            # Greedy calls carry one sequence per prompt: as many sequences per call as sampled ones.
            greedy = hf(prompts, batch_size=batch * n, desc=f"{label} greedy", **greedy_kw)
            kill_point("eval.generate")
            sampled = hf(prompts, batch_size=batch, desc=f"{label} pass@k", **sampled_kw)
    # The E-step's guarded judge: a runaway or non-UTF-8 completion is a wrong answer, not a crash.
    greedy_verdicts = judge(task, problems, [g[0]["completion"] for g in greedy], strictness="answer")
    flat_problems = [p for p, s in zip(problems, sampled, strict=True) for _ in s]
    flat_verdicts = judge(
        task, flat_problems, [x["completion"] for s in sampled for x in s], strictness="answer"
    )
    ks = sorted(int(k) for k in settings.ks)
    per_answers = [[v["answer"] for v in flat_verdicts[i * n : (i + 1) * n]] for i in range(len(problems))]
    # maj@k votes by the task's answer equivalence (None for tasks without final answers, e.g. code).
    classes = task.answer_classes(problems, per_answers)
    rows, per_problem = [], []
    for i, (problem, g, gv) in enumerate(zip(problems, greedy, greedy_verdicts, strict=True)):
        verdicts = flat_verdicts[i * n : (i + 1) * n]
        metrics = problem_metrics(
            greedy_correct=gv["reward"] > 0,
            sample_correct=[v["reward"] > 0 for v in verdicts],
            sample_classes=None if classes is None else classes[i],
            ks=ks,
        )
        per_problem.append(metrics)
        rows.append(
            {
                "problem_id": problem["problem_id"],
                "num_steps": problem.get("num_steps"),
                "gold": problem["answer"],
                "greedy_completion": g[0]["completion"],
                "greedy_status": gv["status"],
                "greedy_correct": metrics["greedy_correct"],
                "num_samples": n,
                "num_correct": metrics["num_correct"],
                "sample_answers": per_answers[i],
                "sample_classes": None if classes is None else classes[i],
            }
        )
    result = aggregate(per_problem, ks)
    result["seconds"] = round(time.time() - start, 3)
    result["model"] = str(model_path)
    result["split"] = settings.split
    with atomic_dir(Path(out_dir)) as tmp:
        pl.DataFrame(rows).write_parquet(tmp / PER_PROBLEM)
        write_json(tmp / "metrics.json", result)
        mark_done(tmp, seconds=result["seconds"], inputs=inputs)
    return result


def _generate_on_ray(
    cluster, settings, *, model_path, dtype, tokenizer, prompts, greedy_kw, sampled_kw, batch, label
) -> tuple[list, list]:
    """Greedy and sampled completions of ``prompts`` in one pass of a Ray replica pool: for the HF
    backend in the batches (and with the seeds) the local path uses, so the completions are its own."""
    from factory.config import SamplerConfig
    from factory.sampling.ray_pool import RayReplicas, generate_calls, ray_session
    from factory.sampling.seeds import derive_seed

    settings = settings if settings is not None else OmegaConf.structured(SamplerConfig)
    vllm = settings.backend == "vllm"
    n = int(sampled_kw["num_samples"])
    greedy_seeds = [0] * len(prompts) if vllm else [derive_seed(0, i) for i in range(len(prompts))]
    calls = {
        "greedy": {
            "prompts": prompts,
            "seeds": greedy_seeds,
            "per_job": int(settings.shard_size) if vllm else batch * n,
            **greedy_kw,
        },
        "sampled": {"prompts": prompts, "per_job": int(settings.shard_size) if vllm else batch, **sampled_kw},
    }
    with ray_session(cluster):
        pool = RayReplicas(cluster, settings, policy=model_path, dtype=dtype)
        out = generate_calls(pool, calls, tokenizer=tokenizer, desc=f"{label} on Ray")
    return out["greedy"], out["sampled"]


def run(cfg: DictConfig) -> dict:
    """Evaluates iteration ``iteration``'s model (0: the base); a finished evaluation of the same inputs is
    reported again, one of other inputs refused, as is a model trained from other inputs."""
    from factory.rundir import read_json
    from factory.stage_inputs import stage_inputs

    k = int(cfg.iteration)
    with stage_inputs(cfg) as stages:
        out = stages.run_dir.stage(k, "eval")
        if k > 0:
            if not stages.run_dir.is_done(k, "model"):
                raise FileNotFoundError(
                    f"no finished model at {stages.model_path(k)}: run restem-train iteration={k} first"
                )
            stages.is_current(k, "dataset")
            stages.is_current(k, "model")
        if stages.is_current(k, "eval"):
            return read_json(out / "metrics.json")
        result = evaluate_model(
            model_path=stages.model_path(k),
            task=stages.task,
            problems=stages.eval_problems,
            settings=cfg.eval,
            out_dir=out,
            dtype=cfg.model.dtype,
            label=f"eval iter {k}",
            sampler_settings=cfg.sampler,
            inputs=stages.eval(k),
            cluster=cfg.cluster,
        )
    print(json.dumps(result, indent=2))
    return result


main = hydra_entry(run)
