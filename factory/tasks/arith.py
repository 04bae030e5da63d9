"""Seeded multi-step arithmetic word problems with human-style worked solutions.

Each problem starts from a value and applies a few ``+``, ``-`` or ``*`` operations to a running
total. The question is a tiny word problem ("Ann has 3 pens. She gets 4 more. ..."), the solution
is a chain of equations ending in ``Answer: <int>``.

Splits are disjoint by *computation* (the arithmetic alone, without names or items): a stable hash
of the computation decides which split it belongs to, so a model can never see a test problem's
arithmetic during training, whatever each split's step knobs are.
"""

from __future__ import annotations

import hashlib
import random
import re

GENERATOR_VERSION = 2  # bump when the same knobs would give different problems (it keys cached base models)
SPLITS = ("human", "train", "validation", "test")
PROMPT_STYLES = ("plain", "chat")
# The chat prompt's instruction (after the question, in one user message); the verifier reads the
# sentence it asks for. The best of three wordings tried on SmolLM2-135M-Instruct (docs/arith_chat.md).
CHAT_INSTRUCTION = 'Think step by step. Finish with "The answer is N."'

# Hash buckets (out of 100) owned by each split; together they cover [0, 100) exactly once. Validation and
# test own equal shares so that short computations repeat equally often in both: validation is then a
# faithful proxy of test for tuning (with 10% vs 25%, validation gains ran ~2x larger than test gains).
_SPLIT_BUCKETS = {
    "human": range(0, 20),
    "train": range(20, 60),
    "validation": range(60, 80),
    "test": range(80, 100),
}

# (name, subject pronoun, possessive pronoun). Short names keep questions short: a character-level
# model pays generation time for every character it reads and writes.
_NAMES = (
    ("Ann", "She", "Her"),
    ("Bob", "He", "His"),
    ("Cat", "She", "Her"),
    ("Dan", "He", "His"),
    ("Eve", "She", "Her"),
    ("Max", "He", "His"),
    ("Liz", "She", "Her"),
    ("Tom", "He", "His"),
    ("Amy", "She", "Her"),
    ("Sam", "He", "His"),
)

_ITEMS = ("pens", "cards", "eggs", "books", "coins", "apples", "shells", "stamps", "cups", "rocks")

# Two phrasings per operation; {p} is the subject pronoun, {q} the possessive, {b} the operand.
_PHRASES = {
    "+": ("{p} gets {b} more.", "{p} finds {b} more."),
    "-": ("{p} gives away {b}.", "{p} loses {b}."),
    "*": ("{q} pile grows {b} times.", "{p} ends up with {b} times as many."),
}


def split_of_computation(computation: str) -> str:
    """Return the split that owns a computation signature.

    Args:
        computation: Canonical arithmetic signature such as ``"3|+4|-2"``.

    Returns:
        One of ``SPLITS``.
    """
    # hashlib rather than hash(): Python's str hash is salted per process, which would reshuffle
    # the splits on every run.
    digest = hashlib.sha256(computation.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    for split, buckets in _SPLIT_BUCKETS.items():
        if bucket in buckets:
            return split
    raise AssertionError(f"bucket {bucket} not owned by any split")  # unreachable: buckets cover 0..99


def _validate(
    *, split: str, num_problems: int, min_steps: int, max_steps: int, max_operand: int, max_value: int
) -> None:
    """Raise ValueError naming the first bad argument."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if num_problems < 0:
        raise ValueError(f"num_problems must be >= 0, got {num_problems}")
    if min_steps < 1:
        raise ValueError(f"min_steps must be >= 1, got {min_steps}")
    if max_steps < min_steps:
        raise ValueError(f"max_steps must be >= min_steps ({min_steps}), got {max_steps}")
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    if max_value < max_operand:
        raise ValueError(f"max_value must be >= max_operand ({max_operand}), got {max_value}")


def _draw_ops(
    rng: random.Random, *, num_steps: int, max_operand: int, max_value: int
) -> tuple[int, list[tuple[str, int, int]]]:
    """Draw a start value and ``num_steps`` operations that keep every value in 0..max_value.

    Returns:
        ``(start, ops)`` where each op is ``(symbol, operand, value_after)``.
    """
    value = rng.randint(1, max_operand)
    start = value
    ops: list[tuple[str, int, int]] = []
    for _ in range(num_steps):
        # Largest admissible operand per operation; an op is allowed when some operand fits.
        # At least one op is always allowed: "+1" when value < max_value, else "-B" (value >= 1).
        limits = {
            "+": min(max_operand, max_value - value),
            "-": min(max_operand, value),
            # Multiplying zero gives a degenerate "grows 3 times" step, so skip it.
            "*": min(max_operand, max_value // value) if value > 0 else 0,
        }
        lows = {"+": 1, "-": 1, "*": 2}
        allowed = [op for op in ("+", "-", "*") if limits[op] >= lows[op]]
        op = rng.choice(allowed)
        operand = rng.randint(lows[op], limits[op])
        if op == "+":
            value += operand
        elif op == "-":
            value -= operand
        else:
            value *= operand
        ops.append((op, operand, value))
    return start, ops


def _render(rng: random.Random, start: int, ops: list[tuple[str, int, int]]) -> tuple[str, str, str]:
    """Turn drawn arithmetic into ``(question, solution, computation)`` strings."""
    name, pronoun, possessive = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    sentences = [f"{name} has {start} {item}."]
    equations = []
    prev = start
    for op, operand, value in ops:
        template = rng.choice(_PHRASES[op])
        sentences.append(template.format(p=pronoun, q=possessive, b=operand))
        equations.append(f"{prev}{op}{operand}={value}.")
        prev = value
    sentences.append(f"How many {item} does {name} have now?")
    question = " ".join(sentences)
    solution = " ".join(equations) + f" Answer: {prev}"
    computation = "|".join([str(start)] + [f"{op}{operand}" for op, operand, _ in ops])
    return question, solution, computation


def generate_split(
    *,
    split: str,
    num_problems: int,
    seed: int,
    min_steps: int,
    max_steps: int,
    max_operand: int,
    max_value: int,
) -> list[dict]:
    """Generate a deterministic list of arithmetic word problems for one split.

    Candidates are drawn from a ``random.Random`` seeded by ``(seed, split)``; a candidate is kept
    only if its computation hashes into the split's buckets, so no computation ever appears in two
    splits. Exact duplicate question texts are skipped.

    Args:
        split: One of ``SPLITS``.
        num_problems: How many problems to return (>= 0).
        seed: Base seed; the same arguments always give the same problems.
        min_steps: Fewest operations per problem (>= 1).
        max_steps: Most operations per problem (>= min_steps).
        max_operand: Largest start value and operand (>= 1).
        max_value: Largest value any intermediate result may take (>= max_operand).

    Returns:
        Problems as dicts with keys ``problem_id``, ``split``, ``question``, ``answer``,
        ``solution``, ``num_steps`` and ``computation``.

    Raises:
        ValueError: On a bad argument, or when the knobs cannot yield ``num_problems`` distinct
            questions for this split within the attempt budget.
    """
    _validate(
        split=split,
        num_problems=num_problems,
        min_steps=min_steps,
        max_steps=max_steps,
        max_operand=max_operand,
        max_value=max_value,
    )
    # A string seed is hashed deterministically by random.Random (unlike hash() of a tuple).
    rng = random.Random(f"{seed}-{split}")
    max_attempts = 200 * num_problems + 10000
    problems: list[dict] = []
    seen_questions: set[str] = set()
    attempts = 0
    num_steps = None
    while len(problems) < num_problems:
        if attempts >= max_attempts:
            raise ValueError(
                f"could only generate {len(problems)} of {num_problems} distinct {split!r} problems "
                f"in {max_attempts} attempts with min_steps={min_steps}, max_steps={max_steps}, "
                f"max_operand={max_operand}, max_value={max_value}; raise max_operand/max_steps/"
                f"max_value or lower num_problems"
            )
        attempts += 1
        if num_steps is None:
            # The step count is fixed per problem slot and the search stays within it, so every split
            # gets the configured (uniform) mix of difficulties, whatever share of the few short
            # computations its hash buckets happen to own.
            num_steps = rng.randint(min_steps, max_steps)
        start, ops = _draw_ops(rng, num_steps=num_steps, max_operand=max_operand, max_value=max_value)
        question, solution, computation = _render(rng, start, ops)
        if split_of_computation(computation) != split or question in seen_questions:
            continue
        seen_questions.add(question)
        problems.append(
            {
                "problem_id": f"arith-{split}-{len(problems):05d}",
                "split": split,
                "question": question,
                "answer": str(ops[-1][2]),
                "solution": solution,
                "num_steps": num_steps,
                "computation": computation,
            }
        )
        num_steps = None
    return problems


def format_prompt(problem: dict) -> str:
    """Build the prompt the model completes with a worked solution.

    Args:
        problem: A problem dict from ``generate_split`` (only ``question`` is read).

    Returns:
        ``"Q: <question>\\nA: "``.
    """
    return f"Q: {problem['question']}\nA: "


def format_chat_prompt(problem: dict, tokenizer, *, instruction: str = CHAT_INSTRUCTION) -> str:
    """Build the chat prompt: the tokenizer's chat template with one user message, ready to generate.

    Args:
        problem: A problem dict from ``generate_split`` (only ``question`` is read).
        tokenizer: A tokenizer with a chat template (an instruct model's).
        instruction: Appended to the question after a blank line.

    Returns:
        The templated text, ending with the assistant turn's header.

    Raises:
        ValueError: When there is no tokenizer or it has no chat template.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        got = "no tokenizer" if tokenizer is None else f"a {type(tokenizer).__name__} without one"
        raise ValueError(
            f"task.prompt_style=chat needs a tokenizer with a chat template (got {got}); "
            "use task.prompt_style=plain for the tiny local model"
        )
    message = {"role": "user", "content": f"{problem['question']}\n\n{instruction}"}
    return tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)


def chat_solution(solution: str) -> str:
    """Rewrite a plain solution in the chat style's free-text form.

    ``"3+4=7. 7-2=5. Answer: 5"`` becomes ``"3 + 4 = 7. 7 - 2 = 5. The answer is 5."``: the same
    equations, spaced as instruct models write them, and the sentence the chat instruction asks for.

    Args:
        solution: A ``solution`` from ``generate_split``.

    Returns:
        The chat-style solution.

    Raises:
        ValueError: When ``solution`` is not in the generator's form.
    """
    body, sep, answer = solution.rpartition(" Answer: ")
    if not sep:
        raise ValueError(f"not a generated arith solution (no ' Answer: '): {solution[:80]!r}")
    steps = []
    for step in body.split(" "):
        match = _STEP_RE.fullmatch(step)
        if match is None:
            raise ValueError(f"not a generated arith step: {step!r}")
        steps.append("{} {} {} = {}.".format(*match.groups()))
    return " ".join([*steps, f"The answer is {answer}."])


_STEP_RE = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)\.")
