"""Majority-vote pseudo-labels (``snapshot.label=majority``): labels for problems without a gold answer.

A problem's label is the answer most of its K samples agree on, votes grouped by the task's own
equivalence (``task.group_answers``: math-verify for the math tasks, integers for arith), when that class
is the unique largest one, has at least ``min_votes`` votes and at least ``min_share`` of the K samples
(K counts every sample, with or without an answer). Samples that agree with the label are kept (with
arith's ``strictness=steps`` only those whose working checks out); dedupe and the cap apply after.

Selection reads only what the verifier extracted from each sample (``answer``, ``steps_valid``) and the
sample's finish reason, never the gold nor the verdict's reward. The gold is used only to measure, so
the numbers below are honest whenever the problems do have one: label precision (labels the verifier
judges equal to the hidden gold / labelled problems with a gold) and kept precision (kept samples whose
verdict reward > 0 / kept samples of problems with a gold), next to what gold selection would have kept.

Samples cut at the token limit do not vote (they still count in K): their text stops mid-solution, so
what the extractor finds in it is an answer the model did not finish committing to, and they are never
kept either, so a label they carried would rest on samples that cannot enter the dataset.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import polars as pl

KEY = ["problem_id", "sample_idx"]


@dataclass
class Majority:
    """What majority selection needs: the task (its ``group_answers``; its ``answer_classes`` and the
    problems' golds only to measure) and the thresholds."""

    task: object
    problems: list[dict]
    min_votes: int = 2
    min_share: float = 0.5
    require_steps: bool = False  # arith's strictness=steps: kept samples must also have valid steps

    def __post_init__(self):
        if self.min_votes < 2:  # one vote would label a problem whose samples all disagree
            raise ValueError(f"config error: snapshot.min_votes must be >= 2, got {self.min_votes}")
        if not 0.0 < self.min_share <= 1.0:
            raise ValueError(f"config error: snapshot.min_share must be in (0, 1], got {self.min_share}")

    @classmethod
    def from_config(cls, cfg, *, task, problems: list[dict]) -> Majority:
        """The settings of ``cfg.snapshot`` (and ``task.strictness``) for ``task``'s training problems."""
        if not hasattr(task, "group_answers"):
            raise ValueError(
                f"config error: snapshot.label=majority needs final answers to vote on; task {task.name} "
                "has none (use snapshot.label=gold)"
            )
        return cls(
            task=task,
            problems=problems,
            min_votes=int(cfg.snapshot.min_votes),
            min_share=float(cfg.snapshot.min_share),
            require_steps=cfg.task.get("strictness") == "steps",
        )


def has_gold(problem: dict) -> bool:
    """Whether a problem carries a gold answer to measure a label against."""
    answer = problem.get("answer")
    return answer is not None and bool(str(answer).strip())


def vote(
    samples: pl.DataFrame | pl.LazyFrame, verdicts: pl.DataFrame | pl.LazyFrame, majority: Majority
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Labels each problem by majority vote and picks the samples that agree with its label.

    Reads the samples' keys and finish reasons and the verdicts' ``answer`` (and ``steps_valid``) only.

    Returns:
        (one row per problem: ``problem_id``, ``num_samples`` (K), ``num_votes`` (the largest class's
        votes), ``label`` (the first voting answer of the label's class, or null);
        the ``problem_id``/``sample_idx`` keys of the samples that agree with the label)
    """
    samples, verdicts = samples.lazy(), verdicts.lazy()
    names = samples.collect_schema().names()
    cut = (
        (pl.col("finish_reason") == "length").fill_null(False) if "finish_reason" in names else pl.lit(False)
    )
    steps = pl.col("steps_valid") if "steps_valid" in verdicts.collect_schema().names() else pl.lit(None)
    rows = (
        samples.select(*KEY, cut.alias("cut"))
        .join(
            verdicts.select(*KEY, "answer", steps.cast(pl.Boolean).alias("steps_valid")), on=KEY, how="left"
        )
        .sort(KEY)
        .group_by("problem_id", maintain_order=True)
        .agg("sample_idx", "answer", "cut", "steps_valid")
        .collect()
    )
    answers = rows["answer"].to_list()
    classes = majority.task.group_answers(answers) if answers else []
    labels, agreeing = [], []
    for pid, idxs, texts, cuts, steps_ok, ids in zip(
        rows["problem_id"],
        rows["sample_idx"],
        answers,
        rows["cut"],
        rows["steps_valid"],
        classes,
        strict=True,
    ):
        tally = Counter(c for c, is_cut in zip(ids, cuts, strict=True) if c is not None and not is_cut)
        top = tally.most_common(2)
        votes = top[0][1] if top else 0
        # A tie for the largest class is never labelled: the samples do not agree on one answer.
        unique = bool(top) and (len(top) == 1 or top[1][1] < votes)
        enough = votes >= majority.min_votes and votes / len(idxs) >= majority.min_share
        label_class = top[0][0] if unique and enough else None
        label = None
        if label_class is not None:
            label = next(
                t for t, c, is_cut in zip(texts, ids, cuts, strict=True) if c == label_class and not is_cut
            )
            agreeing += [
                (pid, idx)
                for idx, c, ok in zip(idxs, ids, steps_ok, strict=True)
                if c == label_class and (ok or not majority.require_steps)
            ]
        labels.append((pid, len(idxs), votes, label))
    label_frame = pl.DataFrame(
        labels,
        schema={"problem_id": pl.String, "num_samples": pl.Int64, "num_votes": pl.Int64, "label": pl.String},
        orient="row",
    )
    chosen = pl.DataFrame(agreeing, schema={"problem_id": pl.String, "sample_idx": pl.Int32}, orient="row")
    return label_frame, chosen


def measure(
    labels: pl.DataFrame,
    kept: pl.DataFrame,
    verdicts: pl.DataFrame | pl.LazyFrame,
    majority: Majority,
    *,
    gold_counts: dict,
) -> dict:
    """The pseudo-labels' quality against the hidden gold (see the module docstring), for the manifest.

    Args:
        labels: :func:`vote`'s per-problem frame.
        kept: The rows the snapshot kept (after dedupe and the cap).
        verdicts: The verdicts (their reward was judged against the gold).
        majority: Its task judges each label against its problem's gold (``task.answer_classes``).
        gold_counts: ``select_kept``'s counts of gold selection on the same samples, for comparison.
    """
    by_id = {p["problem_id"]: p for p in majority.problems}
    labelled = labels.filter(pl.col("label").is_not_null())
    with_gold = [
        (pid, label)
        for pid, label in zip(labelled["problem_id"], labelled["label"], strict=True)
        if pid in by_id and has_gold(by_id[pid])
    ]
    judged = (
        majority.task.answer_classes(
            [by_id[pid] for pid, _ in with_gold], [[label] for _, label in with_gold]
        )
        if with_gold
        else []
    )
    num_correct_labels = sum(1 for classes in judged if classes[0] == 0)
    gold_ids = [pid for pid, p in by_id.items() if has_gold(p)]
    kept_rewards = (
        kept.select(KEY)
        .filter(pl.col("problem_id").is_in(gold_ids))
        .join(verdicts.lazy().select(*KEY, "reward").collect(), on=KEY, how="left")
    )
    num_kept_correct = int((kept_rewards["reward"].fill_null(0) > 0).sum())
    return {
        "num_problems": labels.height,
        "num_labelled": labelled.height,
        "num_labelled_with_gold": len(with_gold),
        "num_labels_correct": num_correct_labels,
        "label_precision": _ratio(num_correct_labels, len(with_gold)),
        "num_kept": kept.height,
        "num_kept_with_gold": kept_rewards.height,
        "num_kept_correct": num_kept_correct,
        "kept_precision": _ratio(num_kept_correct, kept_rewards.height),
        "gold_num_kept": gold_counts["num_kept"],
        "gold_num_problems_solved": gold_counts["num_problems_solved"],
        "min_votes": majority.min_votes,
        "min_share": majority.min_share,
    }


def format_section(manifests: dict[int, dict]) -> str:
    """The report's "Pseudo-labels" section: one row per iteration labelled by majority vote ("" if none)."""
    rows = {k: m["pseudo_labels"] for k, m in sorted(manifests.items()) if m.get("pseudo_labels")}
    if not rows:
        return ""
    lines = [
        "## Pseudo-labels (majority vote)",
        "",
        "Labels chosen by majority vote with the gold hidden; the gold is used only for these numbers. Label "
        "precision: labels the verifier judges equal to the gold / labelled problems with a gold. Kept "
        "precision: kept samples the verifier judged correct / kept samples of problems with a gold.",
        "",
        "| iteration | labelled / problems | label precision | kept | kept precision | gold selection would keep |",
        "|---|---|---|---|---|---|",
    ]
    for k, s in rows.items():
        lines.append(
            f"| {k} | {s['num_labelled']} / {s['num_problems']} | {_pct(s['label_precision'])} "
            f"({s['num_labels_correct']}/{s['num_labelled_with_gold']}) | {s['num_kept']} | "
            f"{_pct(s['kept_precision'])} ({s['num_kept_correct']}/{s['num_kept_with_gold']}) | "
            f"{s['gold_num_kept']} samples, {s['gold_num_problems_solved']} problems |"
        )
    return "\n".join(lines) + "\n"


def read_manifests(run_dir, iterations) -> dict[int, dict]:
    """The finished snapshots' manifests of ``iterations`` (for :func:`format_section`)."""
    from factory.rundir import read_json

    found = {}
    for k in iterations:
        path = Path(run_dir.stage(k, "dataset")) / "manifest.json"
        if run_dir.is_done(k, "dataset") and path.is_file():
            found[k] = read_json(path)
    return found


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
