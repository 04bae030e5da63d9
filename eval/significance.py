"""Standard errors of greedy accuracies and of the gains between two models on the same problems.

A gain of 3 points on 300 problems may be noise. Two models evaluated on the same problems give paired
results (1 = the greedy answer is correct, 0 = not); the gain's standard error is that of the mean of the
per-problem differences, sd(d) / sqrt(n), which is smaller than sqrt(SE_a^2 + SE_b^2) when the two
models' results are positively correlated (both solve the same easy problems), as they usually are.
Both are reported, with the gain in units of the paired SE.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import polars as pl

from eval.evaluate import PER_PROBLEM
from eval.report import SFT_ITERATION, SFT_LABEL

TITLE = "## Greedy gains with standard errors"

log = logging.getLogger(__name__)


def accuracy_se(correct: list[bool]) -> float:
    """Standard error of an accuracy over ``len(correct)`` problems: sqrt(p (1 - p) / n)."""
    n = len(correct)
    if n == 0:
        raise ValueError("no problems: a standard error needs at least one result")
    p = sum(map(bool, correct)) / n
    return math.sqrt(p * (1 - p) / n)


def paired_gain(a: dict[str, bool], b: dict[str, bool]) -> dict:
    """Gain of ``a`` over ``b`` (accuracy points as fractions) on the problems both were evaluated on.

    Args:
        a, b: problem id -> greedy answer correct.

    Returns:
        ``{"n", "gain", "paired_se", "unpaired_se", "a_only", "b_only"}``: ``a_only`` problems only ``a``
        solves, ``b_only`` the reverse.

    Raises:
        ValueError: when the two evaluations share no problem, or cover different problems (a gain over
        different test sets means nothing).
    """
    if set(a) != set(b):
        raise ValueError(
            f"the two evaluations cover different problems ({len(set(a) - set(b))} only in the first, "
            f"{len(set(b) - set(a))} only in the second): their gain is not comparable"
        )
    ids = sorted(a)
    n = len(ids)
    if n < 2:
        raise ValueError(f"{n} problems: a paired standard error needs at least 2")
    diffs = [int(bool(a[i])) - int(bool(b[i])) for i in ids]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return {
        "n": n,
        "gain": mean,
        "paired_se": math.sqrt(var / n),
        "unpaired_se": math.hypot(accuracy_se([a[i] for i in ids]), accuracy_se([b[i] for i in ids])),
        "a_only": sum(d == 1 for d in diffs),
        "b_only": sum(d == -1 for d in diffs),
    }


def read_greedy(eval_dir: Path) -> dict[str, bool]:
    """problem id -> greedy correct, from an eval stage's ``per_problem.parquet``."""
    path = Path(eval_dir) / PER_PROBLEM
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the evaluation did not finish")
    frame = pl.read_parquet(path, columns=["problem_id", "greedy_correct"])
    return dict(zip(frame["problem_id"].to_list(), frame["greedy_correct"].to_list(), strict=True))


def _label(k: int | str) -> str:
    return SFT_LABEL if k == SFT_ITERATION else f"iteration {k}" if k != 0 else "base"


def format_gains(evals: dict[int | str, Path]) -> str:
    """Markdown: each model's greedy SE, and each iteration's gain over the base and over SFT.

    Args:
        evals: iteration (0 = base, ``"sft_human"`` = the baseline) -> its eval stage folder. Iterations
            without a finished evaluation are left out.

    Returns:
        A markdown section ("" when there is no base evaluation or no iteration to compare).
    """
    greedy = {k: read_greedy(d) for k, d in evals.items() if (Path(d) / PER_PROBLEM).is_file()}
    iterations = sorted(k for k in greedy if k not in (0, SFT_ITERATION))
    if 0 not in greedy or not iterations:
        return ""
    lines = [
        TITLE,
        "",
        "Paired over the same test problems: gain = mean of (this model correct − the other correct) per "
        "problem, SE = sd of those differences / √n; the unpaired SE, √(SE₁² + SE₂²), is usually larger "
        "(when both models solve many of the same problems). "
        "*only this / only other*: problems one of the two solves and the other does not.",
        "",
        "| model | greedy | SE | compared with | gain (points) | paired SE | gain / paired SE "
        "| unpaired SE | only this / only other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    others = [0] + ([SFT_ITERATION] if SFT_ITERATION in greedy else [])
    for k in iterations:
        correct = list(greedy[k].values())
        model = f"| {_label(k)} | {100 * sum(map(bool, correct)) / len(correct):.1f}% "
        model += f"| {100 * accuracy_se(correct):.1f} "
        for other in others:
            g = paired_gain(greedy[k], greedy[other])
            ratio = f"{g['gain'] / g['paired_se']:+.1f}" if g["paired_se"] > 0 else "–"
            lines.append(
                f"{model}| {_label(other)} "
                f"| {100 * g['gain']:+.1f} | {100 * g['paired_se']:.1f} | {ratio} "
                f"| {100 * g['unpaired_se']:.1f} | {g['a_only']} / {g['b_only']} |"
            )
    return "\n".join(lines) + "\n"


def gains_section(evals: dict[int | str, Path]) -> str:
    """:func:`format_gains` for the end of a run: an evaluation it cannot compare (other problems, a
    corrupt file) gives a one-line note in the report instead of an error after hours of work."""
    try:
        return format_gains(evals)
    except (ValueError, OSError, pl.exceptions.PolarsError) as err:
        log.warning("no greedy gains in the report: %s", err)
        return f"{TITLE}\n\nNot computed: {err}\n"
