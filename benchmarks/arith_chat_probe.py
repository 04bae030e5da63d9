"""Base rate of an instruct model on the arith task with the chat prompt (docs/arith_chat.md).

Greedy-decodes validation problems under several instruction wordings and reports accuracy under the
``answer`` and ``steps`` strictness and how many completions were unparseable; then draws K samples at
temperature T on train problems with the chosen wording and counts the problems with >= 1 correct
sample (what a ReST-EM E-step would keep). Completions go to ``--out`` as JSONL for inspection::

    nice -n 19 .venv/bin/python benchmarks/arith_chat_probe.py \\
        --model /work/models/SmolLM2-135M-Instruct --out /tmp/arith_chat_probe.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from omegaconf import OmegaConf

from factory.config import ArithTaskConfig, VllmSamplerConfig
from factory.tasks import ArithTask
from factory.tasks.arith import CHAT_INSTRUCTION, format_chat_prompt

WORDINGS = {
    "final_number": 'Solve it step by step and end with "The answer is N." where N is the final number.',
    "equations": (
        "Solve it step by step, writing each calculation as an equation such as 3 + 4 = 7. "
        'End with "The answer is N." where N is the final number.'
    ),
    "short": CHAT_INSTRUCTION,  # the best of the three on SmolLM2-135M-Instruct (docs/arith_chat.md)
}


def _score(task: ArithTask, problems: list[dict], completions: list[str]) -> dict:
    answer = task.verify(problems, completions, strictness="answer")
    steps = task.verify(problems, completions, strictness="steps")
    return {
        "answer_correct": sum(v["reward"] > 0 for v in answer),
        "steps_correct": sum(v["reward"] > 0 for v in steps),
        "unparseable": sum(v["status"] == "unparseable" for v in answer),
        "statuses": dict(Counter(v["status"] for v in answer)),
        "verdicts": answer,
        "steps_verdicts": steps,
    }


def rescore(path: Path) -> None:
    """Print the summaries of a saved probe file, judged with the current verifier."""
    task = ArithTask(OmegaConf.merge(OmegaConf.structured(ArithTaskConfig), {"prompt_style": "chat"}))
    groups: dict[tuple, list[dict]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        groups.setdefault((row["wording"], row["temperature"]), []).append(row)
    for (wording, temperature), rows in groups.items():
        problems = [{"answer": r["gold"]} for r in rows]
        score = _score(task, problems, [r["completion"] for r in rows])
        summary = {k: v for k, v in score.items() if "verdicts" not in k}
        solved = {}
        if temperature > 0:
            for name, mode in (("answer", "verdicts"), ("steps", "steps_verdicts")):
                per: dict[str, bool] = {}
                for r, v in zip(rows, score[mode], strict=True):
                    per[r["problem_id"]] = per.get(r["problem_id"], False) or v["reward"] > 0
                solved[f"solved_{name}"] = f"{sum(per.values())}/{len(per)}"
        print(json.dumps({"wording": wording, "T": temperature, "n": len(rows), **solved, **summary}))


def main() -> None:
    """Run the probe and print one JSON summary per wording and one for the sampled train problems."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="/work/models/SmolLM2-135M-Instruct")
    parser.add_argument("--out", type=Path, default=Path("arith_chat_probe.jsonl"))
    parser.add_argument("--num-validation", type=int, default=100)
    parser.add_argument("--num-train", type=int, default=50)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40, help="0: off; 40 is conf/sampler/*.yaml's default")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--wordings", default=",".join(WORDINGS), help="comma-separated keys of WORDINGS")
    parser.add_argument("--sample-wording", default="short", help="wording used for the train samples")
    parser.add_argument("--rescore", type=Path, help="judge a saved --out file again with today's verifier")
    args = parser.parse_args()
    if args.rescore:
        rescore(args.rescore)
        return

    from factory.models import load_tokenizer
    from factory.sample import open_vllm

    task = ArithTask(OmegaConf.merge(OmegaConf.structured(ArithTaskConfig), {"prompt_style": "chat"}))
    validation = task.load_problems(split="validation", limit=args.num_validation)
    train = task.load_problems(split="train", limit=args.num_train)
    tokenizer = load_tokenizer(args.model)
    settings = OmegaConf.merge(OmegaConf.structured(VllmSamplerConfig), {"dtype": "float32"})
    rows = []
    start = time.time()
    args.out.write_text("")  # rows are appended as each part finishes, so a cut-short run keeps them
    with open_vllm(args.model, tokenizer=tokenizer, settings=settings) as vllm:
        print(f"vLLM ready in {time.time() - start:.0f} s", flush=True)
        for key in [k for k in args.wordings.split(",") if k]:
            prompts = [format_chat_prompt(p, tokenizer, instruction=WORDINGS[key]) for p in validation]
            t0 = time.time()
            out = vllm.generate(
                prompts,
                num_samples=1,
                temperature=0.0,
                max_new_tokens=args.max_new_tokens,
                seeds=[0] * len(prompts),
            )
            completions = [o[0]["completion"] for o in out]
            score = _score(task, validation, completions)
            summary = {k: v for k, v in score.items() if "verdicts" not in k}
            print(
                json.dumps({"wording": key, "n": len(validation), **summary, "s": round(time.time() - t0)}),
                flush=True,
            )
            rows += _rows(key, 0.0, validation, completions, score)
            _append(args.out, rows)
        prompts = [format_chat_prompt(p, tokenizer, instruction=WORDINGS[args.sample_wording]) for p in train]
        t0 = time.time()
        out = vllm.generate(
            prompts,
            num_samples=args.samples,
            temperature=args.temperature,
            top_k=args.top_k,
            max_new_tokens=args.max_new_tokens,
            seeds=[1000 * i for i in range(len(prompts))],
        )
    flat_problems = [p for p, o in zip(train, out, strict=True) for _ in o]
    flat = [s["completion"] for o in out for s in o]
    score = _score(task, flat_problems, flat)
    k = args.samples
    solved = {
        mode: sum(any(v["reward"] > 0 for v in verdicts[i * k : (i + 1) * k]) for i in range(len(train)))
        for mode, verdicts in (("answer", score["verdicts"]), ("steps", score["steps_verdicts"]))
    }
    summary = {key: v for key, v in score.items() if "verdicts" not in key}
    print(
        json.dumps(
            {
                "train_samples": len(flat),
                "k": k,
                "T": args.temperature,
                "top_k": args.top_k,
                "problems": len(train),
                "solved_answer": solved["answer"],
                "solved_steps": solved["steps"],
                **summary,
                "s": round(time.time() - t0),
            }
        )
    )
    rows += _rows(args.sample_wording, args.temperature, flat_problems, flat, score)
    _append(args.out, rows)


def _rows(wording: str, temperature: float, problems, completions, score: dict) -> list[dict]:
    """One JSONL row per judged completion: the answer verdict and the steps verdict side by side."""
    return [
        {
            "wording": wording,
            "temperature": temperature,
            "problem_id": p["problem_id"],
            "gold": p["answer"],
            "completion": c,
            "status": v["status"],
            "detail": v["detail"],
            "steps": sv["status"],
            "steps_detail": sv["detail"],
        }
        for p, c, v, sv in zip(problems, completions, score["verdicts"], score["steps_verdicts"], strict=True)
    ]


def _append(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to the JSONL file and empty the list."""
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    rows.clear()


if __name__ == "__main__":
    main()
