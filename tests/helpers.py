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
