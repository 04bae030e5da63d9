"""Majority-vote pseudo-labels (``snapshot.label=majority``): planted GSM8K completions judged by the real
math verifier (no model), thresholds, ties, all-disagree, gold hidden from selection, problems without a
gold, config errors, versions; and the arith loop on the tiny model reporting the labels' precision."""

from __future__ import annotations

from collections import Counter

import polars as pl
import pytest
from conftest import DATA_DIR, needs_data
from datasets import load_from_disk

from factory.config import compose
from factory.judge import judge
from factory.pseudo_labels import Majority, vote
from factory.rundir import read_json
from factory.snapshot import build_snapshot, measure_pseudo_labels, select_kept, select_majority
from factory.tasks import build_task
from factory.verifiers import arith as arith_verifier

NONE = "I am not sure how to finish this."  # no answer: it counts in K but does not vote


def _plan(golds: list[str]) -> list[list[tuple[str, str]]]:
    """Per problem, (completion, finish_reason) of its 4 samples; answers in several written forms."""
    g = [int(x) for x in golds]

    def says(value, i):
        forms = [
            f"The answer is {value}.",
            f"So \\boxed{{{value}}}",
            f"#### {value}",
            f"The answer is {value}.0.",
        ]
        return f"Step {i}: we work it out. {forms[i % 4]}"

    stop = "stop"
    return [
        [(says(g[0], i), stop) for i in range(4)],  # all agree with the gold (4 forms, one class)
        [(says(g[1] + 1, i), stop) for i in range(3)] + [(says(g[1], 3), stop)],  # majority is wrong
        [(says(g[2] + i, i), stop) for i in range(4)],  # all disagree: never labelled
        [(says(g[3], 0), stop), (says(g[3], 1), stop), (says(g[3] + 1, 2), stop), (says(g[3] + 1, 3), stop)],
        [(says(g[4], 0), stop), (says(g[4], 1), stop), (NONE, stop), (NONE + " 2", stop)],  # 2 of 4
        [(says(g[5], 0), stop), (NONE, stop), (NONE + " 2", stop), (NONE + " 3", stop)],  # 1 vote
        # The cut sample agrees but does not vote and is never kept.
        [(says(g[6], 0), stop), (says(g[6], 1), stop), (says(g[6], 2), "length"), (says(g[6] + 1, 3), stop)],
    ]


def _frames(task, problems: list[dict], plan) -> tuple[pl.DataFrame, pl.DataFrame]:
    rows = [
        (p, i, text, reason)
        for p, samples in zip(problems, plan, strict=True)
        for i, (text, reason) in enumerate(samples)
    ]
    samples = pl.DataFrame(
        {
            "problem_id": [p["problem_id"] for p, *_ in rows],
            "sample_idx": [i for _, i, *_ in rows],
            "prompt": [p["question"] for p, *_ in rows],
            "completion": [text for _, _, text, _ in rows],
            "num_tokens": [len(text) for _, _, text, _ in rows],
            "finish_reason": [reason for *_, reason in rows],
        }
    ).with_columns(pl.col("sample_idx").cast(pl.Int32))
    verdicts = judge(task, [p for p, *_ in rows], samples["completion"].to_list())
    verdict_frame = pl.DataFrame(
        {
            "problem_id": samples["problem_id"],
            "sample_idx": samples["sample_idx"],
            **{k: [v[k] for v in verdicts] for k in ("reward", "status", "detail", "answer")},
        }
    )
    return samples, verdict_frame


@pytest.fixture(scope="module")
def gsm8k():
    needs_data("gsm8k/train.jsonl", "gsm8k/test.jsonl")
    cfg = compose(["task=gsm8k", f"paths.data_dir={DATA_DIR}", "task.num_train=7", "snapshot.label=majority"])
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    problems = task.load_problems(split="train")
    assert len(problems) == 7 and all(p["answer"].isdigit() for p in problems)
    plan = _plan([p["answer"] for p in problems])
    samples, verdicts = _frames(task, problems, plan)
    yield cfg, task, problems, plan, samples, verdicts
    task.close()


def _labelled(labels: pl.DataFrame) -> dict[int, str]:
    return {i: label for i, label in enumerate(labels["label"]) if label is not None}


def test_gsm8k_majority_labels_and_their_precision(gsm8k):
    cfg, task, problems, _, samples, verdicts = gsm8k
    # Every wrong answer is extracted too (the votes), not only the correct ones.
    assert verdicts.filter(pl.col("status") == "wrong")["answer"].null_count() == 0
    majority = Majority.from_config(cfg, task=task, problems=problems)
    labels, _ = vote(samples, verdicts, majority)
    golds = [int(p["answer"]) for p in problems]
    labelled = _labelled(labels)
    assert sorted(labelled) == [0, 1, 4, 6]  # not 2 (all disagree), 3 (tie), 5 (one vote)
    assert float(labelled[1]) == golds[1] + 1 and all(float(labelled[i]) == golds[i] for i in (0, 4, 6))
    assert labels["num_votes"].to_list() == [4, 3, 1, 2, 2, 1, 2]  # the cut sample of problem 6 did not vote
    kept, counts, stats = select_majority(samples, verdicts, majority, max_per_problem=10, dedupe=True)
    assert Counter(kept["problem_id"]) == {
        problems[0]["problem_id"]: 4,
        problems[1]["problem_id"]: 3,
        problems[4]["problem_id"]: 2,
        problems[6]["problem_id"]: 2,
    }
    assert counts["num_dropped_truncated"] == 1 and counts["num_problems_solved"] == 4
    assert stats["num_problems"] == 7 and stats["num_labelled"] == 4
    assert (stats["num_labels_correct"], stats["num_labelled_with_gold"]) == (3, 4)
    assert stats["label_precision"] == 0.75
    assert (stats["num_kept_correct"], stats["num_kept"]) == (8, 11) and stats["kept_precision"] == 8 / 11
    # Gold selection on the same samples: every gold answer (the cut one dropped), 7 problems.
    assert (stats["gold_num_kept"], stats["gold_num_problems_solved"]) == (13, 7)


@pytest.mark.parametrize(
    ("min_votes", "min_share", "expected"),
    [(2, 0.5, [0, 1, 4, 6]), (2, 0.6, [0, 1]), (3, 0.5, [0, 1]), (4, 0.5, [0]), (2, 0.01, [0, 1, 4, 6])],
)
def test_thresholds_ties_and_disagreement(gsm8k, min_votes, min_share, expected):
    _, task, problems, _, samples, verdicts = gsm8k
    labels, _ = vote(samples, verdicts, Majority(task, problems, min_votes=min_votes, min_share=min_share))
    assert sorted(_labelled(labels)) == expected  # 2 (all disagree) and 3 (tie) never, at any threshold


def test_gold_never_influences_what_is_kept(gsm8k):
    cfg, task, problems, plan, samples, verdicts = gsm8k
    corrupted = [{**p, "answer": str(int(p["answer"]) + 7)} for p in problems]
    corrupted[2] = {**corrupted[2], "answer": None}
    _, bad_verdicts = _frames(task, corrupted, plan)
    assert not bad_verdicts["reward"].equals(verdicts["reward"])
    kept, _, _ = select_majority(
        samples,
        verdicts,
        Majority.from_config(cfg, task=task, problems=problems),
        max_per_problem=10,
        dedupe=True,
    )
    bad_kept, _, bad_stats = select_majority(
        samples,
        bad_verdicts,
        Majority.from_config(cfg, task=task, problems=corrupted),
        max_per_problem=10,
        dedupe=True,
    )
    assert bad_kept.equals(kept)
    assert bad_stats["label_precision"] == 0.0  # measured against the (corrupted) gold: all labels "wrong"
    gold_kept, _ = select_kept(samples, verdicts, max_per_problem=10, dedupe=True)
    bad_gold_kept, _ = select_kept(samples, bad_verdicts, max_per_problem=10, dedupe=True)
    assert not bad_gold_kept.equals(gold_kept)  # gold selection does follow the gold


def test_problems_without_a_gold_are_labelled_and_left_out_of_precision(gsm8k, tmp_path):
    cfg, task, problems, plan, samples, _ = gsm8k
    no_gold = [{**p, "answer": None if i in (0, 1) else p["answer"]} for i, p in enumerate(problems)]
    no_gold[5] = {**no_gold[5], "answer": "  "}
    samples, verdicts = _frames(task, no_gold, plan)
    first = verdicts.filter(pl.col("problem_id") == problems[0]["problem_id"])
    assert set(first["status"]) == {"no_gold"} and first["answer"].null_count() == 0
    assert set(first["reward"]) == {0.0}
    samples_dir, verdicts_dir = tmp_path / "samples", tmp_path / "verdicts"
    samples_dir.mkdir(), verdicts_dir.mkdir()
    samples.write_parquet(samples_dir / "shard-00000.parquet")
    verdicts.write_parquet(verdicts_dir / "shard-00000.parquet")
    manifest = build_snapshot(
        samples_dir=samples_dir,
        verdicts_dir=verdicts_dir,
        out_dir=tmp_path / "dataset",
        max_per_problem=10,
        dedupe=True,
        lineage={"iteration": 1, "task": "gsm8k"},
        settings={},
        majority=Majority.from_config(cfg, task=task, problems=no_gold),
    )
    stats = manifest["pseudo_labels"]
    assert manifest["label"] == "majority" and stats["num_labelled"] == 4  # the same 4 problems
    assert (stats["num_labels_correct"], stats["num_labelled_with_gold"]) == (2, 2)  # problems 4 and 6
    assert (stats["num_kept_correct"], stats["num_kept_with_gold"], stats["num_kept"]) == (4, 4, 11)
    assert read_json(tmp_path / "dataset" / "manifest.json")["pseudo_labels"] == stats
    assert len(load_from_disk(str(tmp_path / "dataset"))["train"]) == 11
    card = (tmp_path / "dataset" / "README.md").read_text()
    assert "| label precision vs the hidden gold | 100.0% (2/2) |" in card and "pseudo_labels:" in card


def test_arith_verifier_without_a_gold_and_integer_votes():
    verdicts = arith_verifier.verify_batch(
        ["3+4=7. Answer: 7", "Answer: 7", "no idea"], [None, "", None], strictness="steps"
    )
    assert [(v["status"], v["answer"], v["steps_valid"], v["reward"]) for v in verdicts] == [
        ("no_gold", "7", True, 0.0),
        ("no_gold", "7", False, 0.0),
        ("unparseable", None, False, 0.0),
    ]
    assert arith_verifier.group_answers([["7", "007", None, "8", "7"], []]) == [[1, 1, None, 2, 1], []]


def test_arith_steps_strictness_keeps_only_valid_working(make_cfg):
    cfg = make_cfg("snapshot.label=majority", "task.strictness=steps")
    task = build_task(cfg.task)
    problems = [{"problem_id": "p", "answer": None}]
    completions = ["3+4=7. Answer: 7", "3+4=8. Answer: 7", "Answer: 7", "Answer: 5"]
    verdicts = task.verify(problems * 4, completions)
    frame = pl.DataFrame(
        {
            "problem_id": ["p"] * 4,
            "sample_idx": pl.Series(range(4), dtype=pl.Int32),
            "completion": completions,
            "prompt": ["Q"] * 4,
            "num_tokens": [1] * 4,
            **{k: [v[k] for v in verdicts] for k in ("reward", "status", "detail", "answer", "steps_valid")},
        }
    )
    samples = frame.select("problem_id", "sample_idx", "prompt", "completion", "num_tokens")
    majority = Majority.from_config(cfg, task=task, problems=problems)
    assert majority.require_steps
    labels, chosen = vote(samples, frame.drop("prompt", "completion", "num_tokens"), majority)
    assert labels["label"].to_list() == ["7"] and labels["num_votes"].to_list() == [3]
    assert chosen["sample_idx"].to_list() == [0]  # the other two agree, but their working does not check


def test_config_errors(make_cfg):
    with pytest.raises(ValueError, match="snapshot.label='vote'"):
        make_cfg("snapshot.label=vote")
    with pytest.raises(ValueError, match="snapshot.min_votes must be >= 2"):
        make_cfg("snapshot.min_votes=1")
    for share in ("0", "1.5"):
        with pytest.raises(ValueError, match=r"snapshot.min_share must be in \(0, 1\]"):
            make_cfg(f"snapshot.min_share={share}")
    with pytest.raises(ValueError, match="snapshot.label=majority needs final answers.*mbpp"):
        make_cfg("task=mbpp", "snapshot.label=majority", shrink=False)
    assert make_cfg("snapshot.label=majority", "snapshot.min_share=1.0").snapshot.min_votes == 2


def test_versions_follow_the_majority_settings_only_in_majority_mode(make_cfg):
    from factory.versioning import snapshot_inputs

    def version_inputs(*overrides):
        ids = {"policy_fingerprint": "p", "problems_sha": "q", "prompts_sha": "r", "iteration": 1}
        return snapshot_inputs(make_cfg(*overrides), **ids)["snapshot"]

    gold = version_inputs()
    # The majority keys are left out in gold mode, the decontamination keys when it is off (arith).
    assert gold == {"max_per_problem": 10, "dedupe": True}  # as before the keys existed
    ids = {"policy_fingerprint": "p", "problems_sha": "q", "prompts_sha": "r", "iteration": 1}
    assert "eval_texts" not in snapshot_inputs(make_cfg(), **ids)  # decontamination off: nothing added
    assert version_inputs("snapshot.min_votes=3") == gold
    majority = version_inputs("snapshot.label=majority")
    assert majority["label"] == "majority" and majority != gold
    assert version_inputs("snapshot.label=majority", "snapshot.min_votes=3") != majority


@pytest.mark.slow
def test_arith_loop_reports_label_precision(make_cfg, easy_arith):
    """The tiny model's samples on arith, labelled by majority with the gold hidden: the manifest, card and
    report give the labels' precision, and it matches a count made here from the verdicts."""
    import factory.loop as loop
    from factory.rundir import RunDir

    cfg = make_cfg(
        "loop.iterations=1",
        "loop.sft_baseline=false",
        "snapshot.label=majority",
        "sampler.num_samples=6",
        *easy_arith,
    )
    loop.run(cfg)
    run_dir = RunDir(cfg.paths.run_dir)
    manifest = read_json(run_dir.stage(1, "dataset") / "manifest.json")
    stats = manifest["pseudo_labels"]
    samples = pl.read_parquet(sorted(run_dir.stage(1, "samples").glob("*.parquet")))
    verdicts = pl.read_parquet(sorted(run_dir.stage(1, "verdicts").glob("*.parquet")))
    rows = samples.join(verdicts, on=["problem_id", "sample_idx"]).sort("problem_id", "sample_idx")
    golds = {p["problem_id"]: p["answer"] for p in build_task(cfg.task).load_problems(split="train")}
    labelled = correct = 0
    for (pid,), group in rows.group_by("problem_id"):
        votes = Counter(
            int(a)
            for a, reason in zip(group["answer"], group["finish_reason"], strict=True)
            if a is not None and reason != "length"
        ).most_common(2)
        if (
            votes
            and votes[0][1] >= 2
            and votes[0][1] / group.height >= 0.5
            and (len(votes) == 1 or votes[1][1] < votes[0][1])
        ):
            labelled += 1
            correct += votes[0][0] == int(golds[pid])
    assert labelled > 0, "the tiny model labelled nothing: the test would check only empty counts"
    assert stats["num_problems"] == 40 and stats["num_labelled"] == labelled
    assert stats["num_labels_correct"] == correct and stats["num_labelled_with_gold"] == labelled
    assert stats["label_precision"] == (correct / labelled if labelled else None)
    assert measure_pseudo_labels(cfg, 1) == stats  # the same numbers from the run dir alone
    looser = measure_pseudo_labels(cfg, 1, min_share=0.25)
    assert looser["num_labelled"] >= labelled and looser["gold_num_kept"] == stats["gold_num_kept"]
    kept = load_from_disk(str(run_dir.stage(1, "dataset")))["train"]
    assert len(kept) == manifest["num_kept"] == stats["num_kept"]
    report = (run_dir.root / "report.md").read_text()
    assert "## Pseudo-labels (majority vote)" in report and f"| 1 | {labelled} / 40 |" in report
