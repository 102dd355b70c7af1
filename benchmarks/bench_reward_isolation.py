"""What running a reward in its own worker process costs per training step.

Custom rewards (``module:function``, ``file.py:function``, entry points) run in a persistent worker
process, one message per step (apo_cli/rewards/isolated.py). This times the quickstart's reward set
(``exact_match``) on a step of the quickstart's shape (4 prompts × G = 8 completions of ~16 tokens)
called in-process, as a built-in, against the very same function called through the isolation
(named ``apo_cli.rewards.builtin:exact_match``, which makes it a custom reward). The two alternate
(A B A B) so that load hits both alike; also timed: one worker's start-up (paid once per run, and
again after a time-out or crash) and a larger step (``--big``: 48 prompts × 6 completions of ~1280
tokens, the reference shape of bench_objectives.py).

Usage::

    python benchmarks/bench_reward_isolation.py [--steps 50] [--big]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("APO_TRUST_CODE", "1")  # the isolated name is a custom reward: opt in

from apo_cli.data import Example  # noqa: E402
from apo_cli.recipe import RewardSpec  # noqa: E402
from apo_cli.rewards import RewardSet  # noqa: E402


def step_batch(prompts: int, group: int, words: int):
    """(prompts, completions, ids, examples) of one step: ``group`` completions per problem."""
    texts, completions, ids, examples = [], [], [], []
    for i in range(prompts):
        ex = Example(index=i, prompt=f"What is {i} + {i}?", answer=str(2 * i), columns={"answer": str(2 * i)})
        for j in range(group):
            body = " ".join(["step"] * max(0, words - 2))
            completions.append(f"{body} {2 * i + (j % 2)}".strip())
            ids.append(list(range(words)))
            texts.append(ex.prompt)
            examples.append(ex)
    return texts, completions, ids, examples


def time_calls(rs: RewardSet, batch, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        rs(*batch)
        out.append(time.perf_counter() - t0)
    return out


def compare(label: str, batch, steps: int) -> None:
    here = RewardSet([RewardSpec(name="exact_match")])
    t0 = time.perf_counter()
    iso = RewardSet([RewardSpec(name="apo_cli.rewards.builtin:exact_match")])
    startup = time.perf_counter() - t0
    assert here(*batch).total == iso(*batch).total  # the same values either way
    a: list[float] = []
    b: list[float] = []
    for _ in range(max(1, steps // 10)):  # A B A B in rounds of 10 steps
        a += time_calls(here, batch, 10)
        b += time_calls(iso, batch, 10)
    iso.close()
    med_a, med_b = statistics.median(a), statistics.median(b)
    print(f"{label}: {len(batch[1])} completions per step, {len(a)} steps each")
    print(f"  in-process   median {med_a * 1e3:8.2f} ms/step  mean {statistics.mean(a) * 1e3:8.2f} ms")
    print(f"  isolated     median {med_b * 1e3:8.2f} ms/step  mean {statistics.mean(b) * 1e3:8.2f} ms")
    print(f"  isolation costs {(med_b - med_a) * 1e3:.2f} ms per step (median); worker start-up {startup * 1e3:.0f} ms once")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--big", action="store_true", help="also the 48 × 6 × ~1280-token step")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    compare("quickstart (exact_match, 4 prompts x 8, ~16 tokens)", step_batch(4, 8, 16), args.steps)
    if args.big:
        compare("reference shape (exact_match, 48 prompts x 6, ~1280 tokens)", step_batch(48, 6, 1280),
                max(10, args.steps // 5))


if __name__ == "__main__":
    main()
