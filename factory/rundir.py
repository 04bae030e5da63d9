"""The run directory: the one contract between stages.

Layout (see docs/run_directory.md): ``iter_k/{samples,verdicts,dataset,model,eval}``,
``sft_human/{model,eval}``, ``summary.json``, ``report.md``, ``plots/``. A stage writes into a temporary
sibling and renames it into place when complete, so a crash never leaves a half-written stage that looks
finished. Its ``stage.json`` records the inputs it was made from (``factory/stage_inputs.py``); a finished
stage whose inputs differ from the current config's is refused (``StaleStageError``), never reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Bump when the layout changes incompatibly. 2: every stage.json records its inputs (format-1 stages
# record none and could not be checked against a new config).
RUN_FORMAT_VERSION = 2
STAGE_FILE = "stage.json"
PARTIAL_INPUTS_FILE = ".inputs.json"  # in a resumable stage's .partial folder: the inputs its shards are for
NEW_RUN_DIR = "run with a new name=... (or paths.run_dir=...), which starts a new run directory"

log = logging.getLogger(__name__)


class StaleStageError(FileExistsError):
    """A finished stage was made from other inputs than the current config gives (never reused)."""


class RunDir:
    """Paths of one run; every stage asks here instead of building paths from strings."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def iteration(self, k: int | str) -> Path:
        return self.root / (k if isinstance(k, str) else f"iter_{k}")

    def stage(self, k: int | str, name: str) -> Path:
        return self.iteration(k) / name

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def is_done(self, k: int | str, name: str) -> bool:
        return (self.stage(k, name) / STAGE_FILE).is_file()

    def stage_info(self, k: int | str, name: str) -> dict:
        path = self.stage(k, name) / STAGE_FILE
        return read_json(path) if path.is_file() else {}

    def check_format(self) -> None:
        """Refuses a run dir written by an incompatible version of the layout (writes nothing)."""
        marker = self.root / "run_format.json"
        if marker.exists():
            found = read_json(marker).get("version")
            if found != RUN_FORMAT_VERSION:
                raise RuntimeError(
                    f"run directory {self.root} was written by run format {found}; this version reads "
                    f"format {RUN_FORMAT_VERSION}. Use a new paths.run_dir (nothing was changed)."
                )

    def init(self, cfg: DictConfig) -> None:
        """Creates the run dir, refuses one written by an incompatible version, saves the config.

        Call it once the finished stages have been checked against ``cfg``: ``config.yaml`` is the config
        of the last run that was not refused.
        """
        self.check_format()
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / "run_format.json"
        if not marker.exists():
            write_json(marker, {"version": RUN_FORMAT_VERSION})
        write_text(self.root / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yields a temporary sibling of ``final``; renames it to ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    _remove_stale_tmp(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        # An unfinished stage from an earlier crash (no stage.json) is replaced; a finished one never is.
        if (final / STAGE_FILE).exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{final} is a finished stage and is never overwritten")
        shutil.rmtree(final)
    os.replace(tmp, final)


def _remove_stale_tmp(final: Path) -> None:
    """Removes temporary siblings of ``final`` left by killed processes (their pid no longer runs)."""
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def digest(obj: object) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (stable across processes)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def mark_done(stage_dir: Path, *, seconds: float, inputs: dict | None = None, **info: Any) -> None:
    """Writes ``stage.json``: its presence is what makes a stage count as finished.

    Args:
        stage_dir: the (temporary) stage folder.
        seconds: how long the stage took.
        inputs: what the stage was made from (``factory/stage_inputs.py``), recorded with its sha256.
        info: counts and other run records.
    """
    record = {"seconds": round(seconds, 3), "finished_at": time.time(), **info}
    if inputs is not None:
        record.update(inputs=inputs, inputs_sha256=digest(inputs))
    write_json(Path(stage_dir) / STAGE_FILE, record)


def partial_dir(out_dir: Path) -> Path:
    """The hidden sibling a resumable stage (samples, verdicts) writes its shards into."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.partial")


def claim_partial(out_dir: Path, inputs: dict | None) -> Path:
    """Readies ``out_dir``'s ``.partial`` folder for work made from ``inputs`` and returns it.

    Shards that a stopped run made from other inputs (another config, or a version that recorded none)
    are removed, so a resume never mixes them with this config's. The inputs are kept in the folder
    until the stage finishes and records them (``finish_partial``). ``inputs=None`` records none.
    """
    work = partial_dir(out_dir)
    work.mkdir(parents=True, exist_ok=True)
    marker = work / PARTIAL_INPUTS_FILE
    if inputs is None:
        marker.unlink(missing_ok=True)  # unknown inputs: the stage must not claim an earlier run's
        return work
    found = read_json(marker).get("inputs_sha256") if marker.is_file() else None
    if found != digest(inputs):
        if any(work.iterdir()):
            log.warning("%s holds work made from other inputs: starting the stage over", work)
        shutil.rmtree(work)
        work.mkdir(parents=True)
        write_json(marker, {"inputs": inputs, "inputs_sha256": digest(inputs)})
    return work


def finish_partial(work: Path, out_dir: Path, *, seconds: float, **info: Any) -> None:
    """Marks the ``.partial`` folder ``work`` done, with the inputs it was claimed for, and renames it to
    ``out_dir``: the stage is then finished."""
    marker = Path(work) / PARTIAL_INPUTS_FILE
    inputs = read_json(marker)["inputs"] if marker.is_file() else None
    mark_done(work, seconds=seconds, inputs=inputs, **info)
    os.replace(work, out_dir)
    (Path(out_dir) / PARTIAL_INPUTS_FILE).unlink(missing_ok=True)  # stage.json holds them now


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt JSON file {path}: {err}") from err


def read_parquet(path: Path, columns: list[str] | None = None):
    """Reads one parquet file; a damaged file is named in the error with what to do about it."""
    import polars as pl

    try:
        return pl.read_parquet(path, columns=columns)
    except Exception as err:  # polars raises several types for damaged files
        raise _corrupt_shard(path, err) from err


def _corrupt_shard(path: Path, err: Exception) -> ValueError:
    return ValueError(f"corrupt parquet shard {path}: {err}. Delete it and rerun to regenerate it.")


def scan_shards(stage_dir: Path):
    """A lazy scan over a stage's ``shard-*.parquet`` files in order; a damaged footer is named now."""
    import polars as pl

    paths = sorted(Path(stage_dir).glob("shard-*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no parquet shards in {stage_dir}")
    for path in paths:
        try:
            pl.read_parquet_schema(path)  # the footer only: cheap, and catches truncated or foreign files
        except Exception as err:
            raise _corrupt_shard(path, err) from err
    return pl.scan_parquet(paths)


def read_shards(stage_dir: Path, columns: list[str] | None = None):
    """Reads and concatenates a stage's ``shard-*.parquet`` files in order."""
    import polars as pl

    paths = sorted(Path(stage_dir).glob("shard-*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no parquet shards in {stage_dir}")
    return pl.concat([read_parquet(p, columns) for p in paths])
