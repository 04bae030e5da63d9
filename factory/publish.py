"""Publish a run's snapshots: push to a Hub dataset repository, or export to a folder in the same layout.

Commands::

    restem-publish runs/arith_demo --repo you/arith-restem              # HF_TOKEN from the environment
    restem-publish runs/arith_demo --to-dir exports/arith-restem        # local, same layout
    restem-publish multirun/arith_demo/<time>/3 --repo you/arith-restem --prefix K8-it2-

One config per iteration (``<prefix>iter_1``, ...): ``<config>/train-*.parquet`` and a README card whose
YAML lists every config with its lineage. Each push is one commit made on top of the commit it read
(``parent_commit``); when sweep jobs push to one repository at once, the Hub answers 412 (the branch
moved) or 429 (rate limit), and the push reads the repository again, merges the card and retries with
exponential backoff. A config already on the Hub is never overwritten.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from factory.card import render_card
from factory.export import (
    PARQUET_NAME,
    card_infos,
    data_files,
    export_run,
    run_snapshots,
    split_new,
    write_parquet,
)

RETRY_STATUSES = (412, 429)


def publish_run(
    run_dir: str | Path,
    repo_id: str,
    *,
    prefix: str = "",
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    license: str = "other",
    max_attempts: int = 8,
    base_delay: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Pushes every finished snapshot of ``run_dir`` to the dataset repo ``repo_id``.

    Args:
        token: a Hub token with write access; defaults to ``$HF_TOKEN``.
        endpoint: the Hub's URL; defaults to ``$HF_ENDPOINT`` or huggingface.co.
        max_attempts: tries in all when the Hub answers 412 or 429.
        base_delay: the first retry's wait in seconds (doubled each time, plus jitter; a 429's
            ``Retry-After`` header wins when it is longer).

    Returns:
        ``{"pushed": [...], "skipped": [...], "attempts": n, "commit": sha or None}``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    token = token or os.environ.get("HF_TOKEN")
    if not token:
        raise ValueError("no Hub token: set HF_TOKEN to a token with write access (or use --to-dir)")
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT"), token=token)
    snapshots = run_snapshots(run_dir, prefix=prefix)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="restem-publish-") as tmp:
        infos = {s.config: write_parquet(s, Path(tmp) / s.config / PARQUET_NAME) for s in snapshots}
        for attempt in range(1, max_attempts + 1):
            try:
                info = api.dataset_info(repo_id)
                card = info.card_data.to_dict() if info.card_data is not None else {}
                files = [s.rfilename for s in info.siblings or []]
                existing = _remote_configs(card, files)
                new = split_new(snapshots, existing, f"Hub dataset {repo_id}")
                if not new:
                    return {
                        "pushed": [],
                        "skipped": [s.config for s in snapshots],
                        "attempts": attempt,
                        "commit": None,
                    }
                entries = {**existing, **{s.config: s.lineage for s in new}}
                all_infos = {**card_infos(card), **{s.config: infos[s.config] for s in new}}
                readme = render_card(
                    entries, data_files=data_files(entries), infos=all_infos, license=license
                )
                operations = [
                    CommitOperationAdd(f"{s.config}/{PARQUET_NAME}", str(Path(tmp) / s.config / PARQUET_NAME))
                    for s in new
                ] + [CommitOperationAdd("README.md", readme.encode())]
                commit = api.create_commit(
                    repo_id,
                    repo_type="dataset",
                    operations=operations,
                    commit_message=f"ReST-EM snapshots {', '.join(s.config for s in new)}",
                    parent_commit=info.sha,
                )
                return {
                    "pushed": [s.config for s in new],
                    "skipped": [s.config for s in snapshots if s not in new],
                    "attempts": attempt,
                    "commit": commit.oid,
                }
            except HfHubHTTPError as err:
                status = err.response.status_code if err.response is not None else None
                if status not in RETRY_STATUSES or attempt == max_attempts:
                    raise
                sleep(_delay(err, attempt, base_delay))
    raise AssertionError("unreachable")  # the loop returns or raises


def _remote_configs(card: dict, files: list[str]) -> dict[str, dict]:
    """Configs already in the repository: the card's lineage, plus any config folder with data."""
    existing = {name: dict(entry) for name, entry in (card.get("restem") or {}).items()}
    for path in files:
        head, _, name = path.partition("/")
        if name.endswith(".parquet"):
            existing.setdefault(head, {})
    return existing


def _delay(err, attempt: int, base_delay: float) -> float:
    """Exponential backoff with jitter; a longer Retry-After (429) wins."""
    delay = base_delay * 2 ** (attempt - 1) * (1 + 0.25 * random.random())
    retry_after = err.response.headers.get("Retry-After") if err.response is not None else None
    if retry_after and retry_after.isdigit():
        delay = max(delay, float(retry_after))
    return delay


def main(argv: list[str] | None = None) -> None:
    """``restem-publish RUN_DIR (--repo ID | --to-dir PATH) [--prefix P] [--private] [--license L]``."""
    parser = argparse.ArgumentParser(prog="restem-publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory with finished iter_k/dataset snapshots")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo", help="Hub dataset repository id (namespace/name); token from HF_TOKEN")
    where.add_argument("--to-dir", help="export into this folder instead (the same layout, no network)")
    parser.add_argument("--prefix", default="", help="config name prefix, e.g. one per sweep point")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--license", default="other", help="the data's license id for the card")
    args = parser.parse_args(argv)
    try:
        if args.to_dir:
            result = export_run(args.run_dir, args.to_dir, prefix=args.prefix, license=args.license)
        else:
            result = publish_run(
                args.run_dir, args.repo, prefix=args.prefix, private=args.private, license=args.license
            )
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(result)
