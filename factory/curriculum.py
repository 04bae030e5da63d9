"""A curriculum from pass rates: which training problems an E-step samples, and how many times each.

A problem's pass rate in an iteration is the share of its samples the verifier judged correct
(``reward > 0``); the verdict shards keep every iteration's, so nothing else is stored. Iteration k plans
from the latest rate each problem has (the last iteration before k that sampled it):

- ``curriculum.skip_solved_at=p``: problems solved at least ``p`` of the time are not sampled again (the
  paper's gains are in the medium and hard buckets); their latest kept solutions are carried into the
  M-step's data (:func:`carried_pairs`), since every M-step trains the base model afresh;
- ``curriculum.rare_below=q`` with ``curriculum.rare_samples=n``: problems solved less than ``q`` of the
  time (never-solved ones included) get ``n`` samples instead of ``sampler.num_samples``.

Iteration 1 (no rates yet) and problems no iteration has sampled take ``sampler.num_samples`` each. With
both keys null (the default) every problem is sampled ``sampler.num_samples`` times, as in the paper.

The report's yield by difficulty buckets the problems by iteration 1's pass rates (the base policy's
difficulty; the sweep report's buckets, ``eval.metrics.DIFFICULTY_BUCKETS``), so that every iteration is
read over the same problem sets (:func:`yield_by_bucket`).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from omegaconf import DictConfig

from eval.metrics import DIFFICULTY_BUCKETS, difficulty_bucket
from factory.rundir import scan_shards


def is_active(cfg: DictConfig) -> bool:
    """Whether the curriculum changes anything (both keys null: every problem, ``sampler.num_samples``)."""
    c = cfg.curriculum
    return c.skip_solved_at is not None or c.rare_below is not None


def pass_rates(verdicts_dir: Path) -> pl.DataFrame:
    """Per problem of one finished verdicts stage: ``num_samples``, ``num_correct``, ``pass_rate``."""
    return (
        scan_shards(verdicts_dir)
        .group_by("problem_id")
        .agg(num_samples=pl.len(), num_correct=(pl.col("reward") > 0).sum())
        .with_columns(pass_rate=pl.col("num_correct") / pl.col("num_samples"))
        .sort("problem_id")
        .collect()
    )


def latest_pass_rates(run_dir, iteration: int) -> dict[str, float]:
    """Each problem's pass rate in the last iteration before ``iteration`` that sampled it."""
    rates: dict[str, float] = {}
    for k in range(1, iteration):
        if not run_dir.is_done(k, "verdicts"):
            raise FileNotFoundError(
                f"the curriculum of iteration {iteration} needs iteration {k}'s verdicts, which are not "
                f"finished ({run_dir.stage(k, 'verdicts')}): run the loop from iteration {k}"
            )
        rates.update(pass_rates(run_dir.stage(k, "verdicts")).select("problem_id", "pass_rate").iter_rows())
    return rates


def plan(
    problems: list[dict], rates: dict[str, float], cfg: DictConfig
) -> tuple[list[dict], dict[str, int] | None]:
    """The problems iteration k samples (in their order) and the samples each gets; (``problems``, None)
    when the plan changes nothing (the plain E-step).

    Args:
        problems: every training problem.
        rates: problem id -> latest pass rate (:func:`latest_pass_rates`); unknown ids keep the default.
        cfg: the run's config (``curriculum``, ``sampler.num_samples``).
    """
    c, default = cfg.curriculum, int(cfg.sampler.num_samples)
    kept, counts = [], {}
    for problem in problems:
        rate = rates.get(problem["problem_id"])
        if rate is not None and c.skip_solved_at is not None and rate >= c.skip_solved_at:
            continue
        rare = rate is not None and c.rare_below is not None and rate < c.rare_below
        kept.append(problem)
        counts[problem["problem_id"]] = int(c.rare_samples) if rare else default
    if len(kept) == len(problems) and set(counts.values()) <= {default}:
        return problems, None  # no change (iteration 1): the plain E-step, its inputs and the sample cache
    return kept, counts


def carried_pairs(run_dir, iteration: int, sampled: set[str]) -> list[dict]:
    """The kept solutions of the problems iteration ``iteration`` skipped, from the latest earlier snapshot
    that has some: the M-step trains the base model on one iteration's data, so without them a skipped
    (already solved) problem would drop out of every later model's training data."""
    from datasets import load_from_disk

    carried: dict[str, list[dict]] = {}
    for k in range(iteration - 1, 0, -1):
        if not run_dir.is_done(k, "dataset"):
            continue
        ds = load_from_disk(str(run_dir.stage(k, "dataset")))["train"]
        found: dict[str, list[dict]] = {}
        for pid, prompt, completion in zip(ds["problem_id"], ds["prompt"], ds["completion"], strict=True):
            if pid not in sampled and pid not in carried:
                found.setdefault(pid, []).append({"prompt": prompt, "completion": completion})
        carried.update(found)
    return [pair for pid in sorted(carried) for pair in carried[pid]]


def validate_curriculum(cfg: DictConfig) -> None:
    """Config errors for ``curriculum.*`` (called by ``factory.config.validate``)."""
    c = cfg.curriculum
    for key in ("skip_solved_at", "rare_below"):
        value = c[key]
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"config error: curriculum.{key} must be in (0, 1] or null, got {value}")
    if c.rare_samples is not None and c.rare_below is None:
        raise ValueError("config error: curriculum.rare_samples is set but curriculum.rare_below is null")
    if is_active(cfg) and cfg.snapshot.get("label", "gold") == "majority":
        raise ValueError(
            "config error: curriculum.* with snapshot.label=majority: pass rates are judged against the "
            "gold, which majority labelling must not read (turn the curriculum off)"
        )
    if c.rare_below is not None and (
        c.rare_samples is None or c.rare_samples <= int(cfg.sampler.num_samples)
    ):
        raise ValueError(
            "config error: curriculum.rare_below needs curriculum.rare_samples > sampler.num_samples "
            f"({cfg.sampler.num_samples}), got {c.rare_samples}"
        )
    if c.skip_solved_at is not None and c.rare_below is not None and c.rare_below > c.skip_solved_at:
        raise ValueError(
            f"config error: curriculum.rare_below ({c.rare_below}) must be <= curriculum.skip_solved_at "
            f"({c.skip_solved_at})"
        )


def yield_by_bucket(run_dir, iterations: list[int]) -> list[dict]:
    """Rows (iteration, bucket, problems, samples, correct, yield, problems solved) for each iteration with
    finished verdicts; buckets by iteration 1's pass rates. Empty when iteration 1 has no verdicts."""
    if not iterations or not run_dir.is_done(1, "verdicts"):
        return []
    first = pass_rates(run_dir.stage(1, "verdicts"))
    buckets = first.select(
        "problem_id", pl.col("pass_rate").map_elements(difficulty_bucket, return_dtype=pl.String)
    )
    buckets = buckets.rename({"pass_rate": "bucket"})
    rows = []
    for k in iterations:
        if not run_dir.is_done(k, "verdicts"):
            continue
        per_bucket = (
            pass_rates(run_dir.stage(k, "verdicts"))
            .join(buckets, on="problem_id", how="left")
            .with_columns(pl.col("bucket").fill_null("new"))
            .group_by("bucket")
            .agg(
                problems=pl.len(),
                samples=pl.col("num_samples").sum(),
                correct=pl.col("num_correct").sum(),
                solved=(pl.col("num_correct") > 0).sum(),
            )
        )
        by_name = {r["bucket"]: r for r in per_bucket.iter_rows(named=True)}
        for name in [*DIFFICULTY_BUCKETS, "new"]:
            if name in by_name:
                r = by_name[name]
                rows.append(
                    {"iteration": k, **r, "yield": r["correct"] / r["samples"] if r["samples"] else 0.0}
                )
    return rows


def format_yield(rows: list[dict]) -> str:
    """The report's section: yield (correct / samples) and problems solved per bucket and iteration."""
    if not rows:
        return ""
    lines = [
        "## Yield by difficulty",
        "",
        "Training problems bucketed by iteration 1's pass rate (the base policy's share of correct "
        "samples). Yield = correct samples / samples of the bucket's problems in that iteration's "
        "E-step; problems the curriculum skipped are not in that iteration's counts.",
        "",
        "| iteration | bucket | problems sampled | samples | correct | yield | problems solved |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['iteration']} | {r['bucket']} | {r['problems']} | {r['samples']} | {r['correct']} | "
            f"{100.0 * r['yield']:.1f}% | {r['solved']} |"
        )
    return "\n".join(lines) + "\n"
