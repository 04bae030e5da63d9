"""reasoning-gym tasks (``task=reasoning_gym task.dataset=<name>``): procedurally generated problems,
judged by the dataset's own ``score_answer`` (factory/verifiers/reasoning_gym.py).

Splits: each of human, train, validation and test is drawn from ``reasoning_gym.create_dataset(name,
seed=<split seed>, ...)`` with its own seed derived from ``task.seed`` and the split's name. The splits are
made disjoint by question text: test is drawn first, then validation skips test's questions, human skips
both, and train skips all three (and every split skips its own repeats), so no problem the model trains
on, with or without a solution, is one it is evaluated on. A problem's id is the dataset, the split and
its index in that split's generator (``chain_sum-train-00012``), the same on every run of a config.

reasoning-gym ships no worked solutions: a human solution is the final answer line alone
(``Answer: <gold>``), which is also the one answer format the verifier reads.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache

from omegaconf import DictConfig, OmegaConf

from factory.tasks.arith import format_chat_prompt
from factory.tasks.loading import answer_strictness, config_fingerprint
from factory.verifiers import reasoning_gym as rg_verifier

INSTALL = "pip install -e '.[reasoning-gym]' (the reasoning-gym package)"
SPLITS = ("human", "train", "validation", "test")
# The order splits are drawn in: each skips the questions of the ones before it.
_DRAW_ORDER = ("test", "validation", "human", "train")
PROMPT_STYLES = ("plain", "chat")
# The chat prompt's instruction, after the question; the verifier reads the line it asks for.
CHAT_INSTRUCTION = 'Think step by step, then finish with "Answer: " followed by your final answer.'
# The config items that shape the human split and its prompts (the tiny base model's corpus): the human
# split skips the test and validation questions, so their sizes count too.
_FINGERPRINT_KEYS = (
    "name",
    "dataset",
    "dataset_config",
    "seed",
    "num_human",
    "num_validation",
    "num_test",
    "prompt_style",
)


def split_seed(seed: int, split: str) -> int:
    """The generator seed of one split: a stable hash of ``(seed, split)`` (not ``hash()``, which is
    salted per process)."""
    return int.from_bytes(hashlib.sha256(f"{seed}-{split}".encode()).digest()[:4], "big")


def draw_budget(num_problems: int) -> int:
    """Generator indices tried per split: room for the questions dropped as repeats or as another
    split's."""
    return 4 * num_problems + 100


@cache
def generate_splits(dataset: str, config_json: str, seed: int, sizes: tuple[int, ...]) -> tuple:
    """All four splits of one config: ``(problems by split, entries by problem id)``.

    Args:
        dataset: The reasoning-gym dataset name.
        config_json: ``task.dataset_config`` as sorted JSON (hashable, for the cache).
        seed: ``task.seed``.
        sizes: ``(num_human, num_train, num_validation, num_test)``.

    Returns:
        ``({split: [problem, ...]}, {problem_id: entry})``; a problem is ``problem_id``, ``split``,
        ``question``, ``answer`` (the gold text, None where the dataset has none) and ``solution``
        (``"Answer: <gold>"``; None without a gold). Entries keep the generator's ``metadata``, which
        ``score_answer`` reads, out of the problems (it need not be JSON, and problems are fingerprinted).

    Raises:
        ValueError: When a split cannot get its size of questions distinct from the other splits'.
    """
    import reasoning_gym

    config = json.loads(config_json)
    wanted = dict(zip(SPLITS, sizes, strict=True))
    taken: set[str] = set()
    problems: dict[str, list[dict]] = {}
    entries: dict[str, dict] = {}
    for split in _DRAW_ORDER:
        n = wanted[split]
        problems[split] = []
        if n == 0:
            continue
        budget = draw_budget(n)
        generator = reasoning_gym.create_dataset(dataset, seed=split_seed(seed, split), size=budget, **config)
        for index in range(budget):
            entry = generator[index]
            key = entry["question"].strip()
            if key in taken:
                continue
            taken.add(key)
            gold = None if entry["answer"] is None else str(entry["answer"])
            problem_id = f"{dataset}-{split}-{index:05d}"
            problems[split].append(
                {
                    "problem_id": problem_id,
                    "split": split,
                    "question": entry["question"],
                    "answer": gold,
                    "solution": None if gold is None else f"{rg_verifier.ANSWER_MARKER} {gold}",
                }
            )
            entries[problem_id] = entry
            if len(problems[split]) == n:
                break
        if len(problems[split]) < n:
            raise ValueError(
                f"task.dataset={dataset!r}: only {len(problems[split])} of task.num_{split}={n} {split} "
                f"questions are distinct from each other and from the other splits' in {budget} draws; "
                "lower the split sizes or widen task.dataset_config"
            )
    return problems, entries


class ReasoningGymTask:
    """One reasoning-gym dataset as a task: seeded disjoint splits, ``score_answer`` as the verifier."""

    name = "reasoning_gym"

    def __init__(self, cfg: DictConfig, *, data_dir: str | None = None):
        self.cfg = cfg  # data_dir is unused: the problems are generated
        if cfg.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"task.prompt_style must be one of {PROMPT_STYLES}, got {cfg.prompt_style!r}")
        self._verifier = None

    @property
    def _config(self) -> dict:
        config = self.cfg.dataset_config
        return {} if config is None else OmegaConf.to_container(config, resolve=True)

    def _generated(self) -> tuple:
        sizes = tuple(int(self.cfg[f"num_{split}"]) for split in SPLITS)
        config_json = json.dumps(self._config, sort_keys=True)
        return generate_splits(str(self.cfg.dataset), config_json, int(self.cfg.seed), sizes)

    def load_problems(self, *, split: str, limit: int | None = None) -> list[dict]:
        """Problems of one split (``human`` carries solutions); the same on every run of a config.

        Raises:
            ValueError: On an unknown split, or human problems of a dataset without gold answers.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        problems = self._generated()[0][split]
        if split == "human" and any(p["solution"] is None for p in problems):
            raise ValueError(
                f"task.dataset={self.cfg.dataset!r} has no reference answers (score_answer accepts any "
                "valid one), so it has no human solutions: set task.num_human=0 and use a pretrained model"
            )
        problems = [dict(p) for p in problems]  # copies: the cached splits are shared
        return problems[:limit] if limit is not None else problems

    def format_prompt(self, problem: dict, *, tokenizer=None) -> str:
        """``plain``: ``Q: <question>\\nA: `` (``tokenizer`` unused); ``chat``: the tokenizer's chat
        template with the question and :data:`CHAT_INSTRUCTION`.

        Raises:
            ValueError: For ``chat`` without a tokenizer that has a chat template.
        """
        if self.cfg.prompt_style == "chat":
            return format_chat_prompt(problem, tokenizer, instruction=CHAT_INSTRUCTION)
        return f"Q: {problem['question']}\nA: "

    def stop_strings(self) -> list[str]:
        """Plain prompts stop where a model that goes on writes the next ``Q:``; chat prompts end at the
        template's end-of-turn token."""
        return [] if self.cfg.prompt_style == "chat" else ["\nQ:"]

    def _entries(self, problems: list[dict]) -> list[dict]:
        entries = self._generated()[1]
        missing = [p["problem_id"] for p in problems if p["problem_id"] not in entries]
        if missing:
            raise ValueError(
                f"problems {missing[:3]} are not among task {self.cfg.dataset!r}'s generated problems "
                "(was the config changed since they were sampled?)"
            )
        return [entries[p["problem_id"]] for p in problems]

    def verify(
        self, problems: list[dict], completions: list[str], *, strictness: str | None = None
    ) -> list[dict]:
        """Verdicts (reward, status, detail, answer, steps_valid=None), one per completion, same order."""
        answer_strictness(self, strictness)
        return rg_verifier.verify_batch(
            completions,
            self._entries(problems),
            dataset=str(self.cfg.dataset),
            config=self._config,
            threshold=float(self.cfg.threshold),
            timeout=float(self.cfg.verifier_timeout),
            pool=self._verifier_pool(),
        )

    def answer_classes(self, problems: list[dict], answers: list[list[str | None]]) -> list[list[int | None]]:
        """Per problem, the class of each sampled answer (for maj@k): 0 for the answers :meth:`verify`
        judges correct, one id per other distinct text; None stays None."""
        return rg_verifier.answer_classes(
            self._entries(problems),
            answers,
            dataset=str(self.cfg.dataset),
            config=self._config,
            threshold=float(self.cfg.threshold),
            timeout=float(self.cfg.verifier_timeout),
            pool=self._verifier_pool(),
        )

    def _verifier_pool(self):
        if self._verifier is None:
            self._verifier = rg_verifier.make_pool(
                timeout=float(self.cfg.verifier_timeout), workers=int(self.cfg.verifier_workers)
            )
        return self._verifier

    def human_data_fingerprint(self) -> dict:
        """The config items that determine the human split and its prompts, and the generator's version
        (key of the cached tiny base model)."""
        from importlib.metadata import version

        return {**config_fingerprint(self.cfg, _FINGERPRINT_KEYS), "reasoning_gym": version("reasoning-gym")}

    def close(self) -> None:
        """Shut the verifier's worker processes down (a later verify starts new ones)."""
        if self._verifier is not None:
            self._verifier.close()
            self._verifier = None
