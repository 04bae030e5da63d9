"""Standard errors of greedy accuracies and paired gains (eval/significance.py)."""

from __future__ import annotations

import math

import polars as pl
import pytest

from eval.significance import accuracy_se, format_gains, gains_section, paired_gain


def test_accuracy_se_is_the_binomial_one():
    assert accuracy_se([True] * 15 + [False] * 85) == pytest.approx(math.sqrt(0.15 * 0.85 / 100))
    assert accuracy_se([True] * 4) == 0.0
    with pytest.raises(ValueError, match="no problems"):
        accuracy_se([])


def test_paired_gain_counts_disagreements_and_uses_the_differences_sd():
    ids = [f"p{i:02d}" for i in range(20)]
    a = {p: i < 10 for i, p in enumerate(ids)}  # solves 10
    b = {p: i < 5 for i, p in enumerate(ids)}  # solves 5, all of them also solved by a
    g = paired_gain(a, b)
    assert g["n"] == 20 and g["gain"] == pytest.approx(0.25)
    assert (g["a_only"], g["b_only"]) == (5, 0)
    var = (5 * 0.75**2 + 15 * 0.25**2) / 19
    assert g["paired_se"] == pytest.approx(math.sqrt(var / 20))
    assert g["unpaired_se"] == pytest.approx(math.hypot(math.sqrt(0.25 / 20), math.sqrt(0.25 * 0.75 / 20)))
    assert g["paired_se"] < g["unpaired_se"]  # both solve the same easy problems
    assert paired_gain(b, a)["gain"] == pytest.approx(-0.25)


def test_paired_gain_refuses_different_problem_sets():
    with pytest.raises(ValueError, match="different problems"):
        paired_gain({"a": True, "b": False}, {"a": True, "c": False})


def _eval_dir(tmp_path, name, solved, n=10):
    folder = tmp_path / name
    folder.mkdir()
    ids = [f"t{i}" for i in range(n)]
    pl.DataFrame({"problem_id": ids, "greedy_correct": [i < solved for i in range(n)]}).write_parquet(
        folder / "per_problem.parquet"
    )
    return folder


def test_format_gains_compares_each_iteration_with_the_base_and_sft(tmp_path):
    evals = {
        0: _eval_dir(tmp_path, "base", 2),
        1: _eval_dir(tmp_path, "it1", 6),
        2: tmp_path / "unfinished",  # no per_problem.parquet: left out
        "sft_human": _eval_dir(tmp_path, "sft", 3),
    }
    text = format_gains(evals)
    rows = [line for line in text.splitlines() if line.startswith("| iteration")]
    assert len(rows) == 2
    assert rows[0].startswith("| iteration 1 | 60.0% | 15.5 | base | +40.0 |")
    assert rows[1].startswith("| iteration 1 | 60.0% | 15.5 | SFT on human data | +30.0 |")
    assert rows[0].endswith("| 4 / 0 |") and rows[1].endswith("| 3 / 0 |")
    # One whole row: 4 of 10 differences are 1, sd = sqrt(0.4 * 0.6 * 10 / 9), SE = sd / sqrt(10) = 16.3
    # points; gain / SE = 2.4; unpaired sqrt(0.6 * 0.4 / 10 + 0.2 * 0.8 / 10) = 20.0.
    assert rows[0] == "| iteration 1 | 60.0% | 15.5 | base | +40.0 | 16.3 | +2.4 | 20.0 | 4 / 0 |"


def test_format_gains_shows_no_ratio_when_the_differences_do_not_vary(tmp_path):
    text = format_gains({0: _eval_dir(tmp_path, "base", 3), 1: _eval_dir(tmp_path, "it1", 3)})
    assert "| iteration 1 | 30.0% | 14.5 | base | +0.0 | 0.0 | – |" in text


def test_paired_gain_needs_two_problems():
    with pytest.raises(ValueError, match="at least 2"):
        paired_gain({"a": True}, {"a": False})


def test_format_gains_is_empty_without_a_base_or_an_iteration(tmp_path):
    assert format_gains({1: _eval_dir(tmp_path, "it1", 6)}) == ""
    assert format_gains({0: _eval_dir(tmp_path, "base", 2)}) == ""


def test_gains_section_notes_what_it_cannot_compare(tmp_path):
    """Evaluations over other problems, or a corrupt file, give a note in the report, not an error."""
    other = _eval_dir(tmp_path, "other", 3, n=12)
    text = gains_section({0: _eval_dir(tmp_path, "base", 2), 1: other})
    assert "Not computed" in text and "different problems" in text
    (other / "per_problem.parquet").write_bytes(b"not parquet")
    assert "Not computed" in gains_section({0: _eval_dir(tmp_path, "base2", 2), 1: other})
