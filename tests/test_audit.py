"""The verifier audit: counts per status and examples of each, as markdown."""

from __future__ import annotations

import polars as pl

from factory.audit import audit_iteration, format_audit


def test_audit_counts_and_examples(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "v").mkdir()
    ids = ["a", "a", "b", "b", "c"]
    idx = [0, 1, 0, 1, 0]
    pl.DataFrame(
        {
            "problem_id": ids,
            "sample_idx": idx,
            "completion": ["1+1=2. Answer: 2", "x" * 1000, "2+2=5. Answer: 5", "???", "3. Answer: 3"],
        }
    ).write_parquet(tmp_path / "s" / "shard-00000.parquet")
    pl.DataFrame(
        {
            "problem_id": ids,
            "sample_idx": idx,
            "status": ["correct", "unparseable", "wrong", "unparseable", "correct"],
            "detail": ["", "no answer", "answer 5 != 4", "no answer", ""],
        }
    ).write_parquet(tmp_path / "v" / "shard-00000.parquet")
    audit = audit_iteration(
        samples_dir=tmp_path / "s", verdicts_dir=tmp_path / "v", examples_per_status=1, max_chars=50
    )
    assert audit["num_samples"] == 5
    assert audit["status_counts"] == {"correct": 2, "unparseable": 2, "wrong": 1}
    assert [e["problem_id"] for e in audit["examples"]["unparseable"]] == ["a"]
    assert audit["examples"]["unparseable"][0]["completion"].endswith("[950 more chars]")
    text = format_audit({1: audit})
    assert "## Verifier audit" in text
    assert "| 1 | 5 | 2 (40.0%) | 2 (40.0%) | 1 (20.0%) |" in text
    assert "**wrong** (b, sample 0): answer 5 != 4" in text
    assert format_audit({}) == ""
