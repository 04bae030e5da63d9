"""The pass-rate curriculum: which problems an E-step samples and how often, and yield by difficulty."""

from __future__ import annotations

import polars as pl
import pytest
from conftest import DATA_DIR, needs_data

from factory import curriculum
from factory.config import compose
from factory.rundir import RunDir, read_json, read_shards


def _verdicts(run_dir: RunDir, k: int, rewards: dict[str, list[float]]) -> None:
    """A finished verdicts stage of iteration ``k`` with the given rewards per problem."""
    from factory.rundir import atomic_dir, mark_done

    rows = [
        {"problem_id": pid, "sample_idx": j, "reward": r, "status": "correct" if r else "wrong"}
        for pid, rs in rewards.items()
        for j, r in enumerate(rs)
    ]
    with atomic_dir(run_dir.stage(k, "verdicts")) as tmp:
        pl.DataFrame(rows).write_parquet(tmp / "shard-00000.parquet")
        mark_done(tmp, seconds=0.0)


def _cfg(*overrides: str):
    return compose(["sampler.num_samples=4", *overrides])


def test_plan_skips_solved_and_boosts_rare(tmp_path):
    run_dir = RunDir(tmp_path)
    _verdicts(run_dir, 1, {"a": [1, 1, 1, 1], "b": [1, 0, 0, 0], "c": [0, 0, 0, 0], "d": [1, 1, 0, 0]})
    # Iteration 2 skipped "a"; its own rates override iteration 1's for the problems it sampled.
    _verdicts(run_dir, 2, {"b": [1, 1, 1, 0], "c": [0, 0, 0, 0], "d": [1, 1, 0, 0]})
    problems = [{"problem_id": p} for p in "abcde"]  # "e" was never sampled: default count
    cfg = _cfg("curriculum.skip_solved_at=0.75", "curriculum.rare_below=0.3", "curriculum.rare_samples=8")
    rates = curriculum.latest_pass_rates(run_dir, 3)
    assert rates == {"a": 1.0, "b": 0.75, "c": 0.0, "d": 0.5}
    kept, counts = curriculum.plan(problems, rates, cfg)
    assert [p["problem_id"] for p in kept] == ["c", "d", "e"]
    assert counts == {"c": 8, "d": 4, "e": 4}
    # Iteration 2 plans from iteration 1 alone: "b" (0.25) is rare there.
    kept, counts = curriculum.plan(problems, curriculum.latest_pass_rates(run_dir, 2), cfg)
    assert counts == {"b": 8, "c": 8, "d": 4, "e": 4}
    # Off by default: every problem, sampler.num_samples each.
    assert not curriculum.is_active(_cfg())
    # A plan that changes nothing (no rates yet: iteration 1) is the plain E-step: same inputs, cache.
    assert curriculum.plan(problems, {}, cfg) == (problems, None)


def test_plan_needs_the_earlier_verdicts(tmp_path):
    with pytest.raises(FileNotFoundError, match="needs iteration 1's verdicts"):
        curriculum.latest_pass_rates(RunDir(tmp_path), 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["curriculum.skip_solved_at=0"], "curriculum.skip_solved_at must be in"),
        (["curriculum.rare_below=1.5", "curriculum.rare_samples=8"], "curriculum.rare_below must be in"),
        (["curriculum.rare_below=0.2"], "needs curriculum.rare_samples > sampler.num_samples"),
        (["curriculum.rare_below=0.2", "curriculum.rare_samples=4"], "rare_samples > sampler.num_samples"),
        (
            ["curriculum.rare_below=0.8", "curriculum.rare_samples=8", "curriculum.skip_solved_at=0.5"],
            "must be <= curriculum.skip_solved_at",
        ),
        (["curriculum.rare_samples=8"], "curriculum.rare_samples is set but curriculum.rare_below is null"),
        (["curriculum.skip_solved_at=0.5", "snapshot.label=majority"], "majority labelling must not read"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        _cfg(*overrides)


def test_yield_by_bucket_uses_iteration_1_difficulty(tmp_path):
    run_dir = RunDir(tmp_path)
    _verdicts(run_dir, 1, {"a": [1, 1, 1, 1], "b": [1, 0, 0, 0], "c": [0, 0, 0, 0]})
    _verdicts(run_dir, 2, {"b": [1, 1, 0, 0], "c": [1, 0, 0, 0, 0, 0, 0, 0]})
    rows = curriculum.yield_by_bucket(run_dir, [1, 2, 3])
    table = {
        (r["iteration"], r["bucket"]): (r["problems"], r["samples"], r["correct"], r["solved"]) for r in rows
    }
    assert table == {
        (1, "never (0%)"): (1, 4, 0, 0),
        (1, "rarely (<50%)"): (1, 4, 1, 1),
        (1, "always (100%)"): (1, 4, 4, 1),
        (2, "never (0%)"): (1, 8, 1, 1),
        (2, "rarely (<50%)"): (1, 4, 2, 1),
    }
    text = curriculum.format_yield(rows)
    assert "| 2 | never (0%) | 1 | 8 | 1 | 12.5% | 1 |" in text


@pytest.mark.slow
def test_loop_pruning_changes_the_sampled_problems(make_cfg, easy_arith):
    """Two iterations with the curriculum on: iteration 2 samples exactly the problems iteration 1 did
    not solve at >= skip_solved_at, the rare ones with rare_samples samples; the report has the yield."""
    from factory.loop import run

    cfg = make_cfg(
        *easy_arith,
        "loop.iterations=2",
        "loop.sft_baseline=false",
        "curriculum.skip_solved_at=0.5",
        "curriculum.rare_below=0.25",
        "curriculum.rare_samples=6",
    )
    run(cfg)
    run_dir = RunDir(cfg.paths.run_dir)
    first = curriculum.pass_rates(run_dir.stage(1, "verdicts"))
    assert first.height == 40 and set(first["num_samples"]) == {4}  # iteration 1: every problem, K each
    rates = dict(first.select("problem_id", "pass_rate").iter_rows())
    expected = {p: (6 if r < 0.25 else 4) for p, r in rates.items() if r < 0.5}
    assert 0 < len(expected) < 40, "the test needs problems on both sides of the threshold"
    assert 6 in expected.values(), "the test needs rarely solved problems"
    second = read_shards(run_dir.stage(2, "samples"), ["problem_id", "sample_idx"])
    sampled = dict(second.group_by("problem_id").len().iter_rows())
    assert sampled == expected
    assert read_json(run_dir.stage(2, "samples") / "stage.json")["num_problems"] == len(expected)
    # M-step 2 trains on snapshot 2 plus the kept solutions of the problems iteration 2 skipped.
    from datasets import load_from_disk

    from factory.stage_inputs import StageInputs, snapshot_pairs
    from factory.tasks import build_task

    first_rows = load_from_disk(str(run_dir.stage(1, "dataset")))["train"]
    skipped = [
        {"prompt": p, "completion": c}
        for pid, p, c in zip(
            first_rows["problem_id"], first_rows["prompt"], first_rows["completion"], strict=True
        )
        if pid not in expected
    ]
    assert skipped, "the test needs solved problems that iteration 2 skipped"
    pairs = StageInputs(cfg, task=build_task(cfg.task), run_dir=run_dir).training_pairs(2)
    assert pairs == snapshot_pairs(run_dir.stage(2, "dataset")) + skipped  # snapshots sort by problem id
    report = (run_dir.root / "report.md").read_text()
    assert "## Yield by difficulty" in report and "| 2 | never (0%) |" in report
    # The same command again reuses every stage (the plan is recomputed from the same verdicts).
    before = {p: p.stat().st_mtime_ns for p in run_dir.stage(2, "samples").glob("*.parquet")}
    run(cfg)
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.stage(2, "samples").glob("*.parquet")}


def test_nothing_left_to_sample_stops_the_loop(make_cfg, tmp_path):
    """Every problem solved at >= skip_solved_at: the E-step refuses with a clear error (the loop stops)."""
    from factory.sample import NothingToSampleError, e_step
    from factory.stage_inputs import StageInputs
    from factory.tasks import build_task

    cfg = make_cfg("curriculum.skip_solved_at=0.5")
    run_dir = RunDir(cfg.paths.run_dir)
    task = build_task(cfg.task)
    problems = task.load_problems(split="train")
    _verdicts(run_dir, 1, {p["problem_id"]: [1, 1, 0, 0] for p in problems})
    stages = StageInputs(cfg, task=task, run_dir=run_dir)
    stages.__dict__["base"] = "unused"  # no model is needed before the plan is checked
    with pytest.raises(NothingToSampleError, match="left no training problem"):
        e_step(cfg, stages=stages, iteration=2)


@pytest.mark.slow
def test_smollm2_curriculum_plans_from_its_own_verdicts(smollm2_dir, tmp_path):
    """The real model on GSM8K, two iterations: iteration 2 samples what iteration 1's verdicts plan
    (problems solved at >= 0.5 skipped, the others with 3 samples), whatever this CPU's weights solve."""
    from factory.loop import run

    needs_data("gsm8k/train.jsonl", "gsm8k/test.jsonl")
    cfg = compose(
        [
            "model=smollm2_135m_instruct",
            f"model.name_or_path={smollm2_dir}",
            "task=gsm8k",
            f"paths.data_dir={DATA_DIR}",
            f"paths.run_dir={tmp_path / 'run'}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            "name=smollm2_curriculum",
            "task.num_human=2",
            "task.train_start=1399",  # 1400 (solved greedily on the CPUs tried) and its neighbours
            "task.num_train=3",
            "task.num_validation=2",
            "task.num_test=2",
            "sampler.num_samples=2",
            "sampler.max_new_tokens=64",
            "eval.num_samples=2",
            "eval.ks=[1,2]",
            "eval.max_new_tokens=48",
            "trainer.max_steps=2",
            "trainer.warmup_steps=0",
            "trainer.batch_size=2",
            "trainer.checkpoint_every_n_steps=0",
            "trainer.progress_bar=false",
            "loop.iterations=2",
            "loop.sft_baseline=false",
            "loop.include_human_data=true",  # an M-step has data even when nothing was solved
            "curriculum.skip_solved_at=0.5",
            "curriculum.rare_below=0.5",
            "curriculum.rare_samples=3",
        ]
    )
    run(cfg)
    run_dir = RunDir(cfg.paths.run_dir)
    first = dict(
        curriculum.pass_rates(run_dir.stage(1, "verdicts")).select("problem_id", "pass_rate").iter_rows()
    )
    assert len(first) == 3
    expected = {p: 3 for p, r in first.items() if r < 0.5}
    if expected:
        second = read_shards(run_dir.stage(2, "samples"), ["problem_id"])
        assert dict(second.group_by("problem_id").len().iter_rows()) == expected
    else:  # every problem solved: the loop stopped before iteration 2's E-step
        assert not run_dir.is_done(2, "samples")
    print(f"\nSmolLM2 iteration 1 pass rates {first}; iteration 2 planned {expected}")


def _dataset(run_dir: RunDir, k: int, rows: list[tuple[str, str]]) -> None:
    """A finished snapshot of iteration ``k`` with (problem id, completion) rows."""
    from datasets import Dataset, DatasetDict

    from factory.rundir import atomic_dir, mark_done

    columns = {"problem_id": [r[0] for r in rows], "prompt": [f"Q{r[0]}" for r in rows]}
    with atomic_dir(run_dir.stage(k, "dataset")) as tmp:
        train = Dataset.from_dict({**columns, "completion": [r[1] for r in rows]})
        DatasetDict({"train": train}).save_to_disk(str(tmp))
        mark_done(tmp, seconds=0.0)


def test_carried_pairs_come_from_the_latest_snapshot_with_the_problem(tmp_path):
    """Iteration 3 skipped "a" (solved in 1, skipped in 2 as well) and "b": "a" comes from snapshot 1,
    "b" from snapshot 2 (the latest), "c" (sampled in 3) is not carried."""
    run_dir = RunDir(tmp_path)
    _dataset(run_dir, 1, [("a", "a1"), ("a", "a2"), ("b", "b1"), ("c", "c1")])
    _dataset(run_dir, 2, [("b", "b2"), ("c", "c2")])
    pairs = curriculum.carried_pairs(run_dir, 3, sampled={"c"})
    assert [p["completion"] for p in pairs] == ["a1", "a2", "b2"]
    assert curriculum.carried_pairs(run_dir, 3, sampled={"a", "b", "c"}) == []


def test_an_empty_snapshot_with_carried_solutions_still_trains(make_cfg, monkeypatch):
    """The loop's empty-snapshot stop counts the carried solutions: snapshot 2 kept nothing, but the
    problems iteration 2 skipped bring theirs, so M-step 2 runs on them."""
    import factory.loop as loop
    from factory.rundir import write_json

    cfg = make_cfg()
    run_dir = RunDir(cfg.paths.run_dir)
    (run_dir.stage(2, "dataset")).mkdir(parents=True)
    write_json(
        run_dir.stage(2, "dataset") / "manifest.json", {"num_kept": 0, "num_samples": 8, "status_counts": {}}
    )
    trained = []

    class Stages:
        def __init__(self, carried):
            self.run_dir, self.carried = run_dir, carried

        def is_current(self, k, name):
            return name != "model"

        def carried_pairs(self, k):
            return self.carried

    monkeypatch.setattr(loop, "_train", lambda cfg, stages, k, desc: trained.append(k))
    loop._iteration(cfg, Stages([{"prompt": "Q", "completion": "A"}]), 2)
    assert trained == [2]
    with pytest.raises(loop.EmptySnapshotError, match="kept 0 of 8 samples"):
        loop._iteration(cfg, Stages([]), 2)
