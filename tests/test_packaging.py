"""pyproject.toml ships every package of the source tree (an explicit list must not fall behind)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("apo_cli", "backends")
        for p in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert cfg["package-dir"]["apo_cli.shipped_recipes"] == "recipes"
    assert "apo.backends" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
