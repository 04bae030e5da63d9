"""Per-sample seeds: sample j of a problem is drawn with ``problem_seed(...) + j`` on every backend."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (Python's hash() is salted per process)."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def problem_seed(seed: int, problem_id: str, draw: int = 0) -> int:
    """The seed of sample 0 of a problem; sample j uses ``problem_seed + j`` (on both backends).

    It depends on the sampler seed and the problem id only (and ``draw``, see ``sample.sample_problems``),
    so sample j of a problem is the same for any K, shard, batch or prompt order, and a K'-sample run is
    the first K' samples of a K-sample run of the same policy.
    """
    return derive_seed(seed, problem_id) if draw == 0 else derive_seed(seed, problem_id, draw)
