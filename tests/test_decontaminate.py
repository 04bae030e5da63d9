"""Decontamination: n-gram overlap with the evaluation sets drops snapshot rows, is counted and reported,
and the evaluation texts are part of the snapshot's version."""

from __future__ import annotations

import json

import polars as pl
import pytest
from conftest import DATA_DIR, needs_data
from datasets import load_from_disk

from factory import snapshot
from factory.card import read_lineage
from factory.decontaminate import (
    OverlapIndex,
    drop_overlapping,
    evaluation_splits,
    format_section,
    training_overlaps,
    words,
)
from factory.rundir import RunDir, read_json
from factory.tasks import build_task

STATEMENT = (
    "A baker makes 12 loaves of bread every morning and sells each loaf for 3 dollars at the "
    "village market before noon. How much money does she make in a week?"
)


def _index(*texts: str, n: int = 13) -> OverlapIndex:
    return OverlapIndex(
        [{"problem_id": f"t{i}", "split": "test", "text": t} for i, t in enumerate(texts)], n=n
    )


def test_words_are_normalised():
    assert words("Ann's  3+4=7.\nÉTÉ ｆｕｌｌ") == ["ann", "s", "3", "4", "7", "été", "full"]


def test_shared_ngram_is_found_whatever_the_case_and_punctuation():
    index = _index(STATEMENT)
    copied = "Let me restate: a BAKER makes 12 loaves of bread every morning, and sells each loaf... so"
    hit = index.find(copied)
    assert hit == {
        "eval_problem_id": "t0",
        "eval_split": "test",
        "ngram": "a baker makes 12 loaves of bread every morning and sells each loaf",
    }
    # 12 shared words in a row are not 13.
    assert index.find("baker makes 12 loaves of bread every morning and sells each loaf today") is None
    assert index.find("A baker makes 13 loaves of bread every morning and sells each loaf for") is None


def test_n_is_configurable():
    six = "makes 12 loaves of bread every"
    assert _index(STATEMENT, n=13).find(f"she {six} day") is None
    assert _index(STATEMENT, n=6).find(f"she {six} day")["ngram"] == six
    with pytest.raises(ValueError, match="snapshot.ngram must be >= 1"):
        _index(STATEMENT, n=0)


def test_short_texts_match_whole_or_not_at_all():
    # 9 words (>= 8, < 13): matched as a whole; 4 words: too short to check (counted).
    index = _index("What is the sum of two and three here", "Compute 2 plus 3")
    assert index.num_too_short == 1 and index.num_texts == 2
    assert index.find("so what is the sum of two and three here? It is 5")["eval_problem_id"] == "t0"
    assert index.find("what is the sum of two and three") is None  # a part of it is not enough
    assert index.find("to compute 2 plus 3 we add") is None
    # With n <= 8 every text of at least n words has n-grams; shorter ones are not checked.
    assert _index("Compute 2 plus 3", n=4).find("compute 2 plus 3 now")["ngram"] == "compute 2 plus 3"
    assert _index("Compute 2 plus 3", n=5).num_too_short == 1


def _rows(rows: list[tuple[str, int, str, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "problem_id": [r[0] for r in rows],
            "sample_idx": [r[1] for r in rows],
            "prompt": [r[2] for r in rows],
            "completion": [r[3] for r in rows],
        }
    )


def test_drop_overlapping_counts_by_reason():
    index = _index(STATEMENT)
    rows = _rows(
        [
            ("a", 0, f"Question: {STATEMENT}\nAnswer: ", "12*3*7=252. The answer is 252."),
            ("a", 1, f"Question: {STATEMENT}\nAnswer: ", STATEMENT),  # both: counted as prompt
            ("b", 0, "Question: Tom has 3 cats.\nAnswer: ", f"Like this one: {STATEMENT}"),
            ("b", 1, "Question: Tom has 3 cats.\nAnswer: ", "He has 3 cats. The answer is 3."),
        ]
    )
    clean, found = drop_overlapping(rows, index)
    assert clean.rows() == [rows.row(3)]
    assert (found["num_dropped_prompt"], found["num_dropped_completion"]) == (2, 1)
    assert [(e["problem_id"], e["sample_idx"], e["reason"]) for e in found["examples"]] == [
        ("a", 0, "prompt"),
        ("a", 1, "prompt"),
        ("b", 0, "completion"),
    ]
    empty, none = drop_overlapping(rows.head(0), index)
    assert empty.is_empty() and none["num_dropped_prompt"] == 0


def test_the_problem_check_reads_the_statement_not_the_rendered_prompt():
    """A few-shot exemplar that overlaps a test text is in every prompt: with the statements at hand only
    the problem whose own statement overlaps is dropped."""
    index = _index(STATEMENT)
    shots = f"Question: {STATEMENT}\nAnswer: 252\n\n"
    rows = _rows(
        [
            ("a", 0, f"{shots}Question: Tom has 3 cats.\nAnswer: ", "He has 3 cats. The answer is 3."),
            ("b", 0, f"{shots}Question: {STATEMENT}\nAnswer: ", "12*3*7=252. The answer is 252."),
        ]
    )
    statements = {"a": "Tom has 3 cats. How many cats?", "b": STATEMENT}
    clean, found = drop_overlapping(rows, index, statements=statements)
    assert clean["problem_id"].to_list() == ["a"] and found["num_dropped_prompt"] == 1
    # Without statements the prompt is checked, exemplar included: every row goes.
    assert drop_overlapping(rows, index)[0].is_empty()


def test_evaluation_splits_follow_the_config(make_cfg):
    assert evaluation_splits(make_cfg()) == ["test"]
    assert evaluation_splits(make_cfg("eval.split=validation")) == ["test", "validation"]
    assert evaluation_splits(make_cfg("trainer.select.every=5")) == ["test", "validation"]
    assert evaluation_splits(make_cfg("model.pretrain.select.every=5")) == ["test", "validation"]


def test_arith_turns_it_off_and_benchmarks_keep_it_on(make_cfg):
    assert make_cfg().snapshot.decontaminate is False  # conf/generation/arith.yaml, with the reason
    cfg = make_cfg("task=gsm8k", "model=smollm2_135m_instruct", shrink=False)
    assert cfg.snapshot.decontaminate is True and cfg.snapshot.ngram == 13
    with pytest.raises(ValueError, match="config error: snapshot.ngram must be >= 1"):
        make_cfg("snapshot.ngram=0")


def test_report_section():
    overlaps = {
        "ngram": 13,
        "eval_splits": ["test"],
        "num_eval_texts": 40,
        "num_too_short": 1,
        "num_train_problems": 30,
        "overlaps": [
            {"train_problem_id": "tr-3", "eval_problem_id": "te-7", "eval_split": "test", "ngram": "a b"}
        ],
    }
    manifest = {
        "decontaminate": True,
        "num_after_dedupe": 50,
        "num_dropped_prompt_overlap": 4,
        "num_dropped_completion_overlap": 1,
        "num_kept": 40,
    }
    text = format_section(overlaps, {1: manifest, 2: {**manifest, "num_kept": 41}})
    assert text.startswith("## Decontamination")
    assert "| 1 | 50 | 4 | 1 | 40 |" in text and "| 2 | 50 | 4 | 1 | 41 |" in text
    assert "1 of 30" in text and "| tr-3 | te-7 (test) | a b |" in text
    assert format_section(None, {1: {"decontaminate": False}}) == ""


# --- the snapshot command on GSM8K files with a planted test-set duplicate --------------------------------

NUM_HUMAN, NUM_TRAIN, NUM_VALIDATION, NUM_TEST = 2, 6, 2, 5
PLANTED = 3  # the training problem that is a copy of test problem 1


def _gsm8k_dir(root, *, changed_test: bool = False):
    """A small GSM8K folder: train rows with test problem 1's question planted at train index 3 (after
    the human split), and the first test rows."""
    rows = {s: (DATA_DIR / "gsm8k" / f"{s}.jsonl").read_text().splitlines() for s in ("train", "test")}
    train = [json.loads(r) for r in rows["train"][: NUM_HUMAN + NUM_TRAIN + NUM_VALIDATION]]
    test = [json.loads(r) for r in rows["test"][:NUM_TEST]]
    train[NUM_HUMAN + PLANTED] = dict(test[1])
    if changed_test:
        test[4] = {**test[4], "question": test[4]["question"] + " Round to the nearest dollar."}
    folder = root / "gsm8k"
    folder.mkdir(parents=True, exist_ok=True)
    for split, data in (("train", train), ("test", test)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return root


def _gsm8k_cfg(make_cfg, data_dir, tiny_model_dir, *changes):
    return make_cfg(
        "task=gsm8k",
        "model=hf",
        f"model.name_or_path={tiny_model_dir}",
        f"paths.data_dir={data_dir}",
        f"task.num_human={NUM_HUMAN}",
        f"task.num_train={NUM_TRAIN}",
        f"task.num_validation={NUM_VALIDATION}",
        "snapshot.max_per_problem=3",
        *changes,
        shrink=False,
    )


def _write_shards(cfg) -> tuple[list[dict], list[dict]]:
    """Hand-written samples and verdicts (all correct): 2 per training problem, 4 for the first one whose
    first completion quotes test problem 0's statement."""
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    train, test = task.load_problems(split="train"), task.load_problems(split="test")
    rows = []
    for problem in train:
        count = 4 if problem is train[0] else 2
        for j in range(count):
            completion = f"Step {j}. The answer is {problem['answer']}."
            if problem is train[0] and j == 0:
                completion = f"This is like: {test[0]['question']} The answer is {problem['answer']}."
            rows.append(
                (problem["problem_id"], j, task.format_prompt(problem), completion, problem["answer"])
            )
    run_dir = RunDir(cfg.paths.run_dir)
    samples = pl.DataFrame(
        {
            "problem_id": [r[0] for r in rows],
            "sample_idx": [r[1] for r in rows],
            "prompt": [r[2] for r in rows],
            "completion": [r[3] for r in rows],
            "num_tokens": [10] * len(rows),
            "finish_reason": ["stop"] * len(rows),
        }
    ).with_columns(pl.col("sample_idx").cast(pl.Int32))
    verdicts = pl.DataFrame(
        {
            "problem_id": [r[0] for r in rows],
            "sample_idx": [r[1] for r in rows],
            "reward": [1.0] * len(rows),
            "status": ["correct"] * len(rows),
            "detail": [""] * len(rows),
            "answer": [r[4] for r in rows],
        }
    ).with_columns(pl.col("sample_idx").cast(pl.Int32))
    for stage, frame in (("samples", samples), ("verdicts", verdicts)):
        folder = run_dir.stage(1, stage)
        folder.mkdir(parents=True)
        frame.write_parquet(folder / "shard-00000.parquet")
        (folder / "stage.json").write_text("{}")  # finished, recording no inputs (written by hand)
    return train, test


def test_snapshot_command_drops_a_planted_test_duplicate(make_cfg, tiny_model_dir, tmp_path):
    needs_data("gsm8k/train.jsonl", "gsm8k/test.jsonl")
    data_dir = _gsm8k_dir(tmp_path / "data")
    cfg = _gsm8k_cfg(make_cfg, data_dir, tiny_model_dir)
    train, test = _write_shards(cfg)
    planted = train[PLANTED]["problem_id"]
    assert train[PLANTED]["question"] == test[1]["question"]

    manifest = snapshot.run(cfg)
    run_dir = RunDir(cfg.paths.run_dir)
    # The training problem that is a test problem is found and written with what it shares.
    record = read_json(run_dir.root / "decontamination.json")
    assert record["eval_splits"] == ["test"] and record["num_train_problems"] == NUM_TRAIN
    assert [(o["train_problem_id"], o["eval_problem_id"]) for o in record["overlaps"]] == [
        (planted, test[1]["problem_id"])
    ]
    assert len(record["overlaps"][0]["ngram"].split()) == 13
    # Its samples are dropped by the prompt check, the quoting completion by the completion check; the
    # first problem still keeps the cap's 3 clean solutions (decontamination comes before the cap).
    assert manifest["decontaminate"] is True and manifest["ngram"] == 13
    assert manifest["num_dropped_prompt_overlap"] == 2
    assert manifest["num_dropped_completion_overlap"] == 1
    assert manifest["num_after_dedupe"] == 4 + 2 * (NUM_TRAIN - 1)
    assert (
        manifest["num_kept"] == 3 + 2 * (NUM_TRAIN - 2) and manifest["num_problems_solved"] == NUM_TRAIN - 1
    )
    ds = load_from_disk(str(run_dir.stage(1, "dataset")))["train"]
    assert len(ds) == manifest["num_kept"] and planted not in ds["problem_id"]
    assert not any(test[0]["question"] in c for c in ds["completion"])
    assert sorted(ds.filter(lambda r: r["problem_id"] == train[0]["problem_id"])["sample_idx"]) == [1, 2, 3]
    # Counted in the manifest and the card.
    on_disk = read_json(run_dir.stage(1, "dataset") / "manifest.json")
    assert {e["reason"] for e in on_disk["decontamination_examples"]} == {"prompt", "completion"}
    lineage = next(iter(read_lineage(run_dir.stage(1, "dataset") / "README.md").values()))
    assert lineage["num_dropped_prompt_overlap"] == 2 and lineage["num_dropped_completion_overlap"] == 1
    card = (run_dir.stage(1, "dataset") / "README.md").read_text()
    assert "| decontamination (dropped: statement / completion overlap) | 2 / 1 (word 13-grams" in card

    # Another evaluation set gives another version: the finished snapshot is refused, naming it.
    _gsm8k_dir(tmp_path / "data", changed_test=True)
    with pytest.raises(FileExistsError, match=r"changed: eval_texts\)"):
        snapshot.run(_gsm8k_cfg(make_cfg, data_dir, tiny_model_dir))
    # The same evaluation set: skipped.
    _gsm8k_dir(tmp_path / "data")
    assert "skipped" in snapshot.run(cfg)


def test_the_snapshot_stage_checks_the_statements(make_cfg, tiny_model_dir, tmp_path, monkeypatch):
    """The snapshot stage hands every training problem's statement to the check (not only prompts)."""
    needs_data("gsm8k/train.jsonl", "gsm8k/test.jsonl")
    cfg = _gsm8k_cfg(make_cfg, _gsm8k_dir(tmp_path / "data"), tiny_model_dir)
    train, _ = _write_shards(cfg)
    seen = {}
    real = snapshot.drop_overlapping

    def spy(rows, index, *, statements=None):
        seen.update(statements or {})
        return real(rows, index, statements=statements)

    monkeypatch.setattr(snapshot, "drop_overlapping", spy)
    snapshot.run(cfg)
    assert seen == {p["problem_id"]: p["question"] for p in train}


def test_snapshot_command_with_decontamination_off(make_cfg, tiny_model_dir, tmp_path):
    needs_data("gsm8k/train.jsonl", "gsm8k/test.jsonl")
    cfg = _gsm8k_cfg(make_cfg, _gsm8k_dir(tmp_path / "data"), tiny_model_dir, "snapshot.decontaminate=false")
    _write_shards(cfg)
    manifest = snapshot.run(cfg)
    assert manifest["decontaminate"] is False and manifest["num_dropped_prompt_overlap"] is None
    assert manifest["num_kept"] == 3 + 2 * (NUM_TRAIN - 1)  # nothing dropped
    run_dir = RunDir(cfg.paths.run_dir)
    assert not (run_dir.root / "decontamination.json").exists()
    card = (run_dir.stage(1, "dataset") / "README.md").read_text()
    assert "| decontamination (dropped: statement / completion overlap) | off |" in card


def test_training_overlaps_on_real_gsm8k():
    """GSM8K's own train and test share templated problems (a train travels 270 miles in 3 hours ...)."""
    needs_data("gsm8k/train.jsonl", "gsm8k/test.jsonl")
    rows = {s: (DATA_DIR / "gsm8k" / f"{s}.jsonl").read_text().splitlines() for s in ("train", "test")}
    test = [json.loads(r) for r in rows["test"]]
    index = OverlapIndex(
        [{"problem_id": f"test-{i}", "split": "test", "text": r["question"]} for i, r in enumerate(test)],
        n=13,
    )
    train = [
        {"problem_id": f"train-{i}", "question": json.loads(r)["question"]}
        for i, r in enumerate(rows["train"])
    ]
    found = {o["train_problem_id"]: o["eval_problem_id"] for o in training_overlaps(train, index)}
    assert found.get("train-1314") == "test-602" and len(found) < 20


@pytest.mark.slow
def test_loop_reports_and_drops_a_planted_test_duplicate(make_cfg, easy_arith, monkeypatch):
    """The shrunken arith loop with the check on and test problem 0 planted as training problem 0. Every
    sample is judged correct, so the planted problem's samples reach the snapshot's checks."""
    import factory.loop as loop
    from factory.tasks import ArithTask

    load, verify = ArithTask.load_problems, ArithTask.verify

    def planted(self, *, split, limit=None):
        problems = load(self, split=split, limit=limit)
        if split == "train":
            test = load(self, split="test")[0]
            problems = [{**test, "problem_id": problems[0]["problem_id"], "split": "train"}, *problems[1:]]
        return problems

    def lenient(self, problems, completions, *, strictness=None):
        verdicts = verify(self, problems, completions, strictness=strictness)
        return [{**v, "reward": 1.0, "status": "correct"} for v in verdicts]

    monkeypatch.setattr(ArithTask, "load_problems", planted)
    monkeypatch.setattr(ArithTask, "verify", lenient)
    cfg = make_cfg(
        *easy_arith,
        "snapshot.decontaminate=true",
        "loop.iterations=1",
        "loop.sft_baseline=false",
        "task.num_train=16",
        "task.num_test=8",
        "eval.num_samples=2",
        "eval.ks=[1,2]",
    )
    loop.run(cfg)
    run_dir = RunDir(cfg.paths.run_dir)
    record = read_json(run_dir.root / "decontamination.json")
    assert ("arith-train-00000", "arith-test-00000") in {
        (o["train_problem_id"], o["eval_problem_id"]) for o in record["overlaps"]
    }
    samples = pl.read_parquet(run_dir.stage(1, "samples") / "*.parquet")
    planted_rows = samples.filter(pl.col("problem_id") == "arith-train-00000")
    assert planted_rows.height == cfg.sampler.num_samples
    question = build_task(cfg.task).load_problems(split="test")[0]["question"]
    assert all(question in prompt for prompt in planted_rows["prompt"])  # the prompt holds the statement
    manifest = read_json(run_dir.stage(1, "dataset") / "manifest.json")
    assert manifest["decontaminate"] is True and manifest["num_dropped_prompt_overlap"] > 0
    ds = load_from_disk(str(run_dir.stage(1, "dataset")))["train"]
    assert len(ds) > 0 and "arith-train-00000" not in ds["problem_id"]
    report = (run_dir.root / "report.md").read_text()
    assert "## Decontamination" in report and "| arith-train-00000 | arith-test-00000 (test) |" in report
    assert f"| 1 | {manifest['num_after_dedupe']} | {manifest['num_dropped_prompt_overlap']} |" in report
