"""E-step throughput of the HF backend on the demo's base model and training problems.

Run: ``.venv/bin/python benchmarks/sampling.py [--problems 256] [--samples 8]`` (``make bench``).
Reports new tokens/s with the shared-prefix KV cache and with plain ``num_return_sequences=K``, measured
back to back in one process; record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=256)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    from factory.base_model import ensure_base_model
    from factory.config import compose
    from factory.models import load_model, load_tokenizer
    from factory.sample import generate
    from factory.tasks import build_task

    cfg = compose()
    path = ensure_base_model(cfg)
    model, tok = load_model(path), load_tokenizer(path)
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    prompts = [
        task.format_prompt(p, tokenizer=tok) for p in task.load_problems(split="train")[: args.problems]
    ]
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(
        f"{len(prompts)} prompts x {args.samples} samples, batch {args.batch_size} prompts, T=0.8, top-k 40"
    )
    for share in (True, False, True):
        start = time.perf_counter()
        out = generate(
            model,
            tok,
            prompts,
            num_samples=args.samples,
            temperature=0.8,
            top_k=40,
            max_new_tokens=cfg.sampler.max_new_tokens,
            batch_size=args.batch_size,
            seed=0,
            progress=False,
            share_prefix=share,
        )
        seconds = time.perf_counter() - start
        tokens = sum(s["num_tokens"] for per in out for s in per)
        label = "shared prefix" if share else "plain generate"
        print(f"{label:15s} {tokens:8d} new tokens in {seconds:6.1f} s = {tokens / seconds:8.0f} tok/s")


if __name__ == "__main__":
    main()
