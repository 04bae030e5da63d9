"""The M-step stage: fine-tune the BASE model on an iteration's snapshot and export it with save_pretrained.

Command: ``restem-train iteration=2`` trains ``iter_2/model`` from the base model on ``iter_2/dataset``.
The loop calls :func:`train_from_base` and :func:`snapshot_pairs` the same way.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from factory.base_model import ensure_base_model, human_pairs
from factory.config import hydra_entry
from train.finetune import fine_tune_base
from train.launch import launch_fit, needs_launch


def snapshot_pairs(dataset_dir: Path) -> list[dict]:
    """The kept samples of a snapshot (``iter_k/dataset``) as prompt/completion pairs."""
    from datasets import load_from_disk

    ds = load_from_disk(str(dataset_dir))["train"]
    return [{"prompt": p, "completion": c} for p, c in zip(ds["prompt"], ds["completion"], strict=True)]


def train_from_base(cfg: DictConfig, *, base_path: Path, pairs: list[dict], out_dir: Path, desc: str) -> dict:
    """Loads the base model fresh (ReST-EM never continues from the previous policy) and fine-tunes it.

    Training steps fp32 master weights; the export is in ``model.dtype`` (``train.finetune``). A fit on
    several devices of one node that no launcher started runs as its own torchrun job (``train.launch``),
    so the loop can run one multi-process M-step after another.
    """
    kwargs = {
        "base_path": base_path,
        "pairs": pairs,
        "out_dir": out_dir,
        "settings": cfg.trainer,
        "export_dtype": cfg.model.dtype,
        "desc": desc,
        "extra_info": {"base_model": str(base_path)},
    }
    return launch_fit(**kwargs) if needs_launch(cfg.trainer) else fine_tune_base(**kwargs)


def run(cfg: DictConfig) -> dict:
    """Trains ``iter_{cfg.iteration}/model`` from the base model on that iteration's snapshot."""
    from factory.models import load_tokenizer
    from factory.rundir import RunDir
    from factory.tasks import build_task

    run_dir = RunDir(cfg.paths.run_dir)
    k = int(cfg.iteration)
    dataset_dir = run_dir.stage(k, "dataset")
    if not run_dir.is_done(k, "dataset"):
        raise FileNotFoundError(
            f"no finished snapshot at {dataset_dir}: run restem-snapshot iteration={k} first"
        )
    pairs = snapshot_pairs(dataset_dir)
    if not pairs and not cfg.loop.include_human_data:
        raise ValueError(
            f"the snapshot {dataset_dir} kept 0 samples: nothing to train on (its manifest.json has the "
            "verdict counts); sample more (sampler.num_samples) or set loop.include_human_data=true"
        )
    base = ensure_base_model(cfg)
    if cfg.loop.include_human_data:
        task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
        pairs += human_pairs(task, tokenizer=load_tokenizer(base))
    return train_from_base(
        cfg,
        base_path=base,
        pairs=pairs,
        out_dir=run_dir.stage(k, "model"),
        desc=f"M-step iteration {k}",
    )


main = hydra_entry(run)
