"""The ReST-EM driver: base eval, then N x (E-step -> verify -> snapshot -> M-step -> eval), then the
SFT-on-human baseline, a summary, a report and a plot.

Command: ``restem experiment=arith_demo`` (the demo) or ``restem [experiment=...] key=value ...``.
Rerunning the same command skips finished stages and resumes partly written sample shards. A finished
stage made from other inputs than the config gives (another setting, model, prompt or training data) is
refused before anything is written, naming what changed (``factory/stage_inputs.py``).
"""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from eval.evaluate import evaluate_model
from eval.report import format_table, write_report
from eval.significance import gains_section
from factory.audit import audit_iteration, format_audit
from factory.config import hydra_entry, validate
from factory.curriculum import format_yield, yield_by_bucket
from factory.decontaminate import check_training_problems
from factory.decontaminate import format_section as format_decontamination
from factory.pseudo_labels import format_section as format_labels
from factory.pseudo_labels import read_manifests
from factory.rundir import RunDir, read_json, write_json
from factory.sample import NothingToSampleError, e_step
from factory.snapshot import snapshot_stage
from factory.stage_inputs import StageInputs
from factory.tasks import build_task
from factory.tracking import log_row, start_run
from factory.verify import verify_samples
from train.m_step import train_from_base

log = logging.getLogger(__name__)


class EmptySnapshotError(RuntimeError):
    """An iteration kept no verified sample; training on it would be meaningless."""


def run(cfg: DictConfig) -> list[dict]:
    """Runs (or resumes) the whole loop and returns the summary rows (also in ``summary.json``)."""
    validate(cfg)
    start = time.time()
    run_dir = RunDir(cfg.paths.run_dir)
    run_dir.check_format()
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    try:
        return _run(cfg, run_dir, task, start)
    finally:
        task.close()  # the math verifier's worker processes


def _run(cfg: DictConfig, run_dir: RunDir, task, start: float) -> list[dict]:
    stages = StageInputs(cfg, task=task, run_dir=run_dir)
    for name, problems in (("training", stages.train_problems), (f"{cfg.eval.split}", stages.eval_problems)):
        if not problems:
            raise ValueError(
                f"zero {name} problems after loading task {cfg.task.name!r}: check the task config"
            )
    # Every finished stage this run would reuse is checked first: a refused run writes nothing.
    stages.check_finished()
    run_dir.init(cfg)
    overlaps = check_training_problems(stages)  # decontamination.json (None when the check is off)
    start_run(cfg.logger)

    def evaluate(k: int | str) -> dict:
        if not stages.is_current(k, "eval"):
            evaluate_model(
                model_path=stages.model_path(k),
                task=task,
                problems=stages.eval_problems,
                settings=cfg.eval,
                out_dir=run_dir.stage(k, "eval"),
                dtype=cfg.model.dtype,
                label=f"eval {k}",
                sampler_settings=cfg.sampler,
                inputs=stages.eval(k),
                cluster=cfg.cluster,
            )
        return read_json(run_dir.stage(k, "eval") / "metrics.json")

    def row(k: int | str) -> dict:
        """k's summary row, also written to the experiment tracker (``logger``) when there is one."""
        result = _row(k, evaluate(k), run_dir)
        manifest = run_dir.stage(k, "dataset") / "manifest.json"
        log_row(cfg.logger, result, read_json(manifest) if isinstance(k, int) and k > 0 else None)
        return result

    rows = [row(0)]
    for k in range(1, cfg.loop.iterations + 1):
        try:
            _iteration(cfg, stages, k)
        except NothingToSampleError as err:
            log.warning("%s", err)
            print(f"\n{err}; stopping")
            break
        except EmptySnapshotError as err:
            log.warning("%s", err)
            print(f"\n{err}")
            if cfg.loop.stop_on_empty_snapshot:
                break
            continue
        rows.append(row(k))
    if cfg.loop.sft_baseline:
        if not stages.is_current("sft_human", "model"):
            _train(cfg, stages, "sft_human", desc="SFT on human data")
        rows.append(row("sft_human"))
    write_json(run_dir.summary, rows)
    audits = {
        k: audit_iteration(samples_dir=run_dir.stage(k, "samples"), verdicts_dir=run_dir.stage(k, "verdicts"))
        for k in range(1, cfg.loop.iterations + 1)
        if run_dir.is_done(k, "verdicts")
    }
    gains = gains_section({row["iteration"]: run_dir.stage(row["iteration"], "eval") for row in rows})
    yields = format_yield(yield_by_bucket(run_dir, list(range(1, cfg.loop.iterations + 1))))
    manifests = read_manifests(run_dir, range(1, cfg.loop.iterations + 1))
    labels = format_labels(manifests)
    decontamination = format_decontamination(overlaps, manifests)
    paths = write_report(
        rows,
        run_dir.root,
        title=f"ReST-EM run: {cfg.name}",
        split=cfg.eval.split,
        appendix="\n".join(
            part for part in (gains, labels, yields, decontamination, format_audit(audits)) if part
        ),
    )
    print(f"\n{format_table(rows)}\n")
    print(f"summary: {run_dir.summary}\nreport:  {paths['report']}\nplot:    {paths['plot']}")
    print(f"finished in {time.time() - start:.0f} s")
    return rows


def _iteration(cfg: DictConfig, stages: StageInputs, k: int) -> None:
    """One E-step -> verify -> snapshot -> M-step; each finished stage of the same inputs is skipped."""
    run_dir = stages.run_dir
    if not stages.is_current(k, "samples"):
        e_step(cfg, stages=stages, iteration=k)
    if not stages.is_current(k, "verdicts"):
        verify_samples(
            task=stages.task,
            problems=stages.train_problems,
            samples_dir=run_dir.stage(k, "samples"),
            out_dir=run_dir.stage(k, "verdicts"),
            inputs=stages.verdicts(k),
        )
    if not stages.is_current(k, "dataset"):
        snapshot_stage(
            cfg,
            run_dir=run_dir,
            iteration=k,
            base=stages.base,
            policy=stages.sampling(k)["policy"],
            identity=stages.snapshot(k),
            index=stages.overlap_index,
            task=stages.task,
            problems=stages.train_problems,
        )
    manifest = read_json(run_dir.stage(k, "dataset") / "manifest.json")
    # A curriculum's skipped problems bring their latest solutions along (StageInputs.carried_pairs).
    carried = len(stages.carried_pairs(k)) if manifest["num_kept"] == 0 else 0
    if manifest["num_kept"] == 0 and carried:
        log.warning("iteration %d: the snapshot kept 0 samples; training on %d carried solutions", k, carried)
    elif manifest["num_kept"] == 0 and cfg.loop.include_human_data:
        log.warning("iteration %d: the snapshot kept 0 samples; training on the human data alone", k)
    elif manifest["num_kept"] == 0:
        raise EmptySnapshotError(
            f"iteration {k}: the snapshot kept 0 of {manifest['num_samples']} samples "
            f"(statuses: {manifest['status_counts']}); not training on an empty dataset. "
            "Set loop.stop_on_empty_snapshot=false to go on sampling with the same policy."
        )
    if not stages.is_current(k, "model"):
        _train(cfg, stages, k, desc=f"M-step iteration {k}")


def _train(cfg: DictConfig, stages: StageInputs, k: int | str, *, desc: str) -> None:
    """Fine-tunes the base model on ``k``'s training pairs into ``k``'s model folder."""
    pairs = stages.training_pairs(k)
    train_from_base(
        cfg,
        base_path=stages.base,
        pairs=pairs,
        out_dir=stages.run_dir.stage(k, "model"),
        desc=desc,
        inputs=stages.model(k, pairs),
        track_as=f"m_step_{k}" if isinstance(k, int) else str(k),
    )


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
