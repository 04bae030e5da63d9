"""Content-addressed versions: a snapshot's id is a hash of everything that made it.

The inputs are the sampling policy's *weights* (not its path), the training problems, the sampler,
verifier and snapshot settings and the seeds. The same inputs give the same version wherever the run
directory lives (sweep jobs, resumed runs); a changed input gives a new one. A finished snapshot is never
overwritten: a run directory whose snapshot has another version is refused (``check_snapshot_version``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from factory.rundir import read_json, write_json

VERSION_CHARS = 12  # short id used in names; the manifest keeps the full hash
FINGERPRINT_FILE = ".restem-fingerprint.json"  # per-folder cache of the weights hash
RUN_RECORDS = ("stage.json", "train_log.json")
# Settings that change how fast samples come, never which samples come (per-(problem, sample) seeding).
SAMPLER_THROUGHPUT_KEYS = (
    "batch_size",
    "shard_size",
    "cache",
    # vLLM engine settings that change its speed and memory, not the samples it draws.
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "max_num_seqs",
    "enable_prefix_caching",
    "enforce_eager",
    "cpu_kvcache_space",
)
# The verifier's worker count changes its speed, not its verdicts.
TASK_THROUGHPUT_KEYS = ("verifier_workers",)


def digest(obj: object) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (stable across processes)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def weights_fingerprint(model_dir: str | Path) -> str:
    """sha256 over a model folder's files (weights, config, tokenizer), cached next to them.

    A name that is not a local folder (a Hub model id) is fingerprinted by its name: pin a revision
    by downloading it to a folder if the name's weights may change under you.
    """
    path = Path(model_dir)
    if not path.is_dir():
        return digest({"hub_name": str(model_dir)})
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    # Run records (timings, losses) are not the model: two trainings of identical weights match.
    files = [p for p in files if p.name not in RUN_RECORDS]
    stamp = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    cache = path / FINGERPRINT_FILE
    if cache.is_file():
        try:
            cached = read_json(cache)
            if cached.get("stamp") == [list(s) for s in stamp]:
                return cached["sha256"]
        except ValueError:
            pass  # a damaged cache file is recomputed
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    sha = h.hexdigest()
    if os.access(path, os.W_OK):
        write_json(cache, {"stamp": stamp, "sha256": sha})
    return sha


def problems_fingerprint(problems: list[dict]) -> str:
    """sha256 of the problems in order (ids, questions, answers: everything the prompt and verifier see)."""
    return digest(problems)


def _settings(cfg: DictConfig, name: str, drop: tuple[str, ...]) -> dict:
    values = OmegaConf.to_container(cfg[name], resolve=True)
    return {k: v for k, v in values.items() if k not in drop}


def sampling_inputs(cfg: DictConfig, *, policy_fingerprint: str, problems_sha: str, iteration: int) -> dict:
    """What determines the E-step's samples, apart from how many are drawn per problem.

    The iteration is included because an E-step that samples the same policy again (after an empty
    snapshot) draws new samples (``sample.policy_draw``), so samples of one policy differ by iteration.
    """
    sampler = _settings(cfg, "sampler", SAMPLER_THROUGHPUT_KEYS + ("num_samples",))
    return {
        "policy": policy_fingerprint,
        "problems": problems_sha,
        "sampler": sampler,
        "dtype": cfg.model.dtype,
        "iteration": iteration,
    }


def snapshot_inputs(cfg: DictConfig, *, policy_fingerprint: str, problems_sha: str, iteration: int) -> dict:
    """Everything that determines iteration ``iteration``'s snapshot: the version's preimage."""
    return {
        **sampling_inputs(
            cfg, policy_fingerprint=policy_fingerprint, problems_sha=problems_sha, iteration=iteration
        ),
        "num_samples": int(cfg.sampler.num_samples),
        "verifier": _settings(cfg, "task", TASK_THROUGHPUT_KEYS),
        "snapshot": OmegaConf.to_container(cfg.snapshot, resolve=True),
        "seed": int(cfg.seed),
    }


def snapshot_version(inputs: dict) -> str:
    """The full version hash of a snapshot's inputs (``version[:12]`` names it)."""
    return digest(inputs)


def snapshot_name(task: str, iteration: int, version: str) -> str:
    """A human-readable, unique name: ``<task>-iter<k>-<version[:12]>``."""
    return f"{task}-iter{iteration}-{version[:VERSION_CHARS]}"


def snapshot_identity(cfg: DictConfig, *, policy, problems: list[dict], iteration: int) -> dict:
    """The version, name, policy fingerprint and hashed inputs of iteration ``iteration``'s snapshot."""
    fingerprint = weights_fingerprint(policy)
    inputs = snapshot_inputs(
        cfg,
        policy_fingerprint=fingerprint,
        problems_sha=problems_fingerprint(problems),
        iteration=iteration,
    )
    version = snapshot_version(inputs)
    return {
        "version": version,
        "name": snapshot_name(cfg.task.name, iteration, version),
        "policy_fingerprint": fingerprint,
        "inputs": inputs,
    }


def check_snapshot_version(dataset_dir: Path, version: str, inputs: dict) -> None:
    """Refuses a finished snapshot made from other inputs; it is never overwritten.

    Raises:
        FileExistsError: naming both versions and the inputs that differ.
    """
    manifest_path = Path(dataset_dir) / "manifest.json"
    if not manifest_path.is_file():
        return
    manifest = read_json(manifest_path)
    found = manifest.get("version")
    if found is None or found == version:
        return  # same inputs (or a snapshot from before versions existed): reuse it
    old = manifest.get("inputs", {})
    changed = sorted(_diff_keys(old, inputs))
    raise FileExistsError(
        f"{dataset_dir} holds snapshot version {found[:VERSION_CHARS]}, but this config makes version "
        f"{version[:VERSION_CHARS]} (changed: {', '.join(changed) or 'inputs'}). A finished snapshot is "
        "never overwritten: use a new paths.run_dir (or a sweep, which gives each point its own)."
    )


def _diff_keys(old: dict, new: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key in set(old) | set(new):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys |= _diff_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.add(f"{prefix}{key}")
    return keys
