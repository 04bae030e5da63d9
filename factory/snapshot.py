"""Snapshot: samples + verdicts -> kept (correct), deduplicated, capped, versioned Hugging Face dataset.

Command: ``restem-snapshot iteration=2``. The output folder loads with ``datasets.load_from_disk`` and
carries a dataset card (README.md with YAML metadata) and ``manifest.json`` (fingerprint and lineage).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import polars as pl
from omegaconf import DictConfig, OmegaConf

from factory.config import hydra_entry
from factory.decontaminate import OverlapIndex, drop_overlapping
from factory.faults import kill_point
from factory.rundir import atomic_dir, mark_done, scan_shards, write_json, write_text

DATASET_COLUMNS = ["problem_id", "sample_idx", "prompt", "completion", "num_tokens", "answer", "steps_valid"]
_NO_CAP = 2**62  # select_kept's cap when decontamination caps afterwards
# Manifest fields of decontamination (None when snapshot.decontaminate is off).
_DECON_FIELDS = (
    "ngram",
    "eval_splits",
    "num_eval_texts",
    "num_dropped_prompt_overlap",
    "num_dropped_completion_overlap",
    "decontamination_examples",
)


def select_kept(
    samples: pl.DataFrame | pl.LazyFrame,
    verdicts: pl.DataFrame | pl.LazyFrame,
    *,
    max_per_problem: int,
    dedupe: bool,
    chosen: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, dict]:
    """Joins samples with verdicts and keeps the correct ones, deduplicated and capped per problem.

    ``chosen`` (``snapshot.label=majority``: the keys of the samples that agree with their problem's
    majority-vote label, from ``factory.pseudo_labels.vote``) replaces "the verdict's reward > 0" as what
    counts as correct; the gold then plays no part in what is kept.

    A sample cut at the token limit (``finish_reason == "length"``) is never kept, even when the verifier
    judged it correct: its text stops mid-solution, and training on it with an end token appended would
    teach the model to end turns there. Such samples are counted (``num_truncated`` of all samples,
    ``num_dropped_truncated`` of the correct ones).

    Takes frames or lazy scans of the shards: only the correct samples are ever held in memory whole;
    the counts come from the key, status and finish-reason columns alone.

    Returns:
        (kept rows ordered by problem and sample index, counts per status and filter step)
    """
    key = ["problem_id", "sample_idx"]
    samples, verdicts = samples.lazy(), verdicts.lazy()
    sample_columns = samples.collect_schema().names()
    extra = [c for c in verdicts.collect_schema().names() if c not in sample_columns]
    # Samples written before finish reasons were recorded count as complete.
    truncated = (
        (pl.col("finish_reason") == "length").fill_null(False)
        if "finish_reason" in sample_columns
        else pl.lit(False)
    )
    num_samples, num_verdicts, num_matched, statuses, num_problems, num_truncated = pl.collect_all(
        [
            samples.select(pl.len()),
            verdicts.select(pl.len()),
            samples.select(key).join(verdicts.select(key), on=key, how="inner").select(pl.len()),
            verdicts.group_by("status").len(),
            samples.select(pl.col("problem_id").n_unique()),
            samples.select(truncated.sum()),
        ]
    )
    num_samples, num_verdicts = num_samples.item(), num_verdicts.item()
    if num_samples != num_verdicts:
        raise ValueError(f"{num_samples} samples but {num_verdicts} verdicts: verification is incomplete")
    if num_matched.item() != num_samples:
        raise ValueError("samples and verdicts do not match one to one on (problem_id, sample_idx)")
    if chosen is None:
        picked = verdicts.filter(pl.col("reward") > 0)
    else:
        keys = chosen.lazy().select(key).cast(verdicts.select(key).collect_schema())
        picked = verdicts.join(keys, on=key, how="semi")
    correct = samples.join(picked.select(key + extra), on=key, how="inner").sort(key).collect()
    complete = correct.filter(~truncated)
    deduped = (
        complete.unique(subset=["problem_id", "completion"], keep="first", maintain_order=True)
        if dedupe
        else complete
    )
    # The paper caps kept solutions per problem (10) so easy problems do not dominate the M-step.
    kept = deduped.filter(pl.int_range(pl.len()).over("problem_id") < max_per_problem)
    counts = {
        "num_samples": num_samples,
        "status_counts": dict(sorted(statuses.iter_rows())),
        "num_correct": correct.height,
        "num_truncated": int(num_truncated.item() or 0),
        "num_dropped_truncated": correct.height - complete.height,
        "num_after_dedupe": deduped.height,
        "num_kept": kept.height,
        "num_problems": num_problems.item(),
        "num_problems_solved": kept["problem_id"].n_unique(),
    }
    return kept.select([c for c in DATASET_COLUMNS if c in kept.columns]), counts


def select_majority(
    samples, verdicts, majority, *, max_per_problem: int, dedupe: bool
) -> tuple[pl.DataFrame, dict, dict]:
    """``snapshot.label=majority`` (``majority``: a ``factory.pseudo_labels.Majority``): keeps the samples
    that agree with their problem's majority-vote label, and measures the labels against the hidden gold.

    Returns:
        (kept rows, counts as :func:`select_kept`'s, pseudo-label stats: ``factory.pseudo_labels.measure``)
    """
    from factory.pseudo_labels import measure, vote

    labels, chosen = vote(samples, verdicts, majority)
    kept, counts = select_kept(
        samples, verdicts, max_per_problem=max_per_problem, dedupe=dedupe, chosen=chosen
    )
    _, gold_counts = select_kept(samples, verdicts, max_per_problem=max_per_problem, dedupe=dedupe)
    return kept, counts, measure(labels, kept, verdicts, majority, gold_counts=gold_counts)


def measure_pseudo_labels(
    cfg: DictConfig, iteration: int, *, min_votes: int | None = None, min_share: float | None = None
) -> dict:
    """Pseudo-label stats of a finished run's iteration ``iteration`` (its samples and verdicts), whatever
    label mode it ran with: what majority voting labels and keeps there, and how precise that is against
    the gold. ``cfg`` is the run's config (``<run_dir>/config.yaml``); the thresholds default to its
    ``snapshot.*``. Writes nothing."""
    from factory.pseudo_labels import Majority
    from factory.rundir import RunDir
    from factory.tasks import build_task

    run_dir = RunDir(cfg.paths.run_dir)
    for stage in ("samples", "verdicts"):
        if not run_dir.is_done(iteration, stage):
            raise FileNotFoundError(f"{run_dir.stage(iteration, stage)} is not finished")
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    try:
        majority = Majority.from_config(cfg, task=task, problems=task.load_problems(split="train"))
        if min_votes is not None or min_share is not None:
            majority = Majority(
                task,
                majority.problems,
                min_votes=majority.min_votes if min_votes is None else int(min_votes),
                min_share=majority.min_share if min_share is None else float(min_share),
                require_steps=majority.require_steps,
            )
        return select_majority(
            scan_shards(run_dir.stage(iteration, "samples")),
            scan_shards(run_dir.stage(iteration, "verdicts")),
            majority,
            max_per_problem=int(cfg.snapshot.max_per_problem),
            dedupe=bool(cfg.snapshot.dedupe),
        )[2]
    finally:
        task.close()


def fingerprint(paths: list[Path], settings: dict) -> str:
    """sha256 over the input shards' bytes and the settings that shaped them."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in sorted(paths):
        digest.update(path.name.encode())
        file_digest = hashlib.sha256()
        with open(path, "rb") as handle:  # in chunks: shards can be large
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                file_digest.update(chunk)
        digest.update(file_digest.digest())
    return digest.hexdigest()


def build_snapshot(
    *,
    samples_dir: Path,
    verdicts_dir: Path,
    out_dir: Path,
    max_per_problem: int,
    dedupe: bool,
    lineage: dict,
    settings: dict,
    index: OverlapIndex | None = None,
    statements: dict[str, str] | None = None,
    majority=None,
) -> dict:
    """Writes ``out_dir`` (DatasetDict + card + manifest) atomically and returns the manifest.

    The shards are scanned lazily (see :func:`select_kept`), so memory grows with the kept samples, not
    with everything the E-step generated. With an ``index`` of evaluation texts, rows whose prompt or
    completion overlaps one are dropped after dedupe and *before* the cap, so a problem still keeps up to
    ``max_per_problem`` clean solutions (``decontaminate.drop_overlapping``, with the problems'
    ``statements``). ``majority`` (a
    ``factory.pseudo_labels.Majority``) keeps the samples that agree with majority-vote labels instead of
    the verifier's correct ones, and records the labels' precision against the hidden gold (of the rows
    finally kept) under ``pseudo_labels``.
    """
    from datasets import Dataset, DatasetDict
    from datasets.table import InMemoryTable

    start = time.time()
    samples, verdicts = scan_shards(samples_dir), scan_shards(verdicts_dir)
    labels = chosen = None
    if majority is not None:
        from factory.pseudo_labels import vote

        labels, chosen = vote(samples, verdicts, majority)
    kept, counts = select_kept(
        samples,
        verdicts,
        max_per_problem=max_per_problem if index is None else _NO_CAP,
        dedupe=dedupe,
        chosen=chosen,
    )
    counts.update({"decontaminate": index is not None, **dict.fromkeys(_DECON_FIELDS)})
    if index is not None:
        kept, dropped = drop_overlapping(kept, index, statements=statements)
        kept = kept.filter(pl.int_range(pl.len()).over("problem_id") < max_per_problem)
        counts.update(
            num_kept=kept.height,
            num_problems_solved=kept["problem_id"].n_unique(),
            ngram=index.n,
            eval_splits=index.splits,
            num_eval_texts=index.num_texts,
            num_dropped_prompt_overlap=dropped["num_dropped_prompt"],
            num_dropped_completion_overlap=dropped["num_dropped_completion"],
            decontamination_examples=dropped["examples"],
        )
    counts["label"] = "gold" if majority is None else "majority"
    if majority is not None:
        from factory.pseudo_labels import measure

        # What gold selection would keep (before decontamination), for comparison.
        _, gold_counts = select_kept(samples, verdicts, max_per_problem=max_per_problem, dedupe=dedupe)
        counts["pseudo_labels"] = measure(labels, kept, verdicts, majority, gold_counts=gold_counts)
    inputs = sorted(Path(samples_dir).glob("shard-*.parquet")) + sorted(
        Path(verdicts_dir).glob("shard-*.parquet")
    )
    manifest = {
        "fingerprint": fingerprint(inputs, settings),
        **lineage,
        "max_per_problem": max_per_problem,
        "dedupe": dedupe,
        **counts,
        "settings": settings,
    }
    # Our content fingerprint names the dataset: datasets would otherwise hash the whole table (seconds).
    dataset = Dataset(InMemoryTable(kept.to_arrow()), fingerprint=manifest["fingerprint"][:32])
    with atomic_dir(Path(out_dir)) as tmp:
        # One shard even when empty: datasets writes no file for an empty dataset by default, and then
        # cannot load it back.
        with _large_write_batches():
            DatasetDict({"train": dataset}).save_to_disk(
                str(tmp), num_shards={"train": 1} if kept.is_empty() else None
            )
        kill_point("snapshot.write")
        write_json(tmp / "manifest.json", manifest)
        write_text(tmp / "README.md", dataset_card(manifest))
        mark_done(tmp, seconds=time.time() - start, num_kept=counts["num_kept"])
    return manifest


def dataset_card(manifest: dict) -> str:
    """A Hub-format dataset card (YAML metadata with the lineage, then prose) for one snapshot folder."""
    from factory.card import lineage, render_card

    name = f"iter_{manifest['iteration']}"
    return render_card(
        {name: lineage(manifest)},
        data_files={name: "train/*.arrow"},  # the save_to_disk layout
        title=f"ReST-EM snapshot, iteration {manifest['iteration']}",
    )


def run(cfg: DictConfig) -> dict:
    """Builds iteration ``iteration``'s snapshot; a finished one of the same version is skipped, one of
    another version refused. Samples and verdicts that record other inputs than this config's are
    refused before building (ones that record none, e.g. written by hand, are taken as they are)."""
    from factory.decontaminate import check_training_problems
    from factory.stage_inputs import stage_inputs

    k = int(cfg.iteration)
    with stage_inputs(cfg) as stages:
        out = stages.run_dir.stage(k, "dataset")
        if stages.is_current(k, "dataset"):  # never overwritten
            return {"skipped": str(out)}
        for stage in ("samples", "verdicts"):
            if not stages.run_dir.is_done(k, stage):
                raise FileNotFoundError(
                    f"{stages.run_dir.stage(k, stage)} is not finished: run the loop or that stage first"
                )
            if "inputs" in stages.run_dir.stage_info(k, stage):
                stages.is_current(k, stage)
        check_training_problems(stages)
        return snapshot_stage(
            cfg,
            run_dir=stages.run_dir,
            iteration=k,
            base=stages.base,
            policy=stages.sampling(k)["policy"],
            identity=stages.snapshot(k),
            index=stages.overlap_index,
            task=stages.task,
            problems=stages.train_problems,
        )


def snapshot_stage(
    cfg: DictConfig,
    *,
    run_dir,
    iteration: int,
    base,
    policy,
    identity: dict,
    index: OverlapIndex | None = None,
    task=None,
    problems=None,
) -> dict:
    """Builds iteration ``iteration``'s snapshot from its finished samples and verdicts, with its lineage
    (``identity``: the version and its inputs, from ``versioning.snapshot_identity``) and, with
    ``snapshot.decontaminate``, without the rows that overlap ``index`` (``StageInputs.overlap_index``).
    With ``snapshot.label=majority``, ``task`` groups the answers and ``problems`` (its training split)
    carry the golds that only measure the labels."""
    if cfg.snapshot.decontaminate and index is None:
        raise ValueError("snapshot.decontaminate is on, but no index of evaluation texts was given")
    majority = None
    if cfg.snapshot.get("label", "gold") == "majority":
        from factory.pseudo_labels import Majority

        if task is None or problems is None:
            raise ValueError("snapshot.label=majority: the snapshot stage needs the task and its problems")
        majority = Majority.from_config(cfg, task=task, problems=problems)
    return build_snapshot(
        samples_dir=run_dir.stage(iteration, "samples"),
        verdicts_dir=run_dir.stage(iteration, "verdicts"),
        out_dir=run_dir.stage(iteration, "dataset"),
        max_per_problem=int(cfg.snapshot.max_per_problem),
        dedupe=bool(cfg.snapshot.dedupe),
        lineage={
            "iteration": iteration,
            "task": cfg.task.name,
            "base_model": str(base),
            "policy": str(policy),
            **identity,
        },
        settings={n: OmegaConf.to_container(cfg[n], resolve=True) for n in ("task", "sampler", "snapshot")},
        index=index if cfg.snapshot.decontaminate else None,
        statements={str(p["problem_id"]): p["question"] for p in problems or []} or None,
        majority=majority,
    )


main = hydra_entry(run)


@contextlib.contextmanager
def _large_write_batches(rows: int = 100_000):
    """``save_to_disk`` writes in batches of ``datasets.config.DEFAULT_MAX_BATCH_SIZE`` rows (1,000), and each
    batch pays a fixed schema/embedding cost: a third of a 300k-row snapshot's build time. Larger batches
    (still capped by datasets at ~100 MB each) write the same dataset in a few calls."""
    import datasets

    before = datasets.config.DEFAULT_MAX_BATCH_SIZE
    datasets.config.DEFAULT_MAX_BATCH_SIZE = max(before, rows)
    try:
        yield
    finally:
        datasets.config.DEFAULT_MAX_BATCH_SIZE = before
