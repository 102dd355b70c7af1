"""The user's opt-in to code a recipe names: a recipe alone never makes code outside apo run.

A recipe is data that people send each other (a run directory carries its ``recipe.yaml``), so what
it may execute is the user's decision, not the recipe's. Two things in a recipe run code that is not
apo's and not installed by the user:

- a custom reward, ``module:function`` or ``path/to/file.py:function`` (``os:system`` is one);
- ``model.trust_remote_code: true``, which lets the model repository run its own Python code.

Both need the opt-in: ``--trust-code`` on the command that would run them (``train``, ``eval``,
``validate --preflight``), or ``APO_TRUST_CODE=1`` in the environment (for your own reward files:
export it once). Without it they stop with one :class:`TrustError` line that names what the recipe
wants to run and how to allow it. Always allowed: apo's built-in rewards, and rewards of the
``apo.rewards`` entry-point group (code the user installed). Plain ``apo validate`` imports nothing.

The Python API follows the same rule: set the environment variable, or wrap the calls in
``with trusting(True):``. The checks: :func:`check_recipe` (the commands, before a run directory
is touched), :func:`check_rewards` (:class:`~apo_cli.rewards.RewardSet`, before any worker starts),
:func:`apo_cli.rewards.loading.load_reward` and the model loaders of :mod:`apo_cli.models`. This
module imports nothing of apo but its errors, so that any of them may use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from apo_cli.errors import UsageError

ENV = "APO_TRUST_CODE"
HOW = f"pass --trust-code or set {ENV}=1 to allow it"

_granted = False  # set by --trust-code for the duration of one command (see :func:`scope`)


class TrustError(UsageError):
    """A recipe wants to run code the user has not allowed (exit code 2, like other bad input)."""


def code_trusted() -> bool:
    """Whether code named by a recipe may run: ``--trust-code`` given, or ``APO_TRUST_CODE`` set true."""
    return _granted or os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def grant(allow: bool = True) -> None:
    """``--trust-code``: allow code named by recipes until the enclosing :func:`scope` ends."""
    global _granted
    _granted = _granted or bool(allow)


@contextmanager
def scope() -> Iterator[None]:
    """Restore the opt-in on exit, so a command's ``--trust-code`` does not outlive the command."""
    global _granted
    saved = _granted
    try:
        yield
    finally:
        _granted = saved


@contextmanager
def trusting(allow: bool = True) -> Iterator[None]:
    """Allow (``allow=True``) code named by recipes inside the block (the Python API's ``--trust-code``)."""
    with scope():
        grant(allow)
        yield


def require(wants: list[str]) -> None:
    """TrustError naming everything in ``wants`` unless the user opted in."""
    if wants and not code_trusted():
        raise TrustError(f"the recipe wants to run code outside apo: {'; '.join(wants)}; {HOW}")


def is_custom_reward(name: str) -> bool:
    """A ``module:function`` or ``file.py:function`` reward. Registered names (the built-ins, the
    ``apo.rewards`` entry points: code the user installed) never hold a colon."""
    return ":" in name


def _reward_wants(specs: list[Any]) -> list[str]:
    return [f"rewards[{i}] imports {s.name!r}" for i, s in enumerate(specs or []) if is_custom_reward(s.name)]


def recipe_wants(recipe: Any) -> list[str]:
    """What in ``recipe`` would run code outside apo, each as the recipe names it."""
    wants = _reward_wants(getattr(recipe, "rewards", []))
    model = getattr(recipe, "model", None)
    if model is not None and model.trust_remote_code:
        wants.append(f"model.trust_remote_code: true runs the Python code of {model.name_or_path!r}")
    return wants


def check_recipe(recipe: Any) -> None:
    """TrustError unless the user allowed every piece of code ``recipe`` would run. Imports none of it."""
    require(recipe_wants(recipe))


def check_rewards(specs: list[Any]) -> None:
    """TrustError unless the user allowed every custom reward of ``specs``."""
    require(_reward_wants(specs))
