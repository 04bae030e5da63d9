"""Tests for eval.report."""

import json

from eval.report import format_table, plot_summary, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows():
    timings = {"sample": 1.0, "verify": 0.1, "snapshot": 0.2, "train": 3.0, "eval": 2.0}
    return [
        {
            "iteration": 1,
            "greedy_accuracy": 0.25,
            "pass_at_k": {1: 0.2, 4: 0.4, 8: 0.5},
            "maj_at_k": {4: 0.3, 8: 0.31},
            "num_problems_solved": 812,
            "num_kept": 1500,
            "share_kept_with_valid_steps": 0.97,
            "timings": timings,
        },
        {
            "iteration": "sft_human",
            "greedy_accuracy": 0.2,
            "pass_at_k": {1: 0.18, 4: 0.35, 8: None},
            "maj_at_k": {4: 0.25, 8: 0.27},
            "num_problems_solved": None,
            "num_kept": None,
            "share_kept_with_valid_steps": None,
            "timings": {"train": 5.0, "eval": 2.0},
        },
        {
            "iteration": 0,
            "greedy_accuracy": 0.171,
            "pass_at_k": {1: 0.15, 4: 0.3, 8: 0.4},
            "maj_at_k": {4: 0.2, 8: 0.22},
            "num_problems_solved": None,
            "num_kept": None,
            "share_kept_with_valid_steps": None,
            "timings": timings,
        },
    ]


def _data_lines(table):
    return [line for line in table.strip().splitlines()[2:]]


def test_format_table_cells_and_order():
    table = format_table(_rows())
    lines = table.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [
        "iteration",
        "greedy",
        "pass@1",
        "pass@4",
        "pass@8",
        "maj@4",
        "maj@8",
        "problems solved",
        "kept",
        "kept with valid steps",
        "time (s)",
    ]
    data = _data_lines(table)
    assert len(data) == 3
    assert data[0].startswith("| 0 |")
    assert data[1].startswith("| 1 |")
    assert data[2].startswith("| SFT on human data |")
    assert "17.1%" in data[0]
    assert "–" in data[0]
    assert "6.3" in data[0]  # 1.0 + 0.1 + 0.2 + 3.0 + 2.0
    assert "812" in data[1] and "1500" in data[1] and "97.0%" in data[1]
    sft_cells = [c.strip() for c in data[2].strip("|").split("|")]
    assert sft_cells[4] == "–"  # pass@8 is None
    assert sft_cells[-1] == "7.0"


def test_format_table_string_keys_from_json():
    rows = json.loads(json.dumps(_rows()))
    assert "1" in rows[0]["pass_at_k"]
    table = format_table(rows)
    assert table == format_table(_rows())
    assert "pass@8" in table and "maj@4" in table


def test_format_table_numeric_k_order():
    rows = [
        {
            "iteration": 0,
            "greedy_accuracy": 0.5,
            "pass_at_k": {"16": 0.9, "2": 0.6, "1": 0.5},
            "maj_at_k": {},
            "timings": {},
        }
    ]
    header = format_table(rows).splitlines()[0]
    assert header.index("pass@1") < header.index("pass@2") < header.index("pass@16")


def test_plot_summary_writes_png(tmp_path):
    out = plot_summary(_rows(), tmp_path / "nested" / "dir" / "summary.png")
    assert out.exists()
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_summary_without_sft_single_iteration(tmp_path):
    rows = [r for r in _rows() if r["iteration"] == 0]
    out = plot_summary(json.loads(json.dumps(rows)), tmp_path / "one.png")
    assert out.read_bytes().startswith(b"\x89PNG")


def test_write_report(tmp_path):
    paths = write_report(_rows(), tmp_path / "run", title="My run")
    report, plot = paths["report"], paths["plot"]
    assert report == tmp_path / "run" / "report.md"
    assert plot == tmp_path / "run" / "plots" / "summary.png"
    assert plot.read_bytes().startswith(b"\x89PNG")
    text = report.read_text(encoding="utf-8")
    assert text.startswith("# My run")
    assert "](plots/summary.png)" in text
    assert "SFT on human data" in text
    assert "unbiased" in text
    assert format_table(_rows()) in text
    # No temp files left behind by the atomic writes.
    leftovers = [p.name for p in (tmp_path / "run").rglob(".*")]
    assert leftovers == []
