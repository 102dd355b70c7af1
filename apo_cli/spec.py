"""The base of every recipe section, shared by the packages that own one.

Each section of a recipe is defined beside the code that reads it, and all of them build on
:class:`Section` from here (this module imports pydantic only):

=============  ================================================================================
``run``        :mod:`apo_cli.train.spec` (``RunSpec``; also ``rollout``, ``optim``, ``checkpoint``,
               ``logging``: the training loop reads them)
``model``      :mod:`apo_cli.model_spec` (``ModelSpec``, ``LoraSpec``)
``data``       :mod:`apo_cli.data.spec` (``DataSpec``)
``rewards``    :mod:`apo_cli.rewards.spec` (``RewardSpec``)
``algorithm``  :mod:`apo_cli.algo.spec` (``AlgorithmSpec``, ``AlphaScheduleSpec``, ``AdaptiveTauSpec``)
``backend``    the options model of the chosen backend (:mod:`backends.options`)
=============  ================================================================================

:mod:`apo_cli.recipe` composes them into the ``Recipe`` and does the loading, overrides and error
messages.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["Section", "on_off"]


def on_off(v: Any) -> Any:
    """YAML 1.1 reads on/off/yes/no as booleans: map them back for fields whose values are 'on'/'off'."""
    return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)
