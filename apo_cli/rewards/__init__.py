"""Rewards: answer extraction and verification, shaping terms, custom ``module:function`` rewards.

Public API (the training loop's contract):

- :data:`REWARDS` — the registry of named rewards: the built-ins math_verify, exact_match, format,
  repetition, length, reference (the paper's reward, APO_METHOD §7), reasoning_gym, and those of the
  ``apo.rewards`` entry-point group;
- :class:`RewardSet` — the recipe's rewards resolved once, called on a step's completions;
- :class:`RewardOutput` — weighted totals, correctness, metrics;
- :class:`Scores` — what built-ins return: a list that may also carry ``correct`` and ``counts``
  (custom rewards may return one too, to report correctness).

Importing this package is cheap (standard library only): the recipe parser imports it to check
reward names. math-verify runs in worker processes; reasoning-gym is imported on first use.
"""

from __future__ import annotations

from apo_cli.rewards.builtin import REWARDS, Scores
from apo_cli.rewards.extract import extract_answer, extract_gold
from apo_cli.rewards.rewardset import RewardOutput, RewardSet, merge_outputs

__all__ = ["REWARDS", "RewardOutput", "RewardSet", "Scores", "extract_answer", "extract_gold", "merge_outputs"]
