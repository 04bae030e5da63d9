"""Snapshot: keep correct, dedupe per problem, cap per problem; a loadable, documented HF dataset."""

from __future__ import annotations

import polars as pl
import pytest
from datasets import load_from_disk

from factory.rundir import read_json
from factory.snapshot import build_snapshot, select_kept


def _frames():
    rows = [  # problem a: 4 correct (one duplicate), b: 1 correct, c: none
        ("a", 0, "x", 1.0),
        ("a", 1, "x", 1.0),
        ("a", 2, "y", 1.0),
        ("a", 3, "z", 1.0),
        ("a", 4, "w", 0.0),
        ("b", 0, "q", 0.0),
        ("b", 1, "r", 1.0),
        ("c", 0, "s", 0.0),
    ]
    samples = pl.DataFrame(
        {
            "problem_id": [r[0] for r in rows],
            "sample_idx": [r[1] for r in rows],
            "prompt": [f"Q{r[0]}" for r in rows],
            "completion": [r[2] for r in rows],
            "num_tokens": [1] * len(rows),
            "finish_reason": ["stop"] * len(rows),
            "policy": ["p"] * len(rows),
            "seed": [0] * len(rows),
        }
    ).with_columns(pl.col("sample_idx").cast(pl.Int32))
    verdicts = pl.DataFrame(
        {
            "problem_id": [r[0] for r in rows],
            "sample_idx": [r[1] for r in rows],
            "reward": [r[3] for r in rows],
            "status": ["correct" if r[3] else "wrong" for r in rows],
            "detail": [""] * len(rows),
            "answer": ["1"] * len(rows),
            "steps_valid": [True] * len(rows),
        }
    ).with_columns(pl.col("sample_idx").cast(pl.Int32))
    return samples, verdicts


def test_keep_dedupe_cap():
    samples, verdicts = _frames()
    kept, counts = select_kept(
        samples, verdicts.sample(fraction=1.0, shuffle=True, seed=1), max_per_problem=2, dedupe=True
    )
    assert kept.select(["problem_id", "completion"]).rows() == [("a", "x"), ("a", "y"), ("b", "r")]
    assert counts["num_correct"] == 5 and counts["num_after_dedupe"] == 4 and counts["num_kept"] == 3
    assert counts["num_problems"] == 3 and counts["num_problems_solved"] == 2
    assert counts["status_counts"] == {"correct": 5, "wrong": 3}
    kept_all, _ = select_kept(samples, verdicts, max_per_problem=10, dedupe=False)
    assert kept_all.height == 5


def test_mismatched_verdicts_are_refused():
    samples, verdicts = _frames()
    with pytest.raises(ValueError, match="verification is incomplete"):
        select_kept(samples, verdicts.head(3), max_per_problem=2, dedupe=True)


def test_build_snapshot_round_trip(tmp_path):
    samples, verdicts = _frames()
    (tmp_path / "samples").mkdir()
    (tmp_path / "verdicts").mkdir()
    samples.write_parquet(tmp_path / "samples" / "shard-00000.parquet")
    verdicts.write_parquet(tmp_path / "verdicts" / "shard-00000.parquet")
    kwargs = {
        "samples_dir": tmp_path / "samples",
        "verdicts_dir": tmp_path / "verdicts",
        "max_per_problem": 10,
        "dedupe": True,
        "lineage": {"iteration": 1, "task": "arith", "base_model": "b", "policy": "b"},
        "settings": {"sampler": {"temperature": 0.8}},
    }
    manifest = build_snapshot(out_dir=tmp_path / "dataset", **kwargs)
    ds = load_from_disk(str(tmp_path / "dataset"))["train"]
    assert len(ds) == manifest["num_kept"] == 4
    assert ds[0]["completion"] == "x" and "prompt" in ds.column_names
    assert read_json(tmp_path / "dataset" / "manifest.json")["fingerprint"] == manifest["fingerprint"]
    card = (tmp_path / "dataset" / "README.md").read_text()
    assert card.startswith("---\n") and "config_name: iter_1" in card and "| iteration | 1 |" in card
    # Same inputs and settings -> same fingerprint; changed settings -> a different one.
    same = build_snapshot(out_dir=tmp_path / "again", **kwargs)
    assert same["fingerprint"] == manifest["fingerprint"]
    kwargs["settings"] = {"sampler": {"temperature": 0.7}}
    assert build_snapshot(out_dir=tmp_path / "changed", **kwargs)["fingerprint"] != manifest["fingerprint"]
    with pytest.raises(FileExistsError):
        build_snapshot(out_dir=tmp_path / "dataset", **kwargs)


def test_samples_cut_at_the_token_limit_are_never_kept(tmp_path):
    """A correct-looking sample that ran into max_new_tokens stops mid-solution: the snapshot drops it (it
    would be trained on with an end token appended) and counts it in the manifest and the card."""
    samples, verdicts = _frames()
    # a/2 ("y") and b/1 ("r") are correct but were cut at the limit; c/0 is wrong and cut.
    cut = {("a", 2), ("b", 1), ("c", 0)}
    keys = zip(samples["problem_id"], samples["sample_idx"], strict=True)
    samples = samples.with_columns(
        pl.Series("finish_reason", ["length" if k in cut else "stop" for k in keys])
    )
    kept, counts = select_kept(samples, verdicts, max_per_problem=10, dedupe=True)
    assert kept.select(["problem_id", "completion"]).rows() == [("a", "x"), ("a", "z")]
    assert counts["num_correct"] == 5 and counts["num_truncated"] == 3
    assert counts["num_dropped_truncated"] == 2 and counts["num_kept"] == 2
    assert counts["num_problems_solved"] == 1

    (tmp_path / "samples").mkdir()
    (tmp_path / "verdicts").mkdir()
    samples.write_parquet(tmp_path / "samples" / "shard-00000.parquet")
    verdicts.write_parquet(tmp_path / "verdicts" / "shard-00000.parquet")
    manifest = build_snapshot(
        samples_dir=tmp_path / "samples", verdicts_dir=tmp_path / "verdicts", out_dir=tmp_path / "dataset",
        max_per_problem=10, dedupe=True, lineage={"iteration": 1, "task": "arith", "base_model": "b",
        "policy": "b"}, settings={},
    )  # fmt: skip
    assert manifest["num_dropped_truncated"] == 2 and manifest["num_truncated"] == 3
    assert len(load_from_disk(str(tmp_path / "dataset"))["train"]) == 2
    card = (tmp_path / "dataset" / "README.md").read_text()
    assert (
        "num_dropped_truncated: 2" in card
        and "| cut at the token limit (all / correct, dropped) | 3 / 2 |" in card
    )
