"""Hand-checked values for every built-in reward (the arithmetic is in the comments), and the time box."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from apo_cli.errors import RewardError
from apo_cli.rewards import REWARDS
from apo_cli.rewards.builtin import (
    exact_match,
    format_reward,
    length,
    math_verify,
    reasoning_gym,
    reference,
    repetition,
)
from apo_cli.rewards.extract import ngram_repetition
from apo_cli.rewards.verify import VerifierPool

PATHOLOGICAL = (r"9^{9^{9^{9}}}", r"9^{9^{9^{8}}}")  # sympy tries to evaluate both towers: never returns


def test_registry_names():
    assert set(REWARDS) == {"math_verify", "exact_match", "format", "repetition", "length", "reference", "reasoning_gym",
                            "overlong"}


def test_importing_rewards_is_cheap():
    code = (
        "import sys, apo_cli.rewards; "
        "heavy = [m for m in ('torch', 'transformers', 'math_verify', 'sympy', 'reasoning_gym', 'datasets') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_math_verify_values():
    out = math_verify([r"\boxed{4}", r"\boxed{5}", "no idea"], ["4", "4", "4"])
    assert list(out) == [1.0, 0.0, 0.0]
    assert out.correct == [True, False, False]
    assert out.counts["no_answer"] == 1


def test_math_verify_without_answers_is_none():
    out = math_verify([r"\boxed{4}"], None)
    assert list(out) == [None] and out.counts["gold_missing"] == 1


def test_exact_match_arithmetic_integers():
    out = exact_match([r"\boxed{42}", "The answer is 42.0", r"\boxed{41}", r"\boxed{42.5}"], ["42"] * 4)
    assert list(out) == [1.0, 1.0, 0.0, 0.0]  # 42.0 == 42 by value; 42.5 is not the integer 42


def test_format_reward():
    texts = ["<think>a</think><answer>1</answer>", "<answer>1</answer><think>a</think>", "<answer>1", "plain"]
    tags = ["<think>", "</think>", "<answer>", "</answer>"]
    assert list(format_reward(texts, tags=tags)) == [1.0, 0.0, 0.0, 0.0]  # second: tags out of order
    assert list(format_reward(texts, tags=tags, in_order=False)) == [1.0, 1.0, 0.0, 0.0]
    assert list(format_reward(texts)) == [1.0, 1.0, 0.0, 0.0]  # default tags: <answer>, </answer>


def test_repetition_reward():
    # "a b c d a b c d": 4-grams abcd, bcda, cdab, dabc, abcd -> 5 total, 4 unique -> r = 1 - 4/5 = 0.2
    assert ngram_repetition("a b c d a b c d".split(), 4) == pytest.approx(0.2)
    out = repetition(["a b c d a b c d", "one two three", "x " * 10], n=4, scale=2.0)
    # second: fewer than 4 words -> 0; third: 7 identical 4-grams -> 1 - 1/7
    assert list(out) == pytest.approx([-0.4, 0.0, -2.0 * (1 - 1 / 7)])
    by_ids = repetition(["ignored"], [[1, 2, 1, 2, 1, 2]], n=2, unit="tokens")
    # bigrams 12,21,12,21,12 -> 2 unique of 5 -> r = 0.6
    assert list(by_ids) == pytest.approx([-0.6])


def test_length_reward():
    ids = [[0] * n for n in (100, 50, 200, 400)]
    out = length(["", "", "", ""], ids, target=100, scale=0.1)
    # 1 - |L-100|/100: 1, 0.5, 0, -2 -> clipped -1; times 0.1
    assert list(out) == pytest.approx([0.1, 0.05, 0.0, -0.1])
    assert list(length(["a b c"], None, target=3, unit="words")) == pytest.approx([0.1])
    with pytest.raises(RewardError, match="target must be positive"):
        length(["x"], None, target=0)


def test_reference_reward_formula():
    loop = " ".join(["the same four words"] * 20)  # 80 words, 77 4-grams, 4 unique -> rep = 1 - 4/77 > 0.3
    varied = " ".join(f"w{i}" for i in range(40))  # no repeated 4-gram -> rep = 0
    mild = "a b c d a b c d e f g h i j"  # 11 4-grams, abcd twice -> 10 unique -> rep = 1/11
    completions = [r"\boxed{7}", loop + r" \boxed{3}", varied + r" \boxed{3}", mild + r" \boxed{3}", varied]
    ids = [[0] * n for n in (50, 600, 2000, 300, 10)]
    out = reference(completions, ["7"] * 5, ids)
    assert out[0] == 1.0  # right: 1.0 whatever the length
    assert out[1] == pytest.approx(min(0.1, 1e-4 * 600) - 0.5)  # 0.06 - cliff 0.5
    assert out[2] == pytest.approx(0.1)  # bonus capped at 0.1 (2000 tokens × 1e-4 = 0.2), rep 0
    # 300 tokens -> bonus 0.03; rep computed on "a b c d a b c d e f g h i j \boxed{3}" (15 words, 12 4-grams, 11 unique)
    assert out[3] == pytest.approx(0.03 - 0.1 * (1 - 11 / 12))
    assert out[4] == pytest.approx(0.001)  # no answer: wrong, 10 tokens × 1e-4
    assert out.correct == [True, False, False, False, False]


def test_reasoning_gym_bridge():
    import reasoning_gym as rg

    entry = rg.create_dataset("basic_arithmetic", size=1, seed=3)[0]
    meta = [entry["metadata"]] * 3
    out = reasoning_gym([rf"\boxed{{{entry['answer']}}}", r"\boxed{123456789}", "nothing"], [entry["answer"]] * 3,
                        ["q"] * 3, meta)
    assert out[0] == 1.0 and out[1] < 1.0 and out[2] < 1.0
    assert out.correct == [True, False, False]
    with pytest.raises(RewardError, match="metadata"):
        reasoning_gym(["x"], ["1"], ["q"], None)


def test_time_box_holds_from_a_worker_thread():
    pool = VerifierPool(max_workers=1)
    try:
        assert pool.verify([("1", "1")], 30.0)[0].status == "equal"  # warm: start-up is not billed
        result: dict = {}

        def run() -> None:
            t0 = time.monotonic()
            result["verdicts"] = pool.verify([PATHOLOGICAL], 1.0)
            result["elapsed"] = time.monotonic() - t0

        worker = threading.Thread(target=run)
        worker.start()
        worker.join(30)
        assert not worker.is_alive()
        assert result["verdicts"][0].status == "timeout"
        assert 1.0 <= result["elapsed"] < 1.0 + 1.5  # the limit, plus killing the stuck worker
        # the pool replaced the killed worker and keeps working
        assert pool.verify([("2", "2")], 30.0)[0].status == "equal"
    finally:
        pool.close()


def test_a_verifier_that_dies_mid_sample_is_named_and_replaced():
    pool = VerifierPool(max_workers=1)
    try:
        assert pool.verify([("1", "1")], 30.0)[0].status == "equal"
        pid = pool._workers[0].proc.pid
        killer = threading.Timer(1.0, lambda: os.kill(pid, signal.SIGKILL))  # while it is stuck in sympy
        killer.start()
        died, after = pool.verify([PATHOLOGICAL, ("1/2", "0.5")], 30.0)
        killer.join()
        assert (died.status, died.detail) == ("error", "math-verify worker died (was killed by SIGKILL)")
        assert after.status == "equal"  # a fresh worker took the rest
    finally:
        pool.close()


def test_time_box_in_math_verify_reward_counts_timeouts():
    t0 = time.monotonic()
    out = math_verify([rf"\boxed{{{PATHOLOGICAL[1]}}}"], [PATHOLOGICAL[0]], timeout_s=1.0)
    assert list(out) == [None]
    assert out.counts["timeouts"] == 1
    assert time.monotonic() - t0 < 20.0


@pytest.mark.parametrize(
    "completion,answer,expected",
    [
        ("5 + 6 = 11", "11", 1.0),  # no marker: the last number is the answer
        ("11", "11", 1.0),
        ("It is 1,234.", "1234", 1.0),
        ("7 then 8", "7", 0.0),  # the last number counts, not the first
        ("\\boxed{5} and then \\boxed{", "5", 0.0),  # an unclosed last box is no answer, no fallback
        ("The answer is 3. Check: 3 + 1 = 4", "3", 1.0),  # an explicit phrase wins over the last number
    ],
)
def test_exact_match_last_number_fallback(completion, answer, expected):
    from apo_cli.rewards.builtin import exact_match

    assert list(exact_match([completion], [answer])) == [expected]


def test_exact_match_fallback_can_be_turned_off():
    from apo_cli.rewards.builtin import exact_match

    assert list(exact_match(["5 + 6 = 11"], ["11"], last_number=False)) == [0.0]
