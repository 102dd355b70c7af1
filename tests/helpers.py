"""Small builders shared by the training tests: tiny recipes that run in a second or two."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

FIXTURES = Path(__file__).parent / "fixtures"


def tiny_recipe(tmp_path: Path, name: str = "t", **sections: Any) -> dict[str, Any]:
    """A recipe mapping for the tiny random model on the arithmetic task with the 'a' reward."""
    d: dict[str, Any] = {
        "run": {"name": name, "output_dir": str(tmp_path / name), "max_steps": 4, "seed": 0},
        "model": {"name_or_path": "tiny-random"},
        "data": {"source": "builtin:arithmetic", "task_kwargs": {"level": 1, "size": 200}},
        "rewards": [{"name": f"{FIXTURES / 'toy_rewards.py'}:frac_a"}],
        "rollout": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 8},
        "optim": {"lr": 3e-3, "micro_batch_size": 16},
        "checkpoint": {"every": 1, "keep_last": 10},
        "logging": {"dashboard": "plain", "samples_per_step": 1},
    }
    for key, value in sections.items():
        d[key] = {**d.get(key, {}), **value} if isinstance(value, dict) else value
    return d


def write_recipe(tmp_path: Path, d: dict[str, Any], name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# Plugins: a third-party distribution with entry points, installed for one test


REGISTRIES = ("apo_cli.algo.objectives:OBJECTIVES", "apo_cli.algo.schedules:ALPHA_SCHEDULES",
              "apo_cli.rewards.builtin:REWARDS", "backends:BACKENDS")


def reset_registries() -> None:
    """Make every registry read its entry-point group again on the next lookup."""
    from apo_cli.registry import load_target

    for target in REGISTRIES:
        load_target(target).reset()


def install_plugin(monkeypatch: Any, root: Path, modules: dict[str, str],
                   entry_points: dict[str, dict[str, str]], dist: str = "mypkg") -> None:
    """Make ``root`` hold the modules ``{name: source}`` and a ``<dist>-0.1.dist-info`` whose
    ``entry_points.txt`` holds ``{group: {name: "module:attr"}}``, put it on sys.path for this test,
    and reset the registries so that they see it. The caller resets them and drops the modules after."""
    import textwrap

    root.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{n} = {v}\n" for n, v in names.items()) + "\n"
        for group, names in entry_points.items()))
    monkeypatch.syspath_prepend(str(root))
    reset_registries()


def uninstall_plugin(modules: list[str]) -> None:
    """Undo :func:`install_plugin` (sys.path is restored by monkeypatch): registries and modules."""
    import sys

    reset_registries()
    for name in modules:
        sys.modules.pop(name, None)
