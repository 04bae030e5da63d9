"""The M-step stage: fine-tune the BASE model on an iteration's snapshot and export it with save_pretrained.

Command: ``restem-train iteration=2`` trains ``iter_2/model`` from the base model on ``iter_2/dataset``.
The loop calls :func:`train_from_base` the same way (its data: ``factory.stage_inputs``).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from factory.config import hydra_entry
from factory.tracking import fit_tracking
from train.finetune import fine_tune_base
from train.launch import launch_fit, needs_launch


def train_from_base(
    cfg: DictConfig,
    *,
    base_path: Path,
    pairs: list[dict],
    out_dir: Path,
    desc: str,
    inputs: dict | None = None,
    track_as: str | None = None,
) -> dict:
    """Loads the base model fresh (ReST-EM never continues from the previous policy) and fine-tunes it.

    Training steps fp32 master weights; the export is in ``model.dtype`` (``train.finetune``). A fit on
    several devices of one node that no launcher started runs as its own torchrun job (``train.launch``),
    so the loop can run one multi-process M-step after another. ``inputs`` (``StageInputs.model``) are
    recorded in the model's ``stage.json``. ``track_as`` names the fit's series under ``logger`` (e.g.
    ``m_step_2``; factory/tracking.py).
    """
    extra_info = {"base_model": str(base_path)}
    if inputs is not None:
        extra_info["inputs"] = inputs
    kwargs = {
        "base_path": base_path,
        "pairs": pairs,
        "out_dir": out_dir,
        "settings": cfg.trainer,
        "export_dtype": cfg.model.dtype,
        "desc": desc,
        "extra_info": extra_info,
        "tracking": fit_tracking(cfg.logger, track_as) if track_as and "logger" in cfg else None,
    }
    select = cfg.trainer.get("select")
    if select is not None and select.every > 0:
        from factory.config import check_select_in_one_process

        check_select_in_one_process(cfg.trainer)
        callback, task = selection_callback(cfg, base_path)
        try:
            return fine_tune_base(**kwargs, callbacks=[callback])
        finally:
            task.close()  # the verifier's pool or sandbox the scoring used
    return launch_fit(**kwargs) if needs_launch(cfg.trainer) else fine_tune_base(**kwargs)


def selection_callback(cfg: DictConfig, base_path):
    """(callback, task to close after the fit) for ``trainer.select``: greedy accuracy on the first
    ``num_problems`` validation problems every ``every`` steps; the best weights are exported and the fit
    stops after ``patience`` scorings without a new best (``train.selection.BestOnValidation``; its history
    goes into the model's ``stage.json``)."""
    from factory.models import load_tokenizer
    from factory.tasks import build_task
    from train.selection import BestOnValidation, greedy_accuracy, validation_problems

    select = cfg.trainer.select
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    problems = validation_problems(task, int(select.num_problems))
    if not problems:
        task.close()
        raise ValueError("config error: trainer.select.every > 0 but the task has no validation problems")
    callback = BestOnValidation.from_settings(
        greedy_accuracy(task, problems, load_tokenizer(base_path), cfg), select
    )
    return callback, task


def run(cfg: DictConfig) -> dict:
    """Trains ``iter_{cfg.iteration}/model`` from the base model on that iteration's snapshot (a finished
    model of the same inputs is skipped, one of other inputs refused, as is a snapshot of another
    version)."""
    from factory.stage_inputs import stage_inputs

    k = int(cfg.iteration)
    with stage_inputs(cfg) as stages:
        dataset_dir, out = stages.run_dir.stage(k, "dataset"), stages.run_dir.stage(k, "model")
        if not stages.is_current(k, "dataset"):
            raise FileNotFoundError(
                f"no finished snapshot at {dataset_dir}: run restem-snapshot iteration={k} first"
            )
        if stages.is_current(k, "model"):
            return {"skipped": str(out)}
        pairs = stages.training_pairs(k)
        if not pairs:
            raise ValueError(
                f"the snapshot {dataset_dir} kept 0 samples: nothing to train on (its manifest.json has the "
                "verdict counts); sample more (sampler.num_samples) or set loop.include_human_data=true"
            )
        return train_from_base(
            cfg,
            base_path=stages.base,
            pairs=pairs,
            out_dir=out,
            desc=f"M-step iteration {k}",
            inputs=stages.model(k, pairs),
            track_as=f"m_step_{k}",
        )


main = hydra_entry(run)
