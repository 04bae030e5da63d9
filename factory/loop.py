"""The ReST-EM driver: base eval, then N x (E-step -> verify -> snapshot -> M-step -> eval), then the
SFT-on-human baseline, a summary, a report and a plot.

Command: ``restem`` (the default experiment, arith_demo) or ``restem experiment=... key=value``.
Rerunning the same command skips finished stages and resumes partly written sample shards.
"""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from eval.evaluate import evaluate_model
from eval.report import format_table, write_report
from factory.audit import audit_iteration, format_audit
from factory.base_model import ensure_base_model, human_pairs
from factory.config import hydra_entry, validate
from factory.rundir import RunDir, read_json, write_json
from factory.sample import e_step, policy_path
from factory.snapshot import snapshot_stage
from factory.tasks import build_task
from factory.verify import verify_samples
from factory.versioning import check_snapshot_version, snapshot_identity
from train.m_step import snapshot_pairs, train_from_base

log = logging.getLogger(__name__)


class EmptySnapshotError(RuntimeError):
    """An iteration kept no verified sample; training on it would be meaningless."""


def run(cfg: DictConfig) -> list[dict]:
    """Runs (or resumes) the whole loop and returns the summary rows (also in ``summary.json``)."""
    validate(cfg)
    start = time.time()
    run_dir = RunDir(cfg.paths.run_dir)
    run_dir.init(cfg)
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    try:
        return _run(cfg, run_dir, task, start)
    finally:
        task.close()  # the math verifier's worker processes


def _run(cfg: DictConfig, run_dir: RunDir, task, start: float) -> list[dict]:
    train_problems = task.load_problems(split="train")
    eval_problems = task.load_problems(split=cfg.eval.split, limit=cfg.eval.limit)
    for name, problems in (("training", train_problems), (f"{cfg.eval.split}", eval_problems)):
        if not problems:
            raise ValueError(
                f"zero {name} problems after loading task {cfg.task.name!r}: check the task config"
            )
    base = ensure_base_model(cfg)

    def evaluate(k: int | str, model_path) -> dict:
        if not run_dir.is_done(k, "eval"):
            evaluate_model(
                model_path=model_path,
                task=task,
                problems=eval_problems,
                settings=cfg.eval,
                out_dir=run_dir.stage(k, "eval"),
                dtype=cfg.model.dtype,
                label=f"eval {k}",
                sampler_settings=cfg.sampler,
            )
        return read_json(run_dir.stage(k, "eval") / "metrics.json")

    rows = [_row(0, evaluate(0, base), run_dir)]
    for k in range(1, cfg.loop.iterations + 1):
        try:
            _iteration(cfg, run_dir, task, train_problems, base, k)
        except EmptySnapshotError as err:
            log.warning("%s", err)
            print(f"\n{err}")
            if cfg.loop.stop_on_empty_snapshot:
                break
            continue
        rows.append(_row(k, evaluate(k, run_dir.stage(k, "model")), run_dir))
    if cfg.loop.sft_baseline:
        if not run_dir.is_done("sft_human", "model"):
            train_from_base(
                cfg,
                base_path=base,
                pairs=human_pairs(task, tokenizer=_tokenizer(base)),
                out_dir=run_dir.stage("sft_human", "model"),
                desc="SFT on human data",
            )
        rows.append(_row("sft_human", evaluate("sft_human", run_dir.stage("sft_human", "model")), run_dir))
    write_json(run_dir.summary, rows)
    audits = {
        k: audit_iteration(samples_dir=run_dir.stage(k, "samples"), verdicts_dir=run_dir.stage(k, "verdicts"))
        for k in range(1, cfg.loop.iterations + 1)
        if run_dir.is_done(k, "verdicts")
    }
    paths = write_report(
        rows,
        run_dir.root,
        title=f"ReST-EM run: {cfg.name}",
        split=cfg.eval.split,
        appendix=format_audit(audits),
    )
    print(f"\n{format_table(rows)}\n")
    print(f"summary: {run_dir.summary}\nreport:  {paths['report']}\nplot:    {paths['plot']}")
    print(f"finished in {time.time() - start:.0f} s")
    return rows


def _iteration(cfg: DictConfig, run_dir: RunDir, task, problems: list[dict], base, k: int) -> None:
    """One E-step -> verify -> snapshot -> M-step; each finished stage is skipped on a rerun."""
    policy = policy_path(run_dir, base, k)
    identity = snapshot_identity(cfg, policy=policy, problems=problems, iteration=k)
    check_snapshot_version(run_dir.stage(k, "dataset"), identity["version"], identity["inputs"])
    if not run_dir.is_done(k, "samples"):
        e_step(cfg, run_dir=run_dir, task=task, problems=problems, policy=policy, iteration=k)
    if not run_dir.is_done(k, "verdicts"):
        verify_samples(
            task=task,
            problems=problems,
            samples_dir=run_dir.stage(k, "samples"),
            out_dir=run_dir.stage(k, "verdicts"),
        )
    if not run_dir.is_done(k, "dataset"):
        snapshot_stage(cfg, run_dir=run_dir, iteration=k, base=base, policy=policy, identity=identity)
    manifest = read_json(run_dir.stage(k, "dataset") / "manifest.json")
    if manifest["num_kept"] == 0:
        raise EmptySnapshotError(
            f"iteration {k}: the snapshot kept 0 of {manifest['num_samples']} samples "
            f"(statuses: {manifest['status_counts']}); not training on an empty dataset. "
            "Set loop.stop_on_empty_snapshot=false to go on sampling with the same policy."
        )
    if not run_dir.is_done(k, "model"):
        pairs = snapshot_pairs(run_dir.stage(k, "dataset"))
        if cfg.loop.include_human_data:
            pairs += human_pairs(task, tokenizer=_tokenizer(base))
        train_from_base(
            cfg, base_path=base, pairs=pairs, out_dir=run_dir.stage(k, "model"), desc=f"M-step iteration {k}"
        )


def _tokenizer(base):
    """The base model's tokenizer, which chat-style prompts of the human pairs need."""
    from factory.models import load_tokenizer

    return load_tokenizer(base)


def _row(k: int | str, metrics: dict, run_dir: RunDir) -> dict:
    """One summary row: eval metrics plus the iteration's data statistics and stage timings."""
    row = {
        "iteration": k,
        "greedy_accuracy": metrics["greedy_accuracy"],
        "pass_at_k": metrics["pass_at_k"],
        "maj_at_k": metrics["maj_at_k"],
        "num_eval_problems": metrics["num_problems"],
        "num_problems_solved": None,
        "num_kept": None,
        "share_kept_with_valid_steps": None,
    }
    if isinstance(k, int) and k > 0:
        manifest = read_json(run_dir.stage(k, "dataset") / "manifest.json")
        row["num_problems_solved"] = manifest["num_problems_solved"]
        row["num_kept"] = manifest["num_kept"]
        row["share_kept_with_valid_steps"] = _share_valid_steps(run_dir, k)
    stages = ("samples", "verdicts", "dataset", "model", "eval") if k != 0 else ("eval",)
    row["timings"] = {s: run_dir.stage_info(k, s).get("seconds") for s in stages if run_dir.is_done(k, s)}
    return row


def _share_valid_steps(run_dir: RunDir, k: int) -> float | None:
    from datasets import load_from_disk

    ds = load_from_disk(str(run_dir.stage(k, "dataset")))["train"]
    if "steps_valid" not in ds.column_names or len(ds) == 0:
        return None
    flags = ds["steps_valid"]
    if all(x is None for x in flags):
        return None  # a verifier that does not check steps (the math tasks)
    return sum(bool(x) for x in flags) / len(flags)


main = hydra_entry(run)
