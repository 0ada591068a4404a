"""Fastest times of competing evaluations, measured in interleaved rounds."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping


def fastest_times(
    candidates: Mapping[str, Callable[[], object]], rounds: int
) -> dict[str, float]:
    """Call each candidate once untimed, then once per round, in turn.

    Interleaving lets a burst of foreign load hit all candidates alike; the fastest
    call of each counts.

    Args:
        candidates: Name to a call without arguments (that synchronises its device
            itself where it must).
        rounds: Number of timed rounds.

    Returns:
        Name to the fastest call's time in seconds.
    """
    for call in candidates.values():
        call()
    best = dict.fromkeys(candidates, math.inf)
    for _ in range(rounds):
        for name, call in candidates.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best
