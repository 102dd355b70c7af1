"""The ``rewards`` section of a recipe: a list of :class:`RewardSpec`, each a named or custom reward.

Names are checked against :data:`apo_cli.rewards.REWARDS` (the built-ins and the ``apo.rewards``
entry points); ``module:function`` and ``file.py:function`` rewards are imported when training starts.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from apo_cli.spec import Section

__all__ = ["RewardSpec", "check_rewards", "reward_names"]


class RewardSpec(Section):
    name: str = Field(
        ..., description="Built-in reward name, or 'module:function', or 'path/to/file.py:function'."
    )
    weight: float = Field(1.0, description="Weight in the summed reward.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments bound to the reward.")
    timeout_s: float = Field(5.0, gt=0, le=86400, description="Time box for one call of this reward (at most a day).")


def reward_names() -> set[str]:
    """Every registered reward name (built-in and entry points)."""
    from apo_cli.rewards.builtin import REWARDS

    return set(REWARDS.names())


def check_rewards(rewards: list[RewardSpec]) -> list[RewardSpec]:
    """The rule of the ``rewards`` list: at least one, and every plain name registered."""
    if not rewards:
        raise ValueError("at least one reward is needed")
    known = reward_names()
    for i, r in enumerate(rewards):
        if ":" not in r.name and r.name not in known:
            raise ValueError(
                f"rewards[{i}]: unknown reward {r.name!r}; built-ins: {', '.join(sorted(known))}, "
                "or give 'module:function' / 'file.py:function'"
            )
        _check_builtin_kwargs(i, r)
    return rewards


def _check_builtin_kwargs(i: int, r: RewardSpec) -> None:
    """A built-in that states its kwargs' rule (``fn.check_kwargs``: the rule broken, or None) is checked here."""
    from apo_cli.rewards.builtin import REWARDS

    if r.name in REWARDS.builtins():
        problem = getattr(REWARDS.get(r.name), "check_kwargs", lambda **_: None)(**r.kwargs)
        if problem is not None:
            raise ValueError(f"rewards[{i}] ({r.name}): {problem}")
