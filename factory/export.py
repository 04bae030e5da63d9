"""Export a run's snapshots in the Hub's layout: ``<config>/train-*.parquet`` per iteration + README card.

The folder is what ``restem-publish --repo`` pushes, and ``datasets.load_dataset(folder, name="iter_1")``
reads it back. An exported config is never overwritten: exporting the same snapshot again is a no-op and a
different version under the same config name is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from factory.card import lineage, read_lineage, render_card
from factory.rundir import RunDir, read_json, write_text

PARQUET_NAME = "train-00000-of-00001.parquet"


@dataclass
class Snapshot:
    """One finished snapshot of a run, named by its config (``<prefix>iter_<k>``)."""

    config: str
    path: Path
    lineage: dict

    @property
    def version(self) -> str:
        return str(self.lineage.get("version") or self.lineage.get("fingerprint"))


def run_snapshots(run_dir: str | Path, *, prefix: str = "") -> list[Snapshot]:
    """The finished ``iter_k/dataset`` snapshots of a run, in iteration order."""
    run = RunDir(run_dir)
    found = []
    for path in run.root.glob("iter_*/dataset"):
        k = path.parent.name.removeprefix("iter_")
        if k.isdigit() and int(k) > 0 and run.is_done(int(k), "dataset"):
            manifest = read_json(path / "manifest.json")
            entry = lineage(manifest)
            entry.setdefault("version", manifest.get("fingerprint"))
            found.append((int(k), Snapshot(f"{prefix}iter_{k}", path, entry)))
    if not found:
        raise FileNotFoundError(f"no finished snapshot (iter_k/dataset/stage.json) under {run.root}")
    return [s for _, s in sorted(found, key=lambda x: x[0])]


def split_new(snapshots: list[Snapshot], existing: dict[str, dict], where: str) -> list[Snapshot]:
    """The snapshots not yet at ``where``; refuses one whose config holds another version there."""
    new = []
    for snap in snapshots:
        if snap.config not in existing:
            new.append(snap)
            continue
        there = existing[snap.config].get("version")
        if there is not None and there != snap.version:
            raise FileExistsError(
                f"{where} already has config {snap.config} with version {str(there)[:12]}, not "
                f"{snap.version[:12]}: published snapshots are never overwritten (use another --prefix "
                "or repository)"
            )
    return new


def write_parquet(snap: Snapshot, dest: Path):
    """Writes the snapshot's train split to ``dest`` (atomically) and returns its ``DatasetInfo``."""
    from datasets import load_from_disk
    from datasets.info import DatasetInfo
    from datasets.splits import SplitDict, SplitInfo

    ds = load_from_disk(str(snap.path))["train"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    ds.to_parquet(str(tmp))
    os.replace(tmp, dest)
    splits = SplitDict(
        {"train": SplitInfo(name="train", num_examples=len(ds), num_bytes=dest.stat().st_size)}
    )
    return DatasetInfo(features=ds.features, splits=splits)


def card_infos(card_data: dict) -> dict:
    """``dataset_info`` of an existing card's metadata, per config."""
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    return dict(DatasetInfosDict.from_dataset_card_data(DatasetCardData(**card_data)))


def export_run(run_dir: str | Path, out_dir: str | Path, *, prefix: str = "", license: str = "other") -> dict:
    """Exports every finished snapshot of ``run_dir`` into ``out_dir`` (Hub layout, card merged).

    Returns:
        ``{"exported": [config, ...], "skipped": [config, ...], "path": out_dir}``.
    """
    from huggingface_hub import DatasetCard

    out = Path(out_dir)
    card_path = out / "README.md"
    existing = read_lineage(card_path)
    snapshots = run_snapshots(run_dir, prefix=prefix)
    new = split_new(snapshots, existing, str(out))
    infos = card_infos(DatasetCard.load(card_path).data.to_dict()) if card_path.is_file() else {}
    for snap in new:
        infos[snap.config] = write_parquet(snap, out / snap.config / PARQUET_NAME)
    entries = {**existing, **{s.config: s.lineage for s in new}}
    write_text(card_path, render_card(entries, data_files=data_files(entries), infos=infos, license=license))
    return {
        "exported": [s.config for s in new],
        "skipped": [s.config for s in snapshots if s not in new],
        "path": str(out),
    }


def data_files(entries: dict) -> dict[str, str]:
    """Each config's train-split pattern in the export layout."""
    return {name: f"{name}/train-*.parquet" for name in entries}
