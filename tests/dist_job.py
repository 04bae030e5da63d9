"""A tiny M-step under a multi-process trainer config; run by tests/test_train_dist.py.

Usage: python tests/dist_job.py OUT_DIR TRAINER [override ...]. Lightning starts the other ranks by
running this same command again, as it does for ``restem-train trainer=ddp``.
"""

from __future__ import annotations

import sys

from conftest import TINY_SHAPE  # tests/ is sys.path[0] when this file runs as a script

from factory.config import compose
from factory.models import build_tiny_model, train_char_tokenizer
from train.finetune import fine_tune

# Shared with the test's single-process reference run.
PAIRS = [
    {"prompt": f"Q: {a}+{b}\nA: ", "completion": f"{a}+{b}={a + b}. Answer: {a + b}"}
    for a in range(1, 9)
    for b in range(1, 6)
]
CPU = [
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.compile=false",
    "trainer.devices=2",
    "trainer.batch_size=2",
    "trainer.global_batch_size=8",
    "trainer.max_steps=6",
    "trainer.warmup_steps=2",
    "trainer.lr=3e-3",
    "trainer.progress_bar=false",
]


def tiny_model():
    tokenizer = train_char_tokenizer([p["prompt"] + p["completion"] for p in PAIRS])
    return build_tiny_model(tokenizer, **TINY_SHAPE, seed=0), tokenizer


def main(out_dir: str, trainer: str, *overrides: str) -> None:
    cfg = compose(["paths.run_dir=unused", f"trainer={trainer}", *CPU, *overrides])
    model, tokenizer = tiny_model()
    fine_tune(model=model, tokenizer=tokenizer, pairs=PAIRS, out_dir=out_dir, settings=cfg.trainer)


if __name__ == "__main__":
    main(*sys.argv[1:])
