"""Dataset cards in the Hub's metadata format: one config per ReST-EM iteration, with its lineage.

The YAML block holds the Hub's own fields (``configs``, ``dataset_info``, ``license``, ``tags``, ...) and a
``restem`` mapping from config name to that snapshot's lineage (version, base model, parent policy,
iteration, counts per verdict status, samples cut at the token limit, cap, dedupe, rows dropped by
decontamination, and with ``snapshot.label=majority`` the pseudo-labels' precision against the hidden
gold), so the lineage travels with the data and a later push can read it back (``read_lineage``).
"""

from __future__ import annotations

from pathlib import Path

LINEAGE_FIELDS = (
    "version",
    "name",
    "task",
    "iteration",
    "base_model",
    "policy",
    "policy_fingerprint",
    "num_samples",
    "status_counts",
    "num_correct",
    "num_truncated",
    "num_dropped_truncated",
    "num_after_dedupe",
    "num_kept",
    "max_per_problem",
    "dedupe",
    "num_problems",
    "num_problems_solved",
    "decontaminate",
    "ngram",
    "eval_splits",
    "num_dropped_prompt_overlap",
    "num_dropped_completion_overlap",
    "label",
    "pseudo_labels",
)
TAGS = ["rest-em", "self-training", "synthetic", "verified"]


def lineage(manifest: dict) -> dict:
    """The card's lineage entry for one snapshot manifest."""
    return {k: manifest[k] for k in LINEAGE_FIELDS if k in manifest}


def size_category(n: int) -> str:
    if n < 1_000:
        return "n<1K"
    if n < 10_000:
        return "1K<n<10K"
    if n < 100_000:
        return "10K<n<100K"
    return "100K<n<1M" if n < 1_000_000 else "n>1M"


def render_card(
    entries: dict[str, dict],
    *,
    data_files: dict[str, str],
    infos: dict | None = None,
    license: str = "other",
    title: str = "ReST-EM self-training data",
) -> str:
    """A README.md (YAML metadata + prose) for one or more snapshot configs.

    Args:
        entries: config name (``iter_1``, ...) -> that snapshot's lineage (see ``lineage``).
        data_files: config name -> the train split's file pattern, relative to the card.
        infos: config name -> ``datasets.DatasetInfo`` (features, split sizes) for ``dataset_info``.
        license: the data's license id (it follows the base model's and the problems' licenses).
        title: heading and ``pretty_name``.
    """
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCard, DatasetCardData

    names = sorted(entries, key=_config_order)
    total = sum(int(entries[n].get("num_kept", 0)) for n in names)
    data = DatasetCardData(
        pretty_name=title,
        license=license,
        tags=TAGS,
        task_categories=["text-generation"],
        size_categories=[size_category(total)],
        configs=[
            {"config_name": n, "data_files": [{"split": "train", "path": data_files[n]}]} for n in names
        ],
        restem={n: entries[n] for n in names},
    )
    if infos:
        DatasetInfosDict({n: infos[n] for n in names if n in infos}).to_dataset_card_data(data)
    sections = "\n".join(_section(n, entries[n]) for n in names)
    body = f"""
# {title}

Self-generated solutions that passed a binary verifier, made by the ReST-EM factory (Singh et al. 2023,
"Beyond Human Data"). Only solutions judged correct are kept; one config per iteration. Each snapshot's
version is a hash of its inputs (policy weights, problems, sampler, verifier and snapshot settings, seed).

```python
from datasets import load_dataset
ds = load_dataset("<this repo or folder>", name="{names[0] if names else "iter_1"}", split="train")
```
{sections}"""
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _section(name: str, entry: dict) -> str:
    statuses = ", ".join(f"{k}: {v}" for k, v in (entry.get("status_counts") or {}).items())
    return f"""
## `{name}`

| field | value |
|---|---|
| version | `{entry.get("version")}` |
| task | {entry.get("task")} |
| base model | {entry.get("base_model")} |
| sampling policy (parent) | {entry.get("policy")} (weights sha256 `{str(entry.get("policy_fingerprint"))[:12]}`) |
| iteration | {entry.get("iteration")} |
| samples judged | {entry.get("num_samples")} ({statuses}) |
| correct / after dedupe / kept | {entry.get("num_correct")} / {entry.get("num_after_dedupe")} / {entry.get("num_kept")} |
| cut at the token limit (all / correct, dropped) | {entry.get("num_truncated")} / {entry.get("num_dropped_truncated")} |
| cap per problem | {entry.get("max_per_problem")} (dedupe: {entry.get("dedupe")}) |
| problems with a kept solution | {entry.get("num_problems_solved")} of {entry.get("num_problems")} |
| decontamination (dropped: statement / completion overlap) | {_decontamination(entry)} |
{_pseudo_label_rows(entry.get("pseudo_labels"))}"""


def _pseudo_label_rows(stats: dict | None) -> str:
    """Table rows for a snapshot labelled by majority vote (factory/pseudo_labels.py); "" for gold labels."""
    if not stats:
        return ""

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    return (
        f"| labels | majority vote (min_votes {stats['min_votes']}, min_share {stats['min_share']}): "
        f"{stats['num_labelled']} of {stats['num_problems']} problems labelled |\n"
        f"| label precision vs the hidden gold | {pct(stats['label_precision'])} "
        f"({stats['num_labels_correct']}/{stats['num_labelled_with_gold']}) |\n"
        f"| kept precision vs the hidden gold | {pct(stats['kept_precision'])} "
        f"({stats['num_kept_correct']}/{stats['num_kept_with_gold']}) |\n"
        f"| gold selection would keep | {stats['gold_num_kept']} samples of {stats['gold_num_problems_solved']} "
        "problems |\n"
    )


def _decontamination(entry: dict) -> str:
    if not entry.get("decontaminate"):
        return "off"
    splits = ", ".join(entry.get("eval_splits") or [])
    return (
        f"{entry.get('num_dropped_prompt_overlap')} / {entry.get('num_dropped_completion_overlap')} "
        f"(word {entry.get('ngram')}-grams vs the {splits} split(s), before the cap)"
    )


def read_lineage(card_path: Path) -> dict[str, dict]:
    """The ``restem`` lineage mapping of an existing card (empty when there is no card)."""
    from huggingface_hub import DatasetCard

    card_path = Path(card_path)
    if not card_path.is_file():
        return {}
    return dict(DatasetCard.load(card_path).data.to_dict().get("restem") or {})


def _config_order(name: str) -> tuple:
    """iter_2 before iter_10; prefixed sweep configs group by prefix."""
    head, _, tail = name.rpartition("iter_")
    return (head, int(tail)) if tail.isdigit() else (name, 0)
