"""The checked-in generated docs match the code (STYLE point 15)."""

from __future__ import annotations

import json

import pytest

from apo_cli import docgen

REGENERATE = "run `python -m apo_cli.docgen` and commit the result"


@pytest.fixture(scope="module")
def rendered():
    return docgen.rendered()


@pytest.mark.parametrize("name", ["cli.md", "recipe.schema.json", "recipe.md"])
def test_generated_doc_is_current(rendered, name):
    path = docgen.DOCS_DIR / name
    assert path.is_file(), f"{path} is missing: {REGENERATE}"
    assert path.read_text(encoding="utf-8") == rendered[path], f"{path} is stale: {REGENERATE}"


def test_cli_reference_covers_every_command(rendered):
    text = rendered[docgen.DOCS_DIR / "cli.md"]
    assert "\x1b[" not in text, "ANSI escape codes in the CLI reference"
    for name in docgen.command_names():
        assert f"\n## apo {name}\n" in text
        assert f"Usage: apo {name} " in text


def test_help_rendering_is_deterministic():
    assert docgen.render_cli_md() == docgen.render_cli_md()


def test_schema_is_the_recipe_schema(rendered):
    from apo_cli.recipe import json_schema

    assert json.loads(rendered[docgen.DOCS_DIR / "recipe.schema.json"]) == json_schema()


def test_check_lists_stale_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(docgen, "DOCS_DIR", tmp_path / "docs")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "cli.md").write_text("old\n", encoding="utf-8")
    assert docgen.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "docs/cli.md" in err and "docs/recipe.schema.json" in err
    assert docgen.main([]) == 0
    assert docgen.main(["--check"]) == 0


def test_recipe_reference_lists_every_field(rendered):
    from apo_cli.recipe import AlgorithmSpec, RolloutSpec

    text = rendered[docgen.DOCS_DIR / "recipe.md"]
    for model in (AlgorithmSpec, RolloutSpec):
        for name in model.model_fields:
            assert f"| `{name}` |" in text, name
    assert "## `algorithm.alpha`" in text and "## `backend (kind: gpu)`" in text
