"""Verifier audit: what the verifier said about an iteration's samples, with examples of each status.

The verifier is the reward: reading a few samples per status is the quickest way to catch false
positives (rewarded nonsense) and false negatives (good solutions thrown away).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from factory.rundir import scan_shards


def audit_iteration(
    *, samples_dir: Path, verdicts_dir: Path, examples_per_status: int = 2, max_chars: int = 400
) -> dict:
    """Counts per verdict status and the first few examples of each (deterministic order).

    Returns:
        ``{"num_samples": N, "status_counts": {status: n}, "examples": {status: [{problem_id,
        sample_idx, completion, detail}]}}``; completions are cut to ``max_chars``.
    """
    key = ["problem_id", "sample_idx"]
    # Lazy scans: the counts read the status column only, and only the examples' completions are loaded.
    samples = scan_shards(samples_dir).select([*key, "completion"])
    verdicts = scan_shards(verdicts_dir).select([*key, "status", "detail"])
    joined = samples.select(key).join(verdicts, on=key, how="inner")
    counts = dict(sorted(joined.group_by("status").len().collect().iter_rows()))
    picked = joined.sort(key).group_by("status", maintain_order=True).head(examples_per_status).collect()
    texts = samples.join(picked.lazy().select(key), on=key, how="semi").collect()
    rows = picked.join(texts, on=key, how="left").sort(key)
    examples = {}
    for status in counts:
        examples[status] = [
            {**row, "completion": _cut(row["completion"], max_chars)}
            for row in rows.filter(pl.col("status") == status)
            .select([*key, "completion", "status", "detail"])
            .iter_rows(named=True)
        ]
    return {"num_samples": sum(counts.values()), "status_counts": counts, "examples": examples}


def _cut(text: str | None, max_chars: int) -> str:
    text = text or ""
    return text if len(text) <= max_chars else f"{text[:max_chars]}... [{len(text) - max_chars} more chars]"


def format_audit(audits: dict[int, dict]) -> str:
    """A markdown section: counts per status per iteration, then examples of each status."""
    if not audits:
        return ""
    statuses = sorted({s for a in audits.values() for s in a["status_counts"]})
    lines = [
        "## Verifier audit",
        "",
        "Verdicts on each iteration's E-step samples.",
        "",
        "| iteration | samples | " + " | ".join(statuses) + " |",
        "|---|---|" + "---|" * len(statuses),
    ]
    for k, audit in sorted(audits.items()):
        n = audit["num_samples"]
        cells = [
            f"{audit['status_counts'].get(s, 0)} ({audit['status_counts'].get(s, 0) / n:.1%})" if n else "0"
            for s in statuses
        ]
        lines.append(f"| {k} | {n} | " + " | ".join(cells) + " |")
    for k, audit in sorted(audits.items()):
        lines += ["", f"### Examples, iteration {k}"]
        for status, examples in audit["examples"].items():
            for ex in examples:
                completion = ex["completion"].replace("```", "'''")
                lines += [
                    "",
                    f"**{status}** ({ex['problem_id']}, sample {ex['sample_idx']}): {ex['detail']}",
                    "",
                    "```",
                    completion,
                    "```",
                ]
    return "\n".join(lines) + "\n"
