"""Evaluation metrics for ReST-EM runs: pass@k, maj@k and their aggregation.

pass@k uses the unbiased estimator of Chen et al. 2021 ("Evaluating Large
Language Models Trained on Code"), so that pass@k for k < n is estimated from
all n samples rather than from an arbitrary subset of k of them.
"""

from __future__ import annotations

from collections import Counter

# Problem difficulty as a policy's share of correct samples on it (its sampled solve rate): the buckets of
# the sweep report's gains by difficulty (base model, eval problems) and of the loop report's E-step
# yield (iteration 1's policy, training problems).
DIFFICULTY_BUCKETS = ["never (0%)", "rarely (<50%)", "often (50-99%)", "always (100%)"]


def difficulty_bucket(rate: float) -> str:
    """The :data:`DIFFICULTY_BUCKETS` label of a solve rate in [0, 1]."""
    if rate <= 0.0:
        return DIFFICULTY_BUCKETS[0]
    if rate < 0.5:
        return DIFFICULTY_BUCKETS[1]
    return DIFFICULTY_BUCKETS[2] if rate < 1.0 else DIFFICULTY_BUCKETS[3]


def pass_at_k(n: int, c: int, k: int) -> float | None:
    """Unbiased pass@k estimate from ``n`` samples of which ``c`` are correct.

    Computes ``1 - C(n-c, k) / C(n, k)`` in the numerically stable product
    form ``1 - prod(1 - k / i for i in n-c+1 .. n)`` from Chen et al. 2021.

    Args:
        n: Number of samples drawn for the problem.
        c: Number of those samples that are correct.
        k: The k of pass@k.

    Returns:
        The estimate in [0, 1]; exactly 1.0 when ``n - c < k`` (every subset of
        size k contains a correct sample), exactly 0.0 when ``c == 0``, and
        None when ``k > n`` (not estimable from n samples).

    Raises:
        ValueError: If ``n < 0``, ``c < 0``, ``c > n`` or ``k < 1``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if c < 0:
        raise ValueError(f"c must be >= 0, got {c}")
    if c > n:
        raise ValueError(f"c must be <= n, got c={c}, n={n}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        return None
    if c == 0:
        return 0.0
    if n - c < k:
        return 1.0
    # Product form avoids the huge intermediate binomials of math.comb and
    # the cancellation of subtracting two nearly equal large numbers.
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def majority_vote(answers: list) -> object | None:
    """Return the most common non-None answer.

    Args:
        answers: Extracted final answers (any hashable votes); None marks an unparseable sample.

    Returns:
        The most frequent non-None answer, ties broken in favour of the answer
        that appeared first, or None if there are no non-None answers.
    """
    counts: Counter = Counter()
    first_seen: dict = {}
    for idx, answer in enumerate(answers):
        if answer is None:
            continue
        counts[answer] += 1
        first_seen.setdefault(answer, idx)
    if not counts:
        return None
    # Explicit tie-break instead of relying on Counter.most_common ordering.
    return max(counts, key=lambda a: (counts[a], -first_seen[a]))


def problem_metrics(
    *,
    greedy_correct: bool,
    sample_correct: list[bool],
    sample_classes: list[int | None] | None,
    ks: list[int],
) -> dict:
    """Per-problem metrics from a greedy decode and a set of samples.

    Args:
        greedy_correct: Whether the greedy decode was judged correct.
        sample_correct: Verifier verdict per sample.
        sample_classes: The equivalence class of each sample's final answer, as given by the task's
            ``answer_classes``: class 0 is the gold answer's class, other ids are wrong answers
            (equivalent answers share an id, e.g. ``"1/3"`` and ``"\\frac{1}{3}"``), None marks a sample
            without an answer. None as a whole: the task has no final answers (code), so every maj@k
            is None.
        ks: The k values for pass@k and maj@k.

    Returns:
        A dict with keys ``greedy_correct``, ``num_samples``, ``num_correct``,
        ``pass_at_k`` ({k: float or None}) and ``maj_at_k`` ({k: bool or
        None}); maj@k votes over the first k samples and is None if k > n. The majority is correct
        when the most voted class (ties: the class seen first) is the gold's class.

    Raises:
        ValueError: If classes and verdicts differ in length, or a k is < 1.
    """
    if sample_classes is not None and len(sample_classes) != len(sample_correct):
        raise ValueError(
            f"sample_classes ({len(sample_classes)}) and sample_correct "
            f"({len(sample_correct)}) must have the same length"
        )
    n = len(sample_correct)
    c = sum(1 for ok in sample_correct if ok)
    pass_k: dict[int, float | None] = {}
    maj_k: dict[int, bool | None] = {}
    for k in ks:
        k = int(k)
        pass_k[k] = pass_at_k(n, c, k)
        if k > n or sample_classes is None:
            maj_k[k] = None
        else:
            # Every answer votes by its equivalence class: voting by text split equivalent answers, and
            # letting only the correct ones vote as one class overstated maj@k whenever equivalent
            # wrong answers ("1/3", "\\frac13") together out-voted the correct ones. A majority over a
            # prefix mirrors drawing only k samples, so maj@k for small k is not inflated by later samples.
            maj_k[k] = majority_vote(sample_classes[:k]) == 0
    return {
        "greedy_correct": bool(greedy_correct),
        "num_samples": n,
        "num_correct": c,
        "pass_at_k": pass_k,
        "maj_at_k": maj_k,
    }


def _mean_or_none(values: list) -> float | None:
    """Mean of values, or None if any value is None (metric is then missing)."""
    if any(v is None for v in values):
        return None
    return sum(float(v) for v in values) / len(values)


def aggregate(per_problem: list[dict], ks: list[int]) -> dict:
    """Average per-problem metrics over a benchmark split.

    Args:
        per_problem: Dicts as returned by :func:`problem_metrics`.
        ks: The k values to aggregate.

    Returns:
        A dict with ``num_problems``, ``greedy_accuracy``, ``pass_at_k`` and
        ``maj_at_k`` ({k: mean or None}); a k is None if any problem lacks it,
        since a mean over a subset would not be comparable across models.

    Raises:
        ValueError: If ``per_problem`` is empty.
    """
    if not per_problem:
        raise ValueError("no problems to aggregate")
    n_problems = len(per_problem)
    greedy = sum(1 for p in per_problem if p["greedy_correct"]) / n_problems
    pass_k: dict[int, float | None] = {}
    maj_k: dict[int, float | None] = {}
    for k in ks:
        k = int(k)
        pass_k[k] = _mean_or_none([p["pass_at_k"].get(k) for p in per_problem])
        maj_k[k] = _mean_or_none([p["maj_at_k"].get(k) for p in per_problem])
    return {
        "num_problems": n_problems,
        "greedy_accuracy": greedy,
        "pass_at_k": pass_k,
        "maj_at_k": maj_k,
    }
