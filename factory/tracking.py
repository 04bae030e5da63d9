"""Experiment tracking on Lightning's loggers (``logger=tensorboard``): one folder per run, one TensorBoard
"run" per series in it, so the M-steps' curves and the iterations' metrics overlay in one view.

- ``m_step_<k>`` and ``sft_human``: each fit's ``train_loss`` (the optimizer step's global-batch loss, as
  in the model's ``train_log.json``), learning rate (``lr-AdamW/...``) and ``tokens_per_s``, every
  ``logger.every_n_steps`` optimizer steps (train/finetune.py). A fit that starts from scratch clears its
  series first; one that resumes from a checkpoint writes the steps after that checkpoint again.
- ``iterations``: per iteration (the step is the iteration; 0 is the base model) the evaluation's
  ``eval/greedy_accuracy``, ``eval/pass@k``, ``eval/maj@k``, the E-step's ``e_step/problems_solved``,
  ``e_step/kept`` and ``e_step/status/<status>``, the stages' ``seconds/<stage>``, and the snapshot's
  name (with its version) as text (``snapshot/version``).
- ``baseline``: the SFT baseline's row at step 0.

The loop clears ``iterations`` and ``baseline`` when it starts and writes every row again from the run
directory's finished stages, so a resumed run's series hold each value once. ``logger=none`` (the
default) builds nothing and imports nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import DictConfig

ITERATIONS = "iterations"
BASELINE = "baseline"
INSTALL = "config error: logger=tensorboard needs the tensorboard package: pip install -e '.[tracking]'"


def fit_tracking(settings: DictConfig, name: str) -> dict | None:
    """What a fit needs to build its logger (plain values: it crosses into torchrun jobs), or None."""
    if settings.kind == "none":
        return None
    return {
        "kind": str(settings.kind),
        "save_dir": str(settings.save_dir),
        "name": name,
        "every_n_steps": int(settings.every_n_steps),
    }


def clear_series(tracking: dict) -> None:
    """Removes one series' folder (its event files), before it is written from the start again."""
    shutil.rmtree(Path(tracking["save_dir"]) / tracking["name"], ignore_errors=True)


def start_run(settings: DictConfig) -> None:
    """Clears the per-iteration series (the loop writes every row again from the run directory)."""
    for name in (ITERATIONS, BASELINE):
        tracking = fit_tracking(settings, name)
        if tracking:
            clear_series(tracking)


def tensorboard_installed() -> bool:
    """Whether ``import tensorboard`` would find the package (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("tensorboard") is not None
    except ValueError:  # in sys.modules with no spec (a test's stand-in)
        return False


def make_logger(tracking: dict | None):
    """The Lightning logger of ``tracking`` (from :func:`fit_tracking`), or None when there is none."""
    if not tracking:
        return None
    if tracking["kind"] != "tensorboard":
        raise ValueError(f"config error: logger.kind={tracking['kind']!r}; allowed: none, tensorboard")
    if not tensorboard_installed():  # Lightning would fall back to tensorboardX, or fail at the first log
        raise ValueError(INSTALL)
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(
        save_dir=tracking["save_dir"], name="", version=tracking["name"], default_hp_metric=False
    )


def iteration_metrics(row: dict, manifest: dict | None) -> dict[str, float]:
    """The scalars of one summary row (``factory.loop._row``) and its snapshot's manifest."""
    metrics = {"eval/greedy_accuracy": row["greedy_accuracy"]}
    metrics.update({f"eval/pass@{k}": v for k, v in (row.get("pass_at_k") or {}).items()})
    metrics.update({f"eval/maj@{k}": v for k, v in (row.get("maj_at_k") or {}).items()})
    for key in ("num_problems_solved", "num_kept", "share_kept_with_valid_steps"):
        if row.get(key) is not None:
            metrics[f"e_step/{key.removeprefix('num_')}"] = row[key]
    for status, count in ((manifest or {}).get("status_counts") or {}).items():
        metrics[f"e_step/status/{status}"] = count
    for stage, seconds in (row.get("timings") or {}).items():
        if seconds is not None:
            metrics[f"seconds/{stage}"] = seconds
    return {key: float(value) for key, value in metrics.items() if value is not None}


def log_row(settings: DictConfig, row: dict, manifest: dict | None = None) -> None:
    """Writes one summary row: iteration k at step k of ``iterations``, the SFT baseline in ``baseline``."""
    if settings.kind == "none":
        return
    k = row["iteration"]
    name, step = (ITERATIONS, int(k)) if isinstance(k, int) else (BASELINE, 0)
    logger = make_logger(fit_tracking(settings, name))
    logger.log_metrics(iteration_metrics(row, manifest), step=step)
    if manifest and manifest.get("name"):
        logger.experiment.add_text("snapshot/version", str(manifest["name"]), global_step=step)
    logger.finalize("success")


def read_scalars(folder: Path | str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] of one series folder's event files (tests, notebooks)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
