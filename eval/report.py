"""Markdown table, summary plot and report.md for a ReST-EM run.

Summary rows are dicts, one per evaluated model: iteration rows carry an int
``iteration`` (0 = the base model) and the SFT-on-human-data baseline carries
``iteration == "sft_human"``. Metric dicts may have int or str keys, since a
JSON round trip turns int keys into strings.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

SFT_LABEL = "SFT on human data"
SFT_ITERATION = "sft_human"
MISSING = "–"
PLOT_RELPATH = "plots/summary.png"


def _ks(rows: list[dict], field: str) -> list[int]:
    """Union of the k keys of ``field`` over all rows, sorted numerically."""
    keys: set[int] = set()
    for row in rows:
        for key in row.get(field) or {}:
            keys.add(int(key))
    return sorted(keys)


def _metric(row: dict, field: str, k: int) -> float | None:
    """Value of ``row[field][k]`` whether keys are ints or strings."""
    values = row.get(field) or {}
    if k in values:
        return values[k]
    return values.get(str(k))


def _pct(value: float | None) -> str:
    return MISSING if value is None else f"{100.0 * value:.1f}%"


def _int(value: int | None) -> str:
    return MISSING if value is None else str(value)


def _split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Split into iteration rows (sorted by iteration) and SFT baseline rows."""
    iters = [r for r in rows if r.get("iteration") != SFT_ITERATION]
    sft = [r for r in rows if r.get("iteration") == SFT_ITERATION]
    iters.sort(key=lambda r: int(r["iteration"]))
    return iters, sft


def format_table(rows: list[dict]) -> str:
    """Render summary rows as a markdown table.

    Args:
        rows: Summary rows, one per evaluated model.

    Returns:
        A markdown table with iteration rows first (sorted) and then the SFT
        baseline rows; percentages have one decimal and missing values are
        shown as "–". The time column is the sum of the row's timings.
    """
    pass_ks = _ks(rows, "pass_at_k")
    maj_ks = _ks(rows, "maj_at_k")
    header = (
        ["iteration", "greedy"]
        + [f"pass@{k}" for k in pass_ks]
        + [f"maj@{k}" for k in maj_ks]
        + ["problems solved", "kept", "kept with valid steps", "time (s)"]
    )
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    iters, sft = _split_rows(rows)
    for row in iters + sft:
        label = SFT_LABEL if row.get("iteration") == SFT_ITERATION else str(row["iteration"])
        timings = row.get("timings") or {}
        seconds = [v for v in timings.values() if v is not None]
        cells = (
            [label, _pct(row.get("greedy_accuracy"))]
            + [_pct(_metric(row, "pass_at_k", k)) for k in pass_ks]
            + [_pct(_metric(row, "maj_at_k", k)) for k in maj_ks]
            + [
                _int(row.get("num_problems_solved")),
                _int(row.get("num_kept")),
                _pct(row.get("share_kept_with_valid_steps")),
                f"{sum(seconds):.1f}" if seconds else MISSING,
            ]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _series(rows: list[dict]) -> list[tuple[str, str, int | None]]:
    """Plotted series as (label, field, k): greedy, pass@1, pass@max k."""
    series: list[tuple[str, str, int | None]] = [("greedy", "greedy_accuracy", None)]
    pass_ks = _ks(rows, "pass_at_k")
    if 1 in pass_ks:
        series.append(("pass@1", "pass_at_k", 1))
    if pass_ks and pass_ks[-1] != 1:
        series.append((f"pass@{pass_ks[-1]}", "pass_at_k", pass_ks[-1]))
    return series


def _value(row: dict, field: str, k: int | None) -> float | None:
    return row.get(field) if k is None else _metric(row, field, k)


def plot_summary(rows: list[dict], path, *, split: str = "test") -> pathlib.Path:
    """Plot accuracy over ReST-EM iterations, with the SFT baseline dashed.

    Args:
        rows: Summary rows, one per evaluated model.
        path: Destination PNG path; parent directories are created.

    Returns:
        The path of the written PNG.
    """
    import matplotlib

    # Agg so the plot works on headless training machines.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iters, sft = _split_rows(rows)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for idx, (label, field, k) in enumerate(_series(rows)):
            colour = colours[idx % len(colours)]
            points = [
                (int(r["iteration"]), 100.0 * v) for r in iters if (v := _value(r, field, k)) is not None
            ]
            if points:
                xs, ys = zip(*points, strict=False)
                ax.plot(xs, ys, marker="o", color=colour, label=label)
            for row in sft[:1]:
                v = _value(row, field, k)
                if v is not None:
                    ax.axhline(
                        100.0 * v,
                        linestyle="--",
                        color=colour,
                        label=f"{label} ({SFT_LABEL})",
                    )
        if iters:
            ax.set_xticks([int(r["iteration"]) for r in iters])
        ax.set_xlabel("ReST-EM iteration")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"ReST-EM: {split} accuracy per iteration")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        fig.tight_layout()
        # Save via a temp file so a crash never leaves a truncated PNG.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".summary-", suffix=".png")
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=120, format="png")
            os.replace(tmp, path)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
    return path


def _write_text_atomic(path: pathlib.Path, text: str) -> None:
    """Write text via a temp file in the same dir and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


_EXPLANATION = (
    "Each row is one evaluated model: iteration 0 is the base model and "
    "iteration i is the model fine-tuned on the i-th ReST-EM snapshot; the "
    f'"{SFT_LABEL}" row is the baseline fine-tuned on the human-written '
    "solutions. *greedy* is greedy-decoding accuracy on the {split} split; "
    "*pass@k* is the probability that at least one of k samples is correct, "
    "computed with the unbiased estimator of Chen et al. (2021) from all "
    "drawn samples; *maj@k* is the accuracy of the majority-vote answer over "
    "the first k samples (every sample votes by its answer's equivalence class, so equal answers "
    "written in different forms count together). *problems solved* is the number of training "
    "problems with at least one verified sample in the iteration's "
    "generation step, *kept* is the number of verified samples kept in the "
    "iteration's snapshot, and *kept with valid steps* is the share of kept "
    "samples whose intermediate steps also check out. *time (s)* is the "
    "wall-clock total of the iteration's stages. Missing values are shown as {missing}."
)


def write_report(
    rows: list[dict], run_dir, *, title: str = "ReST-EM run", split: str = "test", appendix: str = ""
) -> dict:
    """Write ``report.md`` and ``plots/summary.png`` into ``run_dir``.

    Args:
        rows: Summary rows, one per evaluated model.
        run_dir: The run directory.
        title: Heading of the report.
        split: The evaluation split named in the text and the plot.
        appendix: Markdown appended after the table and plot (e.g. the verifier audit).

    Returns:
        ``{"report": Path to report.md, "plot": Path to the PNG}``.
    """
    run_dir = pathlib.Path(run_dir)
    plot_path = plot_summary(rows, run_dir / PLOT_RELPATH, split=split)
    explanation = _EXPLANATION.format(split=split, missing=MISSING)
    text = f"# {title}\n\n{explanation}\n\n{format_table(rows)}\n![accuracy per iteration]({PLOT_RELPATH})\n"
    if appendix:
        text += f"\n{appendix}"
    report_path = run_dir / "report.md"
    _write_text_atomic(report_path, text)
    return {"report": report_path, "plot": plot_path}
