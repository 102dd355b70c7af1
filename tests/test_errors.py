"""The error-mapping layer prints messages verbatim (no rich markup eaten) with the right label and code."""

from __future__ import annotations

import pytest

from apo_cli.errors import ApoError, Interrupted, RecipeError, fail


def test_brackets_in_messages_survive(capsys):
    with pytest.raises(SystemExit) as info:
        fail(ApoError("rewards[0]: reward [bold]x[/bold] failed"))
    assert info.value.code == 1
    assert "error: rewards[0]: reward [bold]x[/bold] failed" in capsys.readouterr().err


def test_interrupts_say_stopped_and_keep_their_code(capsys):
    with pytest.raises(SystemExit) as info:
        fail(Interrupted("SIGTERM: stopped at step 3", 143))
    assert info.value.code == 143
    assert capsys.readouterr().err.startswith("stopped: SIGTERM: stopped at step 3")


def test_recipe_errors_list_every_problem_with_code_2(capsys):
    with pytest.raises(SystemExit) as info:
        fail(RecipeError("r.yaml", ["line 2, column 3: run.seed: bad", "line 4, column 1: model: missing"]))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: r.yaml: 2 problems in recipe" in err and "run.seed: bad" in err and "model: missing" in err
