"""Content-addressed versions: a snapshot's id is a hash of everything that made it.

The inputs are the sampling policy's *weights* (not its path), the training problems, the prompts as
the task renders them, the sampler, verifier and snapshot settings, the evaluation texts the rows are
decontaminated against, and the seeds. The same inputs give
the same version wherever the run directory lives (sweep jobs, resumed runs); a changed input gives a
new one. A finished snapshot is never overwritten: a run directory whose snapshot has another version is
refused (``check_snapshot_version``).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from factory.rundir import NEW_RUN_DIR, StaleStageError, digest, read_json, write_json

VERSION_CHARS = 12  # short id used in names; the manifest keeps the full hash
FINGERPRINT_FILE = ".restem-fingerprint.json"  # per-folder cache of the weights hash
RUN_RECORDS = ("stage.json", "train_log.json")
# Settings that change how fast samples come, never which samples come (per-(problem, sample) seeding).
SAMPLER_THROUGHPUT_KEYS = (
    "batch_size",
    "shard_size",
    "cache",
    "workers",
    "threads",
    # vLLM engine settings that change its speed and memory, not the samples it draws.
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "max_num_seqs",
    "enable_prefix_caching",
    "enforce_eager",
    "cpu_kvcache_space",
)
SAMPLING_CODE_VERSION = 2
# The verifier's worker count changes its speed, not its verdicts.
TASK_THROUGHPUT_KEYS = ("verifier_workers",)


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
    sha = _hash_files(str(path), tuple(stamp))
    if os.access(path, os.W_OK):
        write_json(cache, {"stamp": stamp, "sha256": sha})
    return sha


@functools.lru_cache(maxsize=64)
def _hash_files(root: str, stamp: tuple) -> str:
    """sha256 over the files named in ``stamp``; cached per process too, for folders it cannot write to
    (every stage of a rerun asks for the base model's fingerprint)."""
    h = hashlib.sha256()
    for relative, _size, _mtime in stamp:
        h.update(relative.encode())
        with open(Path(root) / relative, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def problems_fingerprint(problems: list[dict]) -> str:
    """sha256 of the problems in order (ids, questions, answers: everything the prompt and verifier see)."""
    return digest(problems)


def prompts_fingerprint(prompts: Iterable[str]) -> str:
    """sha256 of prompt strings in order: one pass, each length-prefixed so boundaries cannot shift."""
    h = hashlib.sha256()
    for prompt in prompts:
        data = prompt.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def rendered_prompts_fingerprint(task, problems: list[dict], *, tokenizer) -> str:
    """sha256 of every prompt as ``task`` renders it with ``tokenizer`` (the model's own): it covers the
    prompt style, shots, instruction wording and chat template, whatever setting changed them."""
    return prompts_fingerprint(task.format_prompt(p, tokenizer=tokenizer) for p in problems)


def _settings(cfg: DictConfig, name: str, drop: tuple[str, ...]) -> dict:
    values = OmegaConf.to_container(cfg[name], resolve=True)
    return {k: v for k, v in values.items() if k not in drop}


def sampling_inputs(
    cfg: DictConfig, *, policy_fingerprint: str, problems_sha: str, prompts_sha: str, iteration: int
) -> dict:
    """What determines the E-step's samples, apart from how many are drawn per problem.

    ``prompts_sha`` is ``rendered_prompts_fingerprint`` with the policy's tokenizer. The iteration is
    included because an E-step that samples the same policy again (after an empty snapshot) draws new
    samples (``stage_inputs.policy_draw``), so samples of one policy differ by iteration.
    """
    sampler = _settings(cfg, "sampler", SAMPLER_THROUGHPUT_KEYS + ("num_samples",))
    return {
        "policy": policy_fingerprint,
        "problems": problems_sha,
        "prompts": prompts_sha,
        "sampler": sampler,
        "dtype": cfg.model.dtype,
        "iteration": iteration,
        # The samplers' own version: 2 since they render one BOS, stop at every end id and at the task's
        # stop strings, so cached samples of version 1 are never served for the same settings.
        "sampling_code": SAMPLING_CODE_VERSION,
    }


def snapshot_inputs(
    cfg: DictConfig,
    *,
    policy_fingerprint: str,
    problems_sha: str,
    prompts_sha: str,
    iteration: int,
    eval_texts_sha: str | None = None,
) -> dict:
    """Everything that determines iteration ``iteration``'s snapshot: the version's preimage.

    ``eval_texts_sha`` fingerprints the evaluation texts the rows are decontaminated against
    (``decontaminate.texts_fingerprint``; None when ``snapshot.decontaminate`` is off).
    """
    return {
        **sampling_inputs(
            cfg,
            policy_fingerprint=policy_fingerprint,
            problems_sha=problems_sha,
            prompts_sha=prompts_sha,
            iteration=iteration,
        ),
        "num_samples": int(cfg.sampler.num_samples),
        "verifier": _settings(cfg, "task", TASK_THROUGHPUT_KEYS),
        "snapshot": snapshot_settings(cfg),
        # Only with decontamination on: snapshots made without it before it existed keep their versions.
        # The check's method joins them: the first version compared rendered prompts, not statements.
        **(
            {"eval_texts": eval_texts_sha, "decontamination": "statements"}
            if eval_texts_sha is not None
            else {}
        ),
        "seed": int(cfg.seed),
    }


# Keys that only majority-vote labelling reads: with snapshot.label=gold they change nothing, so they stay
# out of a gold snapshot's version; likewise the decontamination keys with snapshot.decontaminate=false.
# So a snapshot made before these keys existed keeps its version when they are off (arith's default).
MAJORITY_KEYS = ("label", "min_votes", "min_share")
DECONTAMINATION_KEYS = ("decontaminate", "ngram")


def snapshot_settings(cfg: DictConfig) -> dict:
    """The ``snapshot.*`` settings that shape the snapshot (the majority keys only with label=majority,
    the decontamination keys only with decontaminate=true)."""
    values = OmegaConf.to_container(cfg.snapshot, resolve=True)
    if values.get("label", "gold") == "gold":
        values = {k: v for k, v in values.items() if k not in MAJORITY_KEYS}
    if not values.get("decontaminate", False):
        values = {k: v for k, v in values.items() if k not in DECONTAMINATION_KEYS}
    return values


def snapshot_version(inputs: dict) -> str:
    """The full version hash of a snapshot's inputs (``version[:12]`` names it)."""
    return digest(inputs)


def snapshot_name(task: str, iteration: int, version: str) -> str:
    """A human-readable, unique name: ``<task>-iter<k>-<version[:12]>``."""
    return f"{task}-iter{iteration}-{version[:VERSION_CHARS]}"


def snapshot_identity(
    cfg: DictConfig,
    *,
    policy_fingerprint: str,
    problems_sha: str,
    prompts_sha: str,
    iteration: int,
    eval_texts_sha: str | None = None,
) -> dict:
    """The version, name, policy fingerprint and hashed inputs of iteration ``iteration``'s snapshot."""
    inputs = snapshot_inputs(
        cfg,
        policy_fingerprint=policy_fingerprint,
        problems_sha=problems_sha,
        prompts_sha=prompts_sha,
        iteration=iteration,
        eval_texts_sha=eval_texts_sha,
    )
    version = snapshot_version(inputs)
    return {
        "version": version,
        "name": snapshot_name(cfg.task.name, iteration, version),
        "policy_fingerprint": policy_fingerprint,
        "inputs": inputs,
    }


def check_snapshot_version(dataset_dir: Path, version: str, inputs: dict) -> None:
    """Refuses a finished snapshot made from other inputs; it is never overwritten.

    Raises:
        StaleStageError: (a FileExistsError) naming both versions and the inputs that differ, or saying
            that the snapshot records no version (made by an older version of restem).
    """
    manifest_path = Path(dataset_dir) / "manifest.json"
    if not manifest_path.is_file():
        return
    manifest = read_json(manifest_path)
    found = manifest.get("version")
    if found == version:
        return  # same inputs: reuse it
    if found is None:
        raise StaleStageError(
            f"{dataset_dir} was made by an older version of restem that did not version snapshots, so "
            f"it cannot be checked against this config; {NEW_RUN_DIR} (nothing was changed)"
        )
    old = manifest.get("inputs", {})
    changed = sorted(_diff_keys(old, inputs))
    raise StaleStageError(
        f"{dataset_dir} holds snapshot version {found[:VERSION_CHARS]}, but this config makes version "
        f"{version[:VERSION_CHARS]} (changed: {', '.join(changed) or 'inputs'}). A finished snapshot is "
        f"never overwritten: {NEW_RUN_DIR} (a sweep gives each point its own)."
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
