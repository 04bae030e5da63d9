"""Resuming an interrupted M-step: periodic Lightning checkpoints in the model stage's ``.partial`` folder.

The folder also holds a fingerprint of the settings, the data and the model config; a rerun whose
fingerprint differs starts over (its checkpoints belong to another run), one that matches resumes from
the newest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from factory.rundir import read_json, write_json

log = logging.getLogger(__name__)

_STEP = re.compile(r"step-(\d+)\.ckpt$")
# Settings that do not change what is trained.
_NOT_FINGERPRINTED = ("progress_bar", "checkpoint_every_n_steps")


def fingerprint(settings: DictConfig, pairs: list[dict], model_config: str = "") -> str:
    """A hash of everything a checkpoint's training depends on."""
    trainer = {
        k: v for k, v in OmegaConf.to_container(settings, resolve=True).items() if k not in _NOT_FINGERPRINTED
    }
    payload = json.dumps({"settings": trainer, "pairs": pairs, "model": model_config}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class _StepCheckpoint(ModelCheckpoint):
    """Every-n-steps checkpoints, none at the last step (the finished model is exported instead)."""

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step < trainer.max_steps:
            super().on_train_batch_end(trainer, *args, **kwargs)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        """Writes ``<name>.tmp`` and renames it into place: a kill mid-write never leaves a truncated newest
        checkpoint (``last()`` only sees ``step-*.ckpt``)."""
        tmp = f"{filepath}.tmp"
        if trainer.is_global_zero and Path(tmp).exists():
            shutil.rmtree(tmp) if Path(tmp).is_dir() else Path(tmp).unlink()
        trainer.strategy.barrier("restem_checkpoint_tmp")
        super()._save_checkpoint(trainer, tmp)
        trainer.strategy.barrier("restem_checkpoint_saved")
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        trainer.strategy.barrier("restem_checkpoint_renamed")
        self._last_checkpoint_saved = filepath


class CheckpointResume:
    """Checkpoints of one fit under ``partial/checkpoints`` and the newest one to resume from."""

    def __init__(self, partial: Path, *, settings: DictConfig, pairs: list[dict], model_config: str = ""):
        self.partial = Path(partial)
        self.dir = self.partial / "checkpoints"
        self.key = fingerprint(settings, pairs, model_config)
        marker = self.partial / "fingerprint.json"
        if marker.is_file() and read_json(marker).get("key") != self.key:
            log.warning("%s holds checkpoints of other settings or data: starting over", self.partial)
            shutil.rmtree(self.partial, ignore_errors=True)

    def callbacks(self, every_n_steps: int) -> list:
        """A ModelCheckpoint keeping only the newest ``step-N.ckpt`` (none when ``every_n_steps`` is 0)."""
        if every_n_steps <= 0:
            return []
        write_json(self.partial / "fingerprint.json", {"key": self.key})
        return [
            _StepCheckpoint(
                dirpath=self.dir,
                filename="step-{step}",
                auto_insert_metric_name=False,
                every_n_train_steps=every_n_steps,
                save_top_k=1,
                save_on_train_epoch_end=False,
                enable_version_counter=False,
            )
        ]

    def last(self) -> str | None:
        """The newest checkpoint, or None."""
        found = sorted(self.dir.glob("step-*.ckpt"), key=self.step_of) if self.dir.is_dir() else []
        return str(found[-1]) if found else None

    @staticmethod
    def step_of(path: str | Path) -> int:
        match = _STEP.search(str(path))
        return int(match.group(1)) if match else -1
