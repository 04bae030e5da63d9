"""Decontamination: n-gram overlap of training text with the run's evaluation sets (GPT-3's check).

Texts are compared as normalised word n-grams: Unicode NFKC, lowercase, and words are the maximal runs
of letters, digits and underscores (regex ``\\w+``), so whitespace, punctuation, LaTeX and code symbols
only separate words (``"3+4=7."`` is ``3 4 7``). A training text overlaps when it shares one n-gram
(default n = 13, as GPT-3's filter) with an evaluation text.

Evaluation texts are the raw problem statements and gold solutions (``question``, ``solution``: every
task's problem dict has both) of every evaluation set of the run (:func:`evaluation_splits`), never the
rendered prompts, whose template and few-shot exemplars every training prompt shares.

An evaluation text shorter than n words has no n-gram. GPT-3 (Brown et al. 2020, appendix C) measured
overlap with N = the 5th-percentile example length, but not below 8 words on non-synthetic tasks because
shorter N collide spuriously. Likewise here: a text of ``min(n, 8) <= m < n`` words is matched whole (its
m words in a row), and a text of fewer words is not checked (counted as ``num_too_short``): "answer 5"
or a one-line formula would match countless unrelated solutions.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

import polars as pl
from omegaconf import DictConfig

EVAL_FIELDS = ("question", "solution")  # the statement and the gold solution of a problem dict
MIN_WORDS = 8  # GPT-3's smallest N on non-synthetic tasks (appendix C)
MAX_EXAMPLES = 20  # overlaps shown in the manifest and the report
_WORD_RE = re.compile(r"\w+")
REASONS = ("prompt", "completion")
OVERLAPS_FILE = "decontamination.json"  # in the run dir: the training problems that overlap


def words(text: str) -> list[str]:
    """The normalised words of ``text`` (NFKC, lowercase, ``\\w+`` runs)."""
    return _WORD_RE.findall(unicodedata.normalize("NFKC", text).lower())


def _grams(tokens: list[str], n: int) -> Iterable[tuple[str, ...]]:
    return zip(*(tokens[i:] for i in range(n)), strict=False)


class OverlapIndex:
    """The n-grams of a set of evaluation texts, for fast membership checks of many training texts.

    Args:
        texts: evaluation texts as dicts with ``problem_id``, ``split`` and ``text``.
        n: the n-gram length (>= 1).
    """

    def __init__(self, texts: list[dict], *, n: int):
        if n < 1:
            raise ValueError(f"config error: snapshot.ngram must be >= 1, got {n}")
        self.n, self.floor = n, min(n, MIN_WORDS)
        self.num_texts = len(texts)
        self.splits = list(dict.fromkeys(t["split"] for t in texts))
        self.num_too_short = 0
        self._grams: dict[tuple[str, ...], int] = {}
        # Texts of floor..n-1 words, keyed by their first `floor` words (one lookup per position).
        self._short: dict[tuple[str, ...], list[tuple[tuple[str, ...], int]]] = {}
        self._texts = texts
        for i, entry in enumerate(texts):
            tokens = words(entry["text"])
            if len(tokens) >= n:
                for gram in _grams(tokens, n):
                    self._grams.setdefault(gram, i)
            elif len(tokens) >= self.floor:
                self._short.setdefault(tuple(tokens[: self.floor]), []).append((tuple(tokens), i))
            else:
                self.num_too_short += 1

    def find(self, text: str) -> dict | None:
        """The first evaluation text ``text`` overlaps (``problem_id``, ``split``, the shared ``ngram``),
        or None."""
        tokens = words(text)
        if len(tokens) >= self.n and self._grams:
            hits = self._grams.keys() & set(_grams(tokens, self.n))
            if hits:
                gram = min(hits, key=lambda g: self._grams[g])  # deterministic: the first eval text
                return self._match(self._grams[gram], gram)
        if self._short and len(tokens) >= self.floor:
            for gram in _grams(tokens, self.floor):
                for full, i in self._short.get(gram, ()):
                    if _contains(tokens, full):
                        return self._match(i, full)
        return None

    def _match(self, i: int, gram: tuple[str, ...]) -> dict:
        entry = self._texts[i]
        return {"eval_problem_id": entry["problem_id"], "eval_split": entry["split"], "ngram": " ".join(gram)}


def _contains(tokens: list[str], part: tuple[str, ...]) -> bool:
    m = len(part)
    return any(tuple(tokens[i : i + m]) == part for i in range(len(tokens) - m + 1))


def evaluation_splits(cfg: DictConfig) -> list[str]:
    """The run's evaluation sets: the test split, the eval split, and the validation split when
    evaluation or model selection (``trainer.select``, ``model.pretrain.select``) uses it."""
    splits = ["test"]
    uses_validation = (
        cfg.eval.split == "validation"
        or cfg.trainer.select.every > 0
        or (cfg.model.name_or_path is None and cfg.model.pretrain.select.every > 0)
    )
    if uses_validation:
        splits.append("validation")
    return splits


def evaluation_texts(task, cfg: DictConfig) -> list[dict]:
    """The statements and gold solutions of every problem of the run's evaluation sets (whole splits:
    ``eval.limit`` and ``select.num_problems`` only pick a head of them)."""
    texts = []
    for split in evaluation_splits(cfg):
        for problem in task.load_problems(split=split):
            for field in EVAL_FIELDS:
                value = problem.get(field)
                if isinstance(value, str) and value.strip():
                    texts.append({"problem_id": str(problem["problem_id"]), "split": split, "text": value})
    return texts


def texts_fingerprint(texts: list[dict]) -> str:
    """sha256 of the evaluation texts in order (a changed evaluation set changes the snapshot version)."""
    h = hashlib.sha256()
    for entry in texts:
        for part in (entry["split"], entry["problem_id"], entry["text"]):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def drop_overlapping(
    rows: pl.DataFrame, index: OverlapIndex, *, statements: dict[str, str] | None = None
) -> tuple[pl.DataFrame, dict]:
    """Drops rows whose problem or completion overlaps an evaluation text.

    The problem check reads the problem's statement (``statements``: problem id -> ``question``), not the
    rendered prompt, whose few-shot exemplars and instruction every prompt shares: one exemplar that
    overlaps a test text would otherwise drop every row. A row of a problem without a statement there (or
    with no ``statements``) is checked by its prompt. Reason ``prompt`` covers both; a row whose problem and
    completion both overlap counts under ``prompt``. Each problem is checked once.

    Returns:
        (the clean rows in order, ``{"num_dropped_prompt", "num_dropped_completion", "examples"}``)
    """
    statements = statements or {}
    problem_hits: dict[tuple[str, str], dict | None] = {}
    reasons, examples = [], []
    for problem_id, sample_idx, prompt, completion in rows.select(
        "problem_id", "sample_idx", "prompt", "completion"
    ).iter_rows():
        key = (problem_id, prompt)
        if key not in problem_hits:
            problem_hits[key] = index.find(statements.get(problem_id, prompt))
        hit, reason = problem_hits[key], "prompt"
        if hit is None:
            hit, reason = index.find(completion), "completion"
        reasons.append(reason if hit else None)
        if hit and len(examples) < MAX_EXAMPLES:
            examples.append({"problem_id": problem_id, "sample_idx": sample_idx, "reason": reason, **hit})
    flags = pl.Series(reasons, dtype=pl.String)
    counts = {f"num_dropped_{r}": int((flags == r).sum()) for r in REASONS}
    return rows.filter(flags.is_null()), {**counts, "examples": examples}


def training_overlaps(problems: list[dict], index: OverlapIndex) -> list[dict]:
    """The training problems whose statement overlaps an evaluation text, with what they share."""
    found = []
    for problem in problems:
        hit = index.find(problem["question"])
        if hit:
            found.append({"train_problem_id": str(problem["problem_id"]), **hit})
    return found


def check_training_problems(stages) -> dict | None:
    """Writes which training problems overlap the run's evaluation sets to ``decontamination.json`` in the
    run dir and returns that record (None, and nothing written, when ``snapshot.decontaminate`` is off).

    The E-step still samples them (its recorded inputs stay those of existing runs); their samples are
    dropped from the snapshots by the same check of their statement (``drop_overlapping``).

    Args:
        stages: the run's ``StageInputs``.
    """
    from factory.rundir import write_json

    index = stages.overlap_index
    if index is None:
        return None
    record = {
        "ngram": index.n,
        "eval_splits": index.splits,
        "num_eval_texts": index.num_texts,
        "num_too_short": index.num_too_short,
        "num_train_problems": len(stages.train_problems),
        "overlaps": training_overlaps(stages.train_problems, index),
    }
    write_json(stages.run_dir.root / OVERLAPS_FILE, record)
    return record


def format_section(overlaps: dict | None, manifests: dict[int, dict]) -> str:
    """The report's markdown section: per-iteration drops and the training problems that overlap.

    Args:
        overlaps: the run's ``decontamination.json`` (None when it was not written: the check is off).
        manifests: iteration -> its snapshot's manifest.
    """
    checked = {k: m for k, m in manifests.items() if m.get("decontaminate")}
    if overlaps is None and not checked:
        return ""
    lines = ["## Decontamination", ""]
    if overlaps is not None:
        lines += [
            f"Word {overlaps['ngram']}-grams of the training problems' statements and completions against "
            f"{overlaps['num_eval_texts']} evaluation texts (statements and solutions of the "
            f"{', '.join(overlaps['eval_splits'])} split(s); {overlaps['num_too_short']} too short to check).",
            "",
        ]
    if checked:
        lines += [
            "| iteration | checked (after dedupe) | dropped: statement | dropped: completion | kept |",
            "|---|---|---|---|---|",
        ]
        for k, m in sorted(checked.items()):
            lines.append(
                f"| {k} | {m.get('num_after_dedupe')} | {m.get('num_dropped_prompt_overlap')} | "
                f"{m.get('num_dropped_completion_overlap')} | {m.get('num_kept')} |"
            )
        lines.append("")
    if overlaps is not None:
        found = overlaps["overlaps"]
        lines.append(
            f"Training problems whose statement overlaps an evaluation set: {len(found)} of "
            f"{overlaps['num_train_problems']} (all in `decontamination.json`; their samples are dropped "
            "by the statement check)."
        )
        if found:
            lines += [
                "",
                "| training problem | evaluation problem (split) | shared n-gram |",
                "|---|---|---|",
            ]
            for o in found[:MAX_EXAMPLES]:
                lines.append(
                    f"| {o['train_problem_id']} | {o['eval_problem_id']} ({o['eval_split']}) | "
                    f"{o['ngram'].replace('|', '/')} |"
                )
            if len(found) > MAX_EXAMPLES:
                lines.append(f"| ... {len(found) - MAX_EXAMPLES} more | | |")
    return "\n".join(lines) + "\n"
