"""The figures of a comparison, as pure functions of a run's rewards (see :mod:`apo_cli.compare.report`)."""

from __future__ import annotations

import math
import random
import statistics

__all__ = ["BOOTSTRAP", "bootstrap_diff", "final_reward", "moving_average", "noise", "steps_to"]

BOOTSTRAP = 10_000


def moving_average(xs: list[float], k: int) -> list[float]:
    """The mean of the last ``k`` values at each step (fewer at the start)."""
    return [statistics.fmean(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]


def steps_to(rewards: list[float], threshold: float, window: int) -> int | None:
    """The first step (1-based) at which the ``window``-step moving average reaches ``threshold``."""
    return next((i + 1 for i, v in enumerate(moving_average(rewards, window)) if v >= threshold), None)


def noise(rewards: list[float]) -> float | None:
    """sqrt(mean of squared step-to-step differences / 2) over the second half of the run."""
    half = rewards[len(rewards) // 2:]
    d = [b - a for a, b in zip(half, half[1:])]
    return math.sqrt(statistics.fmean(x * x for x in d) / 2) if d else None


def final_reward(rewards: list[float]) -> float:
    """The mean over the last 10 % of the steps (at least one)."""
    k = max(1, math.ceil(len(rewards) / 10))
    return statistics.fmean(rewards[-k:])


def bootstrap_diff(diffs: list[float], seed: int = 0, n: int = BOOTSTRAP) -> tuple[float, float, float]:
    """(mean, low, high): the mean of the paired differences and its percentile-bootstrap 95 % interval."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, mean, mean
    rng = random.Random(seed)
    k = len(diffs)
    means = sorted(statistics.fmean(rng.choices(diffs, k=k)) for _ in range(n))
    return mean, means[int(0.025 * (n - 1))], means[math.ceil(0.975 * (n - 1))]
