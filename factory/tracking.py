"""Experiment tracking on Lightning's loggers (``logger=tensorboard``): one folder per run, one TensorBoard
"run" per series in it, so the M-steps' curves and the iterations' metrics overlay in one view.

- ``m_step_<k>`` and ``sft_human``: each fit's ``loss``, learning rate (``lr-AdamW/...``) and
  ``tokens_per_s``, every ``logger.every_n_steps`` optimizer steps (train/finetune.py).
- ``iterations``: per iteration (the step is the iteration; 0 is the base model) the evaluation's
  ``eval/greedy_accuracy``, ``eval/pass@k``, ``eval/maj@k``, the E-step's ``e_step/problems_solved``,
  ``e_step/kept`` and ``e_step/status/<status>``, the stages' ``seconds/<stage>``, and the snapshot's
  version as text (``snapshot/version``).
- ``sft_human``: the SFT baseline's ``eval/*`` at step 0.

A resumed run writes the finished iterations' values again at the same steps (the same numbers).
``logger=none`` (the default) builds nothing and imports nothing.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

ITERATIONS = "iterations"


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


def make_logger(tracking: dict | None):
    """The Lightning logger of ``tracking`` (from :func:`fit_tracking`), or None when there is none."""
    if not tracking:
        return None
    if tracking["kind"] != "tensorboard":
        raise ValueError(f"config error: logger.kind={tracking['kind']!r}; allowed: none, tensorboard")
    try:
        import tensorboard  # noqa: F401  Lightning would fall back to tensorboardX, or fail later
    except ImportError as err:
        raise ImportError(
            "logger=tensorboard needs the tensorboard package: pip install -e '.[tracking]'"
        ) from err
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
    """Writes one summary row: iteration k at step k of ``iterations``, the SFT baseline as ``sft_human``."""
    if settings.kind == "none":
        return
    k = row["iteration"]
    name, step = (ITERATIONS, int(k)) if isinstance(k, int) else (str(k), 0)
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
