"""Rows of the math benchmarks (GSM8K, Hendrycks MATH, MATH-500) from local JSONL files or the Hub.

Raw rows are turned into problem dicts with ``problem_id``, ``question``, ``answer`` (gold string),
``solution`` (human-written, ends with the final answer in the task's answer format) and, for MATH,
``level`` and ``subject``. Split selection (human / train / validation / test) lives here too, so the
three tasks share one set of rules.
"""

from __future__ import annotations

import json
import os
import random
import re
from functools import lru_cache
from pathlib import Path

from factory.verifiers.math import extract_gold

DEFAULT_DATA_DIR = "../shared/datasets"
# Calculator annotations such as "<<48/2=24>>": GSM8K's tooling artefact, not part of the prose.
_CALC_RE = re.compile(r"<<[^>]*>>")
_LEVEL_RE = re.compile(r"(\d+)")


def resolve_data_dir(data_dir: str | None) -> Path:
    """The data folder: the given one, else ``$RESTEM_DATA_DIR``, else ``../shared/datasets``."""
    return Path(data_dir or os.environ.get("RESTEM_DATA_DIR") or DEFAULT_DATA_DIR)


def config_fingerprint(cfg, keys: tuple[str, ...]) -> dict:
    """The task config's ``keys`` (resolved): what a task's ``human_data_fingerprint`` hashes into the
    cached base model's key."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(cfg, resolve=True)
    return {k: values.get(k) for k in keys}


def answer_strictness(task, strictness: str | None) -> str:
    """The verify strictness of a task that only judges final answers (math, code): ``answer``."""
    strictness = strictness or task.cfg.strictness
    if strictness != "answer":
        raise ValueError(f"task {task.name!r} only supports strictness='answer', got {strictness!r}")
    return strictness


def prepare_pool(pool: list[dict], cfg, *, task_name: str) -> list[dict]:
    """A benchmark task's training pool after ``task.max_chars`` and ``task.shuffle``.

    Tiny character-level models can only learn short solutions, so ``max_chars`` drops long problems from
    the pool (question + reference solution); the test set is never cut.
    """
    if cfg.max_chars is not None:
        limit = int(cfg.max_chars)
        pool = [p for p in pool if len(p["question"]) + len(p["solution"] or "") <= limit]
    if cfg.shuffle:
        random.Random(f"{cfg.seed}-{task_name}-pool").shuffle(pool)
    return pool


def read_jsonl(path: Path) -> list[dict]:
    """All rows of a JSONL file; a missing file names the path and the setting that locates it.

    Raises:
        FileNotFoundError: When ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"data file {path} not found: set paths.data_dir (default: the RESTEM_DATA_DIR environment "
            f"variable, else {DEFAULT_DATA_DIR} relative to where the command runs) to the folder holding "
            "gsm8k/, math/ and prm800k_math_splits/, or use task.source=hub"
        )
    stat = path.stat()
    return _read_jsonl_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _read_jsonl_cached(path: str, size: int, mtime_ns: int) -> list[dict]:
    # Every stage asks for the same files several times; size and mtime key out a changed file.
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_hub(name: str, config, split: str) -> list[dict]:
    """Rows of a Hugging Face Hub dataset split; ``config`` is a name, None, or a list of names.

    Several configs are concatenated in the given order: ``EleutherAI/hendrycks_math`` ships one
    config per subject.
    """
    import datasets

    configs = [config] if config is None or isinstance(config, str) else list(config)
    rows: list[dict] = []
    for one in configs:
        rows += [dict(r) for r in datasets.load_dataset(name, one, split=split)]
    return rows


def gsm8k_problem(row: dict, *, split: str, index: int) -> dict | None:
    """A GSM8K row as a problem; the solution ends with "The answer is N." (None without a gold)."""
    gold = extract_gold(row["answer"], style="gsm8k")
    if gold is None:
        return None
    rationale = _CALC_RE.sub("", row["answer"].rsplit("####", 1)[0]).rstrip()
    return {
        "problem_id": f"gsm8k-{split}-{index}",
        "question": row["question"],
        "answer": gold,
        "solution": f"{rationale}\nThe answer is {gold}.",
    }


def math_problem(row: dict, *, split: str, index: int) -> dict | None:
    """A MATH / MATH-500 row as a problem; the solution is kept as is (it has ``\\boxed{}``).

    Rows without a usable gold (two MATH problems box nothing) are dropped (None): no sample of
    them could ever be judged correct.
    """
    gold = row.get("answer") or extract_gold(row["solution"], style="boxed")
    if not gold:
        return None
    level = row.get("level")
    if isinstance(level, str):
        match = _LEVEL_RE.search(level)  # "Level 3" -> 3; "Level ?" -> None
        level = int(match.group(1)) if match else None
    return {
        "problem_id": row.get("unique_id") or f"math-{split}-{index}",
        "question": row.get("problem") or row["question"],
        "answer": gold,
        "solution": row["solution"],
        "level": level,
        "subject": row.get("subject") or row.get("type"),
    }


def to_problems(rows: list[dict], *, kind: str, split: str) -> list[dict]:
    """Convert raw rows (file order kept) into problems; ``kind`` is "gsm8k" or "math"."""
    convert = gsm8k_problem if kind == "gsm8k" else math_problem
    problems = [convert(row, split=split, index=i) for i, row in enumerate(rows)]
    return [p for p in problems if p is not None]


def select_split(pool: list[dict], test: list[dict], *, split: str, cfg) -> list[dict]:
    """The problems of one split, following the task config's size knobs.

    ``human`` is the head of the training pool, ``train`` the next ``num_train`` (or from
    ``train_start``), ``validation`` the tail; ``test`` is the benchmark's own test set.

    Raises:
        ValueError: On an unknown split, overlapping human/train and validation, or an empty result.
    """
    num_human, num_validation = int(cfg.num_human), int(cfg.num_validation)
    val_start = len(pool) - num_validation
    train_start = num_human if cfg.train_start is None else int(cfg.train_start)
    num_train = val_start - train_start if cfg.num_train is None else int(cfg.num_train)
    # Only the sizes the config gives must be >= 0: num_train=null (the rest of the pool) comes out
    # negative when the pool is too small, which the next check reports as such.
    if min(num_human, num_validation, train_start, 0 if cfg.num_train is None else num_train) < 0:
        raise ValueError(
            f"task {cfg.name!r}: num_human, num_validation, num_train and train_start must be >= 0 "
            f"(got {num_human}, {num_validation}, {num_train}, {train_start})"
        )
    if num_train < 0 or max(num_human, train_start + num_train) > val_start:
        raise ValueError(
            f"task {cfg.name!r}: the training pool has {len(pool)} problems"
            + (f" left after filtering by max_chars={cfg.max_chars}" if cfg.get("max_chars") else "")
            + ", too few for "
            f"num_human={num_human}, train_start={cfg.train_start}, num_train={cfg.num_train} and a disjoint "
            f"validation tail of num_validation={num_validation}; lower them (or raise max_chars)"
        )
    if split == "human":
        chosen = pool[:num_human]
    elif split == "train":
        chosen = pool[train_start : train_start + num_train]
    elif split == "validation":
        chosen = pool[val_start:]
    elif split == "test":
        chosen = test if cfg.num_test is None else test[: int(cfg.num_test)]
    else:
        raise ValueError(f"split must be one of human, train, validation, test; got {split!r}")
    if not chosen:
        raise ValueError(
            f"task {cfg.name!r}: zero {split!r} problems after filtering (pool of {len(pool)}, "
            f"{len(test)} test; num_human={num_human}, num_train={cfg.num_train}, train_start="
            f"{cfg.train_start}, num_validation={num_validation}, num_test={cfg.num_test}, "
            f"max_chars={cfg.max_chars}); raise the split's size knob or max_chars"
        )
    return chosen
