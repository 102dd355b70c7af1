"""Every command's --help: prose wrapped once (to the terminal, never at the docstring's own line
breaks, which broke sentences in the middle) and flags shown without a ``<bool>`` type."""

from __future__ import annotations

import pytest

from apo_cli.docgen import WIDTH, _help_text, command_names


def _description(text: str) -> list[str]:
    """The lines between the usage line and the first panel (the command's docstring)."""
    lines = text.splitlines()
    end = next((i for i, line in enumerate(lines) if line.lstrip().startswith("╭")), len(lines))
    return [line.rstrip() for line in lines[1:end]]


@pytest.mark.parametrize("command", ["", *command_names()])
def test_help_wraps_prose_once_and_shows_no_bool_type(command):
    text = _help_text([command] if command else [])
    assert "<bool>" not in text, text
    lines = _description(text)
    for line, following in zip(lines, lines[1:]):
        prose = line.strip() and not line.startswith("     ")  # not an example (indented) or blank
        if prose and following.strip() and not following.startswith("     "):
            # wrapped where the next word no longer fitted, not where the docstring's line ended
            assert len(line) + 1 + len(following.split()[0]) > WIDTH - 1, f"broken after {line!r}:\n{text}"


def test_examples_stay_indented():
    lines = _description(_help_text(["train"]))
    assert "     apo train recipes/quickstart.yaml" in lines, lines
