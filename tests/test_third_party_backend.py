"""A backend from a third-party distribution (``apo.backends`` entry point) is chosen by a recipe,
validated by its own options model (or a kind-only one), and trains, like the built-ins."""

from __future__ import annotations

import sys

import pytest

from apo_cli.errors import RecipeError
from apo_cli.recipe import recipe_from_dict, recipe_to_yaml
from backends import BACKENDS
from tests.helpers import install_plugin, tiny_recipe, uninstall_plugin, write_recipe

MODULE = "mypkg_mod"
BACKEND_SOURCE = """
    from typing import Literal

    from backends.cpu import CPUBackend
    from backends.options import BackendOptions

    SPECS = []


    class MyOptions(BackendOptions):
        threads: int = 1
        flavour: Literal["a", "b"] = "a"


    class MyBackend(CPUBackend):
        name = "mybackend"

        def __init__(self, spec):
            super().__init__(spec)
            SPECS.append(spec)
"""
WITH_OPTIONS = BACKEND_SOURCE + """

    MyBackend.options = MyOptions
"""


@pytest.fixture(params=["without options", "with options"])
def plugin(request, tmp_path, monkeypatch):
    source = WITH_OPTIONS if request.param == "with options" else BACKEND_SOURCE
    install_plugin(monkeypatch, tmp_path / "site", {MODULE: source},
                   {"apo.backends": {"mybackend": f"{MODULE}:MyBackend"}})
    yield request.param == "with options"
    uninstall_plugin([MODULE])


def _only_problem(e: pytest.ExceptionInfo) -> str:
    problems = e.value.problems
    assert len(problems) == 1 and "\n" not in problems[0], problems
    return problems[0]


def test_the_recipe_chooses_it_and_it_trains(plugin, tmp_path):
    d = tiny_recipe(tmp_path, run={"max_steps": 2}, checkpoint={"every": 2, "keep_last": 1},
                    backend={"kind": "mybackend", **({"flavour": "b"} if plugin else {})})
    recipe = recipe_from_dict(d)
    assert recipe.backend.kind == "mybackend"
    assert "kind: mybackend" in recipe_to_yaml(recipe)
    if plugin:
        assert (recipe.backend.threads, recipe.backend.flavour) == (1, "b")
        assert isinstance(recipe.backend, sys.modules[MODULE].MyOptions)
    else:
        assert type(recipe.backend).model_fields.keys() == {"kind"}

    from apo_cli.train import train_from_recipe

    train_from_recipe(recipe)
    assert sys.modules[MODULE].SPECS == [recipe.backend]  # the trainer built the plugin's backend
    lines = (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()
    assert len([x for x in lines if x.strip()]) == 2


def test_its_fields_are_checked_like_a_builtin_backends(plugin, tmp_path):
    if plugin:
        d = tiny_recipe(tmp_path, backend={"kind": "mybackend", "flavour": "c"})
        with pytest.raises(RecipeError) as e:
            recipe_from_dict(d)
        problem = _only_problem(e)
        assert "backend.flavour:" in problem and "'a' or 'b'" in problem
        d = tiny_recipe(tmp_path, backend={"kind": "mybackend", "flavor": "a"})
        with pytest.raises(RecipeError) as e:
            recipe_from_dict(d)
        assert "backend.flavor: unknown key 'flavor'; did you mean 'flavour'?" in _only_problem(e)
    else:
        d = tiny_recipe(tmp_path, backend={"kind": "mybackend", "threads": 2})
        with pytest.raises(RecipeError) as e:
            recipe_from_dict(d)
        assert "backend.threads: unknown key 'threads'; valid keys: kind" in _only_problem(e)


def test_validate_reports_it_in_one_line_with_exit_code_2(plugin, tmp_path, cli):
    bad = {"flavour": "c"} if plugin else {"threads": 2}
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, backend={"kind": "mybackend", **bad}))
    result = cli("validate", str(path))
    assert result.exit_code == 2, result.output
    problems = [x for x in result.output.splitlines() if x.startswith("  - ")]
    assert len(problems) == 1 and f"backend.{next(iter(bad))}:" in problems[0], result.output
    assert "Traceback" not in result.output

    good = write_recipe(tmp_path, tiny_recipe(tmp_path, backend={"kind": "mybackend"}), name="good.yaml")
    assert cli("validate", str(good)).exit_code == 0


def test_unknown_kinds_list_the_plugins_too(plugin, tmp_path):
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(tiny_recipe(tmp_path, backend={"kind": "mybakend"}))
    assert "unknown backend kind 'mybakend'; valid kinds: cpu, gpu, mybackend" in _only_problem(e)


def test_a_cpu_recipe_imports_neither_the_gpu_backend_nor_the_plugin(tmp_path):
    import subprocess
    import textwrap

    code = """
        import sys
        from apo_cli.recipe import recipe_from_dict
        r = recipe_from_dict({"model": {"name_or_path": "tiny-random"}, "backend": {"kind": "cpu", "threads": 1}})
        assert r.backend.threads == 1
        heavy = [m for m in ("backends.gpu", "backends.cpu", "vllm") if m in sys.modules]
        assert not heavy, heavy
        print("ok")
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert "mybackend" not in BACKENDS  # no plugin outside the fixture


def test_a_backend_missing_protocol_members_is_one_line_naming_them(tmp_path, monkeypatch, cli):
    """A class that does not implement the Backend protocol fails when created, before any model loads."""
    install_plugin(monkeypatch, tmp_path / "site", {"halfpkg_mod": """
        class HalfBackend:
            name = "half"

            def __init__(self, spec):
                self.spec = spec

            def setup(self, model, tokenizer):
                return model

            def generate(self, prompts, params, *, streamer=None):
                return []
    """}, {"apo.backends": {"half": "halfpkg_mod:HalfBackend"}}, dist="halfpkg")
    try:
        path = write_recipe(tmp_path, tiny_recipe(tmp_path, backend={"kind": "half"}))
        result = cli("train", str(path))
        assert result.exit_code != 0 and "Traceback" not in result.output
        errors = [x for x in result.output.splitlines() if x.startswith("error:")]
        assert len(errors) == 1, result.output
        for member in ("supports_torchrun", "join", "autocast", "sync_weights", "close"):
            assert member in errors[0]
        assert "backends.base.BackendBase" in errors[0]
    finally:
        uninstall_plugin(["halfpkg_mod"])
