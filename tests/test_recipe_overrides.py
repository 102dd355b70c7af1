"""Dotted overrides are typed by the schema and merge into the file; paths resolve; recipes are frozen."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from apo_cli.recipe import Recipe, load_recipe, recipe_to_yaml

MINIMAL = "model:\n  name_or_path: tiny-random\n"


def write(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def get(recipe: Recipe, dotted: str):
    obj = recipe
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("rollout.group_size=4", 4),
        ("optim.lr=3e-4", 3e-4),  # YAML 1.1 reads 3e-4 as a string; the schema makes it a float
        ("rollout.temperature=1", 1.0),
        ("data.shuffle=false", False),
        ('rollout.stop=["\\n\\n", "</answer>"]', ["\n\n", "</answer>"]),
        ("rollout.stop=[]", []),
        ("optim.betas=[0.8, 0.99]", (0.8, 0.99)),
        ("data.task_kwargs={size: 10, level: 2}", {"size": 10, "level": 2}),
        ("data.split=train[:100]", "train[:100]"),
        ("model.dtype=bfloat16", "bfloat16"),
        ("algorithm.alpha.kind=constant", "constant"),
        ("model.lora.r=8", 8),  # creates the missing model.lora section
        ("run.max_steps=null", None),
    ],
)
def test_override_is_typed_by_the_schema(tmp_path, override, expected):
    extra = ["run.epochs=2"] if override.startswith("run.max_steps") else []
    r = load_recipe(write(tmp_path, MINIMAL), [override, *extra])
    value = get(r, override.split("=", 1)[0])
    assert value == expected
    assert type(value) is type(expected)


def test_override_creates_section_with_defaults(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), ["model.lora.r=8"])
    assert r.model.lora is not None
    assert (r.model.lora.r, r.model.lora.alpha, r.model.lora.target_modules) == (8, 32.0, "all-linear")


def test_overrides_merge_into_the_file(tmp_path):
    path = write(
        tmp_path,
        MINIMAL
        + "rollout:\n  group_size: 8\n  temperature: 0.7\n  stop: ['</answer>']\n"
        + "algorithm:\n  alpha:\n    kind: linear\n    alpha_min: 0.2\n",
    )
    r = load_recipe(path, ["rollout.group_size=4", "algorithm.alpha.alpha_max=0.8"])
    assert r.rollout.group_size == 4  # overridden
    assert r.rollout.temperature == 0.7 and r.rollout.stop == ["</answer>"]  # kept from the file
    assert (r.algorithm.alpha.kind, r.algorithm.alpha.alpha_min, r.algorithm.alpha.alpha_max) == ("linear", 0.2, 0.8)
    assert r.model.name_or_path == "tiny-random"


def test_later_override_wins(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), ["rollout.group_size=2", "rollout.group_size=4"])
    assert r.rollout.group_size == 4


def test_override_can_replace_a_list(tmp_path):
    path = write(tmp_path, MINIMAL + "rewards:\n  - name: exact_match\n")
    r = load_recipe(path, ["rewards=[{name: mypkg.rewards:score, weight: 2}]"])
    assert [(x.name, x.weight) for x in r.rewards] == [("mypkg.rewards:score", 2.0)]


def test_override_without_a_file_value_leaves_file_untouched(tmp_path):
    path = write(tmp_path, MINIMAL + "rollout:\n  group_size: 8\n")
    before = path.read_text(encoding="utf-8")
    load_recipe(path, ["rollout.group_size=4"])
    assert path.read_text(encoding="utf-8") == before


def test_digits_override_a_string_field(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), ["run.name=2024"])
    assert r.run.name == "2024"


# ------------------------------------------------------------------------------------------------
# Paths


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A recipe in proj/recipes/ next to its data, model and reward file; the cwd is elsewhere."""
    base = tmp_path / "proj" / "recipes"
    (base / "data").mkdir(parents=True)
    (base / "data" / "train.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n', encoding="utf-8")
    (base / "ckpt").mkdir()
    (base / "my_rewards.py").write_text("def score(completion, **kw):\n    return 0.0\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return base


def test_relative_paths_resolve_against_the_recipe_folder(project):
    path = write(
        project,
        "model:\n  name_or_path: ./ckpt\n  tokenizer: ckpt\n"
        "data:\n  source: data/train.jsonl\n"
        "rewards:\n  - name: my_rewards.py:score\n  - name: mypkg.rewards:score\n",
    )
    r = load_recipe(path)
    assert r.model.name_or_path == str(project / "ckpt")
    assert r.model.tokenizer == str(project / "ckpt")
    assert r.data.source == str(project / "data" / "train.jsonl")
    assert r.rewards[0].name == f"{project / 'my_rewards.py'}:score"
    assert r.rewards[1].name == "mypkg.rewards:score"  # a module, not a file: unchanged


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("data.source", "builtin:arithmetic"),
        ("data.source", "openai/gsm8k"),  # hub id: no such folder next to the recipe
        ("model.name_or_path", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("model.name_or_path", "tiny-random"),
    ],
)
def test_non_paths_are_left_alone(project, field, value):
    r = load_recipe(write(project, MINIMAL), [f"{field}={value}"])
    assert get(r, field) == value


def test_absolute_path_is_kept(project, tmp_path):
    data = tmp_path / "abs.jsonl"
    data.write_text("{}\n", encoding="utf-8")
    r = load_recipe(write(project, MINIMAL + f"data:\n  source: {data}\n"))
    assert r.data.source == str(data)


def test_validate_prints_resolved_paths(project, cli):
    path = write(project, "model:\n  name_or_path: ./ckpt\ndata:\n  source: data/train.jsonl\n")
    result = cli("validate", str(path))
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed["data"]["source"] == str(project / "data" / "train.jsonl")
    assert printed["model"]["name_or_path"] == str(project / "ckpt")


# ------------------------------------------------------------------------------------------------
# Round trip and immutability


ROUND_TRIP = {
    "minimal": (MINIMAL, []),
    "grpo": (MINIMAL, ["algorithm.objective=grpo", "algorithm.eps_high=0.28", "rollout.group_size=4"]),
    "lora-gpu": ("model:\n  name_or_path: tiny-random\n  lora: {r: 8}\nbackend:\n  kind: gpu\n", ['rollout.stop=["\\n\\n"]']),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_validate_prints_every_field(tmp_path, cli, name):
    text, overrides = ROUND_TRIP[name]
    path = write(tmp_path, text)
    result = cli("validate", str(path), *overrides)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout) == load_recipe(path, overrides).model_dump(mode="json")
    assert result.stdout == recipe_to_yaml(load_recipe(path, overrides))


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_resolved_recipe_round_trips(tmp_path, cli, name):
    text, overrides = ROUND_TRIP[name]
    path = write(tmp_path, text)
    first = cli("validate", str(path), *overrides)
    assert first.exit_code == 0, first.output
    resolved = write(tmp_path, first.stdout, "resolved.yaml")
    second = cli("validate", str(resolved))
    assert second.exit_code == 0, second.output
    assert second.stdout == first.stdout
    assert load_recipe(resolved) == load_recipe(path, overrides)


@pytest.mark.parametrize(
    "dotted",
    ["rollout.group_size", "run.seed", "algorithm.alpha.alpha_min", "model.name_or_path", "backend.kind", "rollout"],
)
def test_recipe_is_frozen(tmp_path, dotted):
    r = load_recipe(write(tmp_path, MINIMAL))
    *parents, last = dotted.split(".")
    owner = get(r, ".".join(parents)) if parents else r
    with pytest.raises(ValidationError, match="frozen"):
        setattr(owner, last, getattr(owner, last))


def test_switching_objective_by_override_warns_about_the_other_objectives_fields(tmp_path, capsys):
    """Comparing GRPO on an APO recipe is one override away; the APO-only fields are ignored, loudly."""
    from apo_cli.errors import RecipeError
    from apo_cli.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: x}\nalgorithm:\n  objective: apo\n  tau: 0.9\n")
    r = load_recipe(path, ["algorithm.objective=grpo"])
    assert r.algorithm.objective == "grpo"
    err = capsys.readouterr().err
    assert "warning:" in err and "algorithm.tau is ignored" in err and "line 4" in err
    # written in the file itself, the same combination is an error
    path.write_text("model: {name_or_path: x}\nalgorithm:\n  objective: grpo\n  tau: 0.9\n")
    with pytest.raises(RecipeError, match="algorithm.tau is set but objective 'grpo' does not use it"):
        load_recipe(path)
