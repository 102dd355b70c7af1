"""One registry type for every name a recipe uses: built-ins listed, entry points picked up, unknown
names refused (the recipe's objective check never switches itself off)."""

from __future__ import annotations

import sys

import pytest

from apo_cli.algo.objectives import OBJECTIVES, get_objective
from apo_cli.algo.schedules import ALPHA_SCHEDULES, make_alpha_schedule
from apo_cli.algo.spec import AlphaScheduleSpec
from apo_cli.errors import RecipeError
from apo_cli.recipe import recipe_from_dict
from apo_cli.registry import Registry, UnknownName
from apo_cli.rewards import REWARDS
from apo_cli.rewards.loading import load_reward
from backends import BACKENDS
from tests.helpers import install_plugin, uninstall_plugin

PLUGIN = "apo_plugin_mod"
PLUGIN_SOURCE = """
    from apo_cli.algo.objectives import get_objective, make_objective

    CALLS = []


    class Halfway:
        kind = "halfway"

        def __init__(self, spec, max_steps):
            self.alpha = (spec.alpha_max + spec.alpha_min) / 2

        def step(self, signals):
            CALLS.append(signals.step)
            return self.alpha

        def metrics(self):
            return {"alpha/target": self.alpha}

        def state_dict(self):
            return {"kind": self.kind, "alpha": self.alpha}

        def load_state_dict(self, d):
            self.alpha = d["alpha"]


    def make_halfway(spec, max_steps):
        return Halfway(spec, max_steps)


    MY_OBJECTIVE = make_objective("myobj", get_objective("grpo").fn, params={"eps_low", "eps_high", "loss_aggregation"},
                                  defaults=get_objective("grpo").defaults)


    def always_one(completions, **kwargs):
        return [1.0] * len(completions)
"""
ENTRY_POINTS = {
    "apo.alpha_schedules": {"halfway": f"{PLUGIN}:make_halfway", "broken": "no_such_module_xyz:make"},
    "apo.objectives": {"myobj": f"{PLUGIN}:MY_OBJECTIVE", "apo": f"{PLUGIN}:MY_OBJECTIVE"},
    "apo.rewards": {"always_one": f"{PLUGIN}:always_one"},
}


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    install_plugin(monkeypatch, tmp_path / "site", {PLUGIN: PLUGIN_SOURCE}, ENTRY_POINTS)
    yield sys.modules
    uninstall_plugin([PLUGIN])


def _recipe(**algorithm) -> dict:
    return {"model": {"name_or_path": "tiny-random"}, "algorithm": algorithm}


# -- the registry type ----------------------------------------------------------------------------


def test_registry_lookup_unknown_names_and_lazy_targets():
    reg: Registry = Registry("widget")
    reg.add("round", "math:floor")  # imported on first lookup
    reg.add("square", object)
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("round", object)
    assert reg.names() == ["round", "square"] and "round" in reg and len(reg) == 2
    import math

    assert reg.get("round") is math.floor and reg["square"] is object
    with pytest.raises(UnknownName) as e:
        reg.get("rount")
    assert str(e.value) == "unknown widget 'rount' (did you mean 'round'?); valid names: round, square"
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)


def test_registries_list_the_builtins():
    assert set(OBJECTIVES.builtins()) == {"apo", "adpo", "grpo", "gspo", "dr_grpo", "cispo", "sapo"}
    assert ALPHA_SCHEDULES.builtins() == ["constant", "linear", "cosine", "reward_confidence", "guarded"]
    assert set(REWARDS.builtins()) == {"math_verify", "exact_match", "format", "repetition", "length", "reference",
                                       "reasoning_gym", "overlong"}
    assert BACKENDS.builtins() == ["cpu", "gpu"]
    for reg in (OBJECTIVES, ALPHA_SCHEDULES, REWARDS, BACKENDS):
        assert reg.group and reg.group.startswith("apo.")


# -- the objective check never switches itself off --------------------------------------------------


def test_an_unknown_objective_is_refused_with_the_valid_names():
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(_recipe(objective="grpoo"))
    assert "algorithm.objective: unknown objective 'grpoo'; valid names: adpo, apo, cispo, dr_grpo, grpo, gspo, sapo" in str(e.value)
    with pytest.raises(KeyError, match="valid names: adpo, apo"):
        get_objective("grpoo")


def test_an_unknown_objective_is_refused_even_when_the_registry_cannot_be_imported(monkeypatch):
    # the defect: an ImportError made the name check return "no names" and accept anything
    monkeypatch.setitem(sys.modules, "apo_cli.algo.objectives", None)
    with pytest.raises(ImportError):
        recipe_from_dict(_recipe(objective="grpoo"))


# -- entry points -----------------------------------------------------------------------------------


def test_entry_points_are_picked_up_and_builtins_win(plugin):
    assert "halfway" in ALPHA_SCHEDULES.names() and "myobj" in OBJECTIVES and "always_one" in REWARDS
    assert ALPHA_SCHEDULES.ordered()[:5] == ALPHA_SCHEDULES.builtins()  # plugins come after the built-ins
    assert get_objective("myobj").name == "myobj" and get_objective("myobj").fn is get_objective("grpo").fn
    assert get_objective("apo").uses_alpha  # a plugin cannot replace a built-in of the same name
    assert load_reward("always_one")(["x", "y"]) == [1.0, 1.0]


def test_entry_points_are_only_imported_when_chosen(plugin):
    assert "broken" in ALPHA_SCHEDULES.names()  # listed without importing it
    assert PLUGIN not in sys.modules
    with pytest.raises(ImportError):
        ALPHA_SCHEDULES.get("broken")


def test_reset_forgets_the_plugins_and_keeps_the_builtins(plugin):
    assert "halfway" in ALPHA_SCHEDULES
    uninstall_plugin([PLUGIN])
    sys.path[:] = [p for p in sys.path if not p.endswith("site")]
    assert "halfway" not in ALPHA_SCHEDULES and "constant" in ALPHA_SCHEDULES


def test_a_registered_schedule_kind_runs(plugin):
    from apo_cli.algo.schedules import Signals

    spec = AlphaScheduleSpec(kind="halfway", alpha_max=0.8, alpha_min=0.2)
    schedule = make_alpha_schedule(spec, max_steps=10)
    sig = Signals(step=3, reward=0.5, reward_signal=0.5, confidence=0.5, entropy_proxy=0.5, calibration=0.5)
    assert schedule.step(sig) == pytest.approx(0.5)
    assert sys.modules[PLUGIN].CALLS == [3]


def test_a_recipe_may_name_registered_names(plugin):
    r = recipe_from_dict({**_recipe(objective="myobj", eps_low=0.1), "rewards": [{"name": "always_one"}]})
    assert r.algorithm.objective == "myobj" and r.rewards[0].name == "always_one"
    assert recipe_from_dict(_recipe(alpha={"kind": "halfway"})).algorithm.alpha.kind == "halfway"
    with pytest.raises(RecipeError) as e:  # the plugin's objective reads eps_*, not tau
        recipe_from_dict(_recipe(objective="myobj", tau=0.9))
    assert "algorithm.tau is set but objective 'myobj' does not use it" in str(e.value)
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(_recipe(alpha={"kind": "halfwya"}))
    assert "unknown alpha schedule 'halfwya'; valid kinds:" in str(e.value)
    assert "'guarded', 'halfway'" in str(e.value)


def test_unknown_schedule_kind_names_the_valid_ones():
    with pytest.raises(ValueError, match="'reward_confidence' or 'guarded'"):
        AlphaScheduleSpec(kind="exponential")
