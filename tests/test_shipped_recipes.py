"""Every shipped recipe validates and documents itself (STYLE point 11).

Each ``recipes/**/*.yaml`` must start with a comment holding the exact command that runs it
(``# apo train recipes/<path>``) and have a ``#`` comment line directly above each top-level key.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"
# Raise this as recipes are added, so that a recipe deleted or moved by mistake fails the suite.
MIN_RECIPES = 4  # quickstart + the paper recipe and its grpo/gspo twins

RECIPES = sorted(RECIPES_DIR.glob("**/*.yaml"))
IDS = [p.relative_to(RECIPES_DIR).as_posix() for p in RECIPES]


def test_enough_recipes_are_shipped():
    assert len(RECIPES) >= MIN_RECIPES, f"found {len(RECIPES)} recipes under {RECIPES_DIR}, expected >= {MIN_RECIPES}"


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_validates(path: Path, cli):
    result = cli("validate", "--quiet", str(path))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_starts_with_its_command(path: Path):
    command = f"apo train recipes/{path.relative_to(RECIPES_DIR).as_posix()}"
    first = path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
    assert first.startswith("#") and command in first, f"{path.name}: line 1 should be a comment with `{command}`"


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_every_top_level_field_has_a_comment(path: Path):
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    assert isinstance(root, yaml.MappingNode), f"{path.name}: not a mapping"
    missing = []
    for key, _ in root.value:
        row = key.start_mark.line  # 0-based: lines[row - 1] is the line above the key
        if row == 0 or not lines[row - 1].lstrip().startswith("#"):
            missing.append(f"line {row + 1}: {key.value}")
    assert not missing, f"{path.name}: top-level keys without a '#' comment line directly above: {missing}"


def test_recipes_command_lists_and_copies(tmp_path, cli):
    res = cli("recipes")
    assert res.exit_code == 0
    assert "quickstart" in res.output and "SmolLM2" in res.output
    res = cli("recipes", "quickstart", str(tmp_path))
    assert res.exit_code == 0 and (tmp_path / "quickstart.yaml").is_file()
    again = cli("recipes", "quickstart", str(tmp_path))
    assert again.exit_code == 2 and "already exists" in again.output
    missing = cli("recipes", "nope")
    assert missing.exit_code == 2 and "no shipped recipe named 'nope'" in missing.output
