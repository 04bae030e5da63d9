"""Aggregate report over one run or a whole sweep: markdown tables and PNG plots.

Command: ``restem-report PATH`` where PATH is a run dir (with ``summary.json``) or a sweep dir (a
``restem -m`` output: one run dir per job). Writes ``PATH/sweep_report.md`` and ``PATH/plots/sweep/``:
accuracy per iteration for each sweep point, pass@k curves per iteration, ReST-EM against SFT on human
data, and gains by problem difficulty (eval problems bucketed by the base model's solve rate, as Fig. 8
of Singh et al. 2023). Sweep points are labelled by the config keys whose values differ between runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl
import yaml

from eval.evaluate import PER_PROBLEM
from eval.metrics import DIFFICULTY_BUCKETS, difficulty_bucket
from eval.report import MISSING, SFT_ITERATION, SFT_LABEL, _ks, _metric, _pct, _write_text_atomic
from factory.rundir import read_json

PLOTS = "plots/sweep"
IGNORED_KEYS = ("paths.", "name", "iteration")  # differ between runs without being a sweep value
BUCKETS = DIFFICULTY_BUCKETS  # of the base model's share of correct samples on an eval problem


def find_runs(path: Path) -> list[Path]:
    """The run dirs under ``path`` (itself, or its sweep jobs), in job order."""
    path = Path(path)
    if (path / "summary.json").is_file():
        return [path]
    runs = [p.parent for p in path.glob("*/summary.json")] + [p.parent for p in path.glob("*/*/summary.json")]
    if not runs:
        raise FileNotFoundError(f"no finished run (summary.json) in {path} or its subfolders")
    return sorted(set(runs), key=lambda p: [int(x) if x.isdigit() else x for x in p.relative_to(path).parts])


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def sweep_labels(runs: list[Path]) -> tuple[list[str], list[dict]]:
    """(the varying config keys, each run's values of them), from each run's resolved config.yaml."""
    configs = [_flatten(yaml.safe_load((r / "config.yaml").read_text()) or {}) for r in runs]
    keys = sorted(
        k
        for k in set().union(*configs)
        if not k.startswith(IGNORED_KEYS) and len({repr(c.get(k)) for c in configs}) > 1
    )
    return keys, [{k: c.get(k) for k in keys} for c in configs]


def _label(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "run"


def difficulty_table(run: Path) -> pl.DataFrame | None:
    """Greedy accuracy per base-difficulty bucket for every evaluated model of a run.

    Returns:
        One row per (bucket, model) with ``bucket``, ``model`` (iteration or sft_human), ``problems`` and
        ``greedy_accuracy``; None when the base model's per-problem results are missing.
    """
    base_path = run / "iter_0" / "eval" / PER_PROBLEM
    if not base_path.is_file():
        return None
    base = pl.read_parquet(base_path, columns=["problem_id", "num_correct", "num_samples"])
    rate = base["num_correct"] / base["num_samples"]
    bucket = pl.Series("bucket", [difficulty_bucket(x) for x in rate.to_list()])
    buckets = base.select("problem_id").with_columns(bucket)
    frames = []
    models = sorted(
        (p.parent.parent.name for p in run.glob(f"*/eval/{PER_PROBLEM}")),
        key=lambda n: (n == SFT_ITERATION, int(n.removeprefix("iter_")) if n.startswith("iter_") else 0),
    )
    for name in models:
        per = pl.read_parquet(run / name / "eval" / PER_PROBLEM, columns=["problem_id", "greedy_correct"])
        frames.append(
            per.join(buckets, on="problem_id")
            .group_by("bucket")
            .agg(
                pl.len().alias("problems"),
                pl.col("greedy_correct").cast(pl.Float64).mean().alias("greedy_accuracy"),
            )
            .with_columns(pl.lit(name.removeprefix("iter_")).alias("model"))
        )
    return pl.concat(frames) if frames else None


def build_report(path: Path, out: Path | None = None) -> dict:
    """Writes ``sweep_report.md`` and the plots; returns their paths and the points found."""
    path = Path(path)
    out = Path(out) if out else path
    runs = find_runs(path)
    keys, values = sweep_labels(runs)
    points = []
    for run, vals in zip(runs, values, strict=True):
        rows = read_json(run / "summary.json")
        points.append(
            {
                "run": run,
                "label": _label(vals),
                "values": vals,
                "rows": rows,
                "difficulty": difficulty_table(run),
            }
        )
    plots = _plots(points, out / PLOTS)
    text = _markdown(points, keys, path, {k: str(v.relative_to(out)) for k, v in plots.items()})
    report = out / "sweep_report.md"
    _write_text_atomic(report, text)
    return {"report": report, "plots": plots, "points": [p["label"] for p in points]}


def _iter_rows(rows: list[dict]) -> list[dict]:
    return sorted((r for r in rows if r["iteration"] != SFT_ITERATION), key=lambda r: int(r["iteration"]))


def _sft(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["iteration"] == SFT_ITERATION), None)


def _markdown(points: list[dict], keys: list[str], path: Path, plots: dict) -> str:
    all_rows = [r for p in points for r in p["rows"]]
    pass_ks, maj_ks = _ks(all_rows, "pass_at_k"), _ks(all_rows, "maj_at_k")
    head = (
        keys
        + ["iteration", "greedy"]
        + [f"pass@{k}" for k in pass_ks]
        + [f"maj@{k}" for k in maj_ks]
        + ["kept"]
    )
    lines = [
        f"# ReST-EM sweep report: {path}",
        "",
        f"{len(points)} run(s); sweep keys: {', '.join(keys) or 'none (a single configuration)'}. "
        f"Greedy, pass@k (unbiased estimator) and maj@k on each run's eval split; iteration 0 is the base "
        f"model, *{SFT_LABEL}* the base model fine-tuned on the human solutions; *kept* is the snapshot size.",
        "",
        "## Accuracy per iteration",
        "",
        _row(head),
        _row(["---"] * len(head)),
    ]
    for p in points:
        rows = _iter_rows(p["rows"]) + ([_sft(p["rows"])] if _sft(p["rows"]) else [])
        for r in rows:
            label = SFT_LABEL if r["iteration"] == SFT_ITERATION else str(r["iteration"])
            cells = [str(p["values"][k]) for k in keys] + [label, _pct(r.get("greedy_accuracy"))]
            cells += [_pct(_metric(r, "pass_at_k", k)) for k in pass_ks]
            cells += [_pct(_metric(r, "maj_at_k", k)) for k in maj_ks]
            cells.append(MISSING if r.get("num_kept") is None else str(r["num_kept"]))
            lines.append(_row(cells))
    lines += [
        "",
        f"![accuracy per iteration]({plots['accuracy']})",
        "",
        f"![pass@k]({plots['pass_at_k']})",
        "",
    ]
    lines += ["## ReST-EM against SFT on human data (greedy)", ""]
    head = keys + ["base", "best ReST-EM (iteration)", "last iteration", SFT_LABEL, "best minus SFT"]
    lines += [_row(head), _row(["---"] * len(head))]
    for p in points:
        iters = _iter_rows(p["rows"])
        best = max(iters[1:], key=lambda r: r["greedy_accuracy"], default=None)
        sft = _sft(p["rows"])
        gap = (
            f"{100 * (best['greedy_accuracy'] - sft['greedy_accuracy']):+.1f} points"
            if best and sft
            else MISSING
        )
        lines.append(
            _row(
                [str(p["values"][k]) for k in keys]
                + [
                    _pct(iters[0]["greedy_accuracy"]) if iters else MISSING,
                    f"{_pct(best['greedy_accuracy'])} ({best['iteration']})" if best else MISSING,
                    _pct(iters[-1]["greedy_accuracy"]) if len(iters) > 1 else MISSING,
                    _pct(sft["greedy_accuracy"]) if sft else MISSING,
                    gap,
                ]
            )
        )
    lines += ["", f"![ReST-EM vs SFT]({plots['sft']})", "", "## Gains by problem difficulty", ""]
    lines += [
        "Eval problems bucketed by the base model's share of correct samples (pass@k samples of iteration 0); "
        "greedy accuracy of each model inside each bucket, number of problems in brackets.",
        "",
    ]
    for p in points:
        table = p["difficulty"]
        if table is None:
            continue
        models = list(dict.fromkeys(table["model"].to_list()))
        lines += [f"**{p['label']}**", "", _row(["bucket"] + [_model_label(m) for m in models])]
        lines.append(_row(["---"] * (len(models) + 1)))
        for label in BUCKETS:
            part = table.filter(pl.col("bucket") == label)
            if part.height == 0:
                continue
            n = part["problems"][0]
            acc = dict(zip(part["model"].to_list(), part["greedy_accuracy"].to_list(), strict=True))
            lines.append(_row([f"{label} ({n})"] + [_pct(acc.get(m)) for m in models]))
        lines.append("")
    lines += [f"![gains by difficulty]({plots['difficulty']})", ""]
    return "\n".join(lines)


def _model_label(name: str) -> str:
    return SFT_LABEL if name == SFT_ITERATION else ("base" if name == "0" else f"iteration {name}")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _plots(points: list[dict], folder: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")  # headless machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    folder.mkdir(parents=True, exist_ok=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    paths = {}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "os^Dv<>p"
    for i, p in enumerate(points):
        c = colours[i % len(colours)]
        iters = _iter_rows(p["rows"])
        # Shrinking markers keep points that share a prefix of iterations (identical runs) visible.
        ax.plot(
            [int(r["iteration"]) for r in iters],
            [100 * r["greedy_accuracy"] for r in iters],
            marker=markers[i % len(markers)],
            markersize=max(3, 10 - 2 * i),
            color=c,
            label=p["label"],
        )
        if (sft := _sft(p["rows"])) is not None:
            ax.axhline(100 * sft["greedy_accuracy"], ls="--", color=c, alpha=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(
        ax, "ReST-EM iteration", "greedy accuracy (%)", "Accuracy per iteration (dashed: SFT on human data)"
    )
    paths["accuracy"] = _save(fig, folder / "accuracy_per_iteration.png")

    fig, axes = _grid(plt, len(points))
    for ax, p in zip(axes, points, strict=False):
        for r in _iter_rows(p["rows"]) + ([_sft(p["rows"])] if _sft(p["rows"]) else []):
            ks = _ks([r], "pass_at_k")
            label = SFT_LABEL if r["iteration"] == SFT_ITERATION else f"iteration {r['iteration']}"
            style = "--" if r["iteration"] == SFT_ITERATION else "o-"
            ax.plot(ks, [100 * _metric(r, "pass_at_k", k) for k in ks], style, label=label)
        ax.set_xscale("log", base=2)
        _finish(ax, "k", "pass@k (%)", p["label"])
    paths["pass_at_k"] = _save(fig, folder / "pass_at_k.png")

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(points)), 4.5))
    width = 0.25
    for j, (name, pick) in enumerate(
        [
            ("base", lambda p: _iter_rows(p["rows"])[0]),
            ("best ReST-EM", _best),
            (SFT_LABEL, lambda p: _sft(p["rows"])),
        ]
    ):
        values = [100 * r["greedy_accuracy"] if (r := pick(p)) else 0.0 for p in points]
        ax.bar([i + (j - 1) * width for i in range(len(points))], values, width, label=name)
    ax.set_xticks(range(len(points)), [p["label"].replace(", ", "\n") for p in points], fontsize="small")
    _finish(ax, None, "greedy accuracy (%)", "ReST-EM against SFT on human data")
    paths["sft"] = _save(fig, folder / "rest_em_vs_sft.png")

    fig, axes = _grid(plt, len(points))
    for ax, p in zip(axes, points, strict=False):
        table = p["difficulty"]
        if table is None:
            continue
        models = list(dict.fromkeys(table["model"].to_list()))
        labels = [b for b in BUCKETS if b in set(table["bucket"])]
        width = 0.8 / len(models)
        for j, m in enumerate(models):
            acc = {
                b: a
                for b, a, mm in table.select(["bucket", "greedy_accuracy", "model"]).iter_rows()
                if mm == m
            }
            ax.bar(
                [i + j * width for i in range(len(labels))],
                [100 * acc.get(b, 0.0) for b in labels],
                width,
                label=_model_label(m),
            )
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize="x-small")
        _finish(ax, "base model's solve rate", "greedy accuracy (%)", p["label"])
    paths["difficulty"] = _save(fig, folder / "difficulty.png")
    return paths


def _best(p: dict) -> dict | None:
    return max(_iter_rows(p["rows"])[1:], key=lambda r: r["greedy_accuracy"], default=None)


def _grid(plt, n: int):
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _finish(ax, xlabel, ylabel, title) -> None:
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="small")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="x-small")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    finally:
        plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """``restem-report PATH [--out DIR]``: PATH is a run dir or a sweep dir."""
    parser = argparse.ArgumentParser(prog="restem-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a run dir (summary.json) or a sweep dir (one run dir per job)")
    parser.add_argument("--out", help="where sweep_report.md and plots/sweep/ go (default: PATH)")
    args = parser.parse_args(argv)
    try:
        result = build_report(Path(args.path), Path(args.out) if args.out else None)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"report: {result['report']} ({len(result['points'])} point(s))")
