"""Bad recipes give one clear block of errors, each at its YAML line, and never a traceback.

Every file in ``tests/bad_recipes/`` is a small malformed recipe whose leading comment lines say
what `apo validate FILE [overrides]` must report (see ``tests/bad_recipes/README.md``)::

    # expect: line=6 field=rollout.temprature text="did you mean 'temperature'"
    # overrides: rollout.group_sise=3

Each ``expect`` line must be matched by ONE problem line of the output (``  - line L, column C:
field: message`` or ``  - override 'a.b=1': field: message``). A ``known-bug`` line with
``after-fix`` lines adds a strict-xfail case stating the behaviour we want once the bug is fixed.
"""

from __future__ import annotations

import re
import shlex
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CORPUS = Path(__file__).parent / "bad_recipes"
MIN_CASES = 30
HEADER_KEYS = ("expect", "after-fix", "known-bug", "overrides", "requires")
EXPECT_KEYS = {"line", "field", "text", "override", "absent"}
HEAD_RE = re.compile(r"^error: .+: (\d+) problems? in recipe$")


@dataclass(frozen=True)
class Expect:
    line: int | None = None
    field: str | None = None
    text: str | None = None
    override: str | None = None
    absent: str | None = None

    def matches(self, problem: str) -> bool:
        if self.line is not None and not re.match(rf"  - line {self.line}(, column \d+)?: ", problem):
            return False
        if self.override is not None and f"override {self.override!r}: " not in problem:
            return False
        if self.field is not None and f": {self.field}: " not in problem:
            return False
        return self.text is None or self.text in problem


@dataclass
class Case:
    path: Path
    expects: list[Expect] = field(default_factory=list)
    after_fix: list[Expect] = field(default_factory=list)
    known_bug: str | None = None
    overrides: list[str] = field(default_factory=list)
    requires: list[str] = field(default_factory=list)


def _parse_expect(spec: str, path: Path) -> Expect:
    kw: dict[str, object] = {}
    for item in shlex.split(spec):
        key, sep, value = item.partition("=")
        if not sep or key not in EXPECT_KEYS:
            raise ValueError(f"{path.name}: bad expectation item {item!r} (keys: {sorted(EXPECT_KEYS)})")
        kw[key] = int(value) if key == "line" else value
    if not kw:
        raise ValueError(f"{path.name}: empty expectation")
    return Expect(**kw)


def parse_case(path: Path) -> Case:
    """Read the leading ``# key: value`` lines of a corpus file."""
    case = Case(path)
    for raw in path.read_text(encoding="utf-8").splitlines():
        if not raw.startswith("# "):
            break
        key, sep, value = raw[2:].partition(":")
        if not sep or key not in HEADER_KEYS:
            raise ValueError(f"{path.name}: unknown header line {raw!r} (keys: {HEADER_KEYS})")
        value = value.strip()
        if key == "expect":
            case.expects.append(_parse_expect(value, path))
        elif key == "after-fix":
            case.after_fix.append(_parse_expect(value, path))
        elif key == "known-bug":
            case.known_bug = value
        elif key == "overrides":
            case.overrides += shlex.split(value)
        else:
            case.requires += value.split()
    if not case.expects and not case.after_fix:
        raise ValueError(f"{path.name}: no '# expect:' line")
    if bool(case.after_fix) != bool(case.known_bug):
        raise ValueError(f"{path.name}: 'after-fix' and 'known-bug' go together")
    return case


CASES = [parse_case(p) for p in sorted(CORPUS.glob("*.yaml"))]


def _params():
    for c in CASES:
        if c.expects:
            yield pytest.param(c, c.expects, id=c.path.stem)
        if c.after_fix:
            mark = pytest.mark.xfail(reason=c.known_bug, strict=True)
            yield pytest.param(c, c.after_fix, id=f"{c.path.stem}-after-fix", marks=mark)


# ------------------------------------------------------------------------------------------------
# Registries: recipe rules that consult the objective / reward registries are tested against the
# real registry when it is importable, else against a stand-in with the same shape.


def _fake_objectives() -> types.ModuleType:
    mod = types.ModuleType("apo_cli.algo.objectives")
    apo = ("tau", "beta_r", "clip_ratio", "clip_u", "z_loss_coef", "logprob_reduction", "alpha", "adaptive_tau")
    grpo = ("eps_low", "eps_high", "loss_aggregation")
    mod.OBJECTIVES = {
        "apo": types.SimpleNamespace(params=apo),
        "adpo": types.SimpleNamespace(params=apo),
        "grpo": types.SimpleNamespace(params=grpo),
        "gspo": types.SimpleNamespace(params=grpo),
        "dr_grpo": types.SimpleNamespace(params=grpo),
    }
    return mod


def _fake_rewards() -> types.ModuleType:
    mod = types.ModuleType("apo_cli.rewards")
    mod.REWARDS = {"exact_match": None, "math_verify": None, "format": None}
    return mod


def use_registries(monkeypatch: pytest.MonkeyPatch, names: list[str]) -> None:
    from apo_cli import recipe

    for name in names:
        if name == "objectives" and not recipe.objective_names():
            monkeypatch.setitem(sys.modules, "apo_cli.algo.objectives", _fake_objectives())
        elif name == "rewards" and not recipe.reward_names():
            monkeypatch.setitem(sys.modules, "apo_cli.rewards", _fake_rewards())
        elif name not in ("objectives", "rewards"):
            raise ValueError(f"unknown registry {name!r}")


# ------------------------------------------------------------------------------------------------
# Helpers


def problems_of(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("  - ")]


def check_error_block(result, expects: list[Expect]) -> None:
    """Exit code 2, one 'error:' header with the right count, every expectation met, no traceback."""
    out = result.output
    assert "Traceback" not in out, out
    assert result.exit_code == 2, f"exit code {result.exit_code}, output:\n{out}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = out.splitlines()
    head = HEAD_RE.match(lines[0]) if lines else None
    assert head, f"first line is not 'error: FILE: N problems in recipe':\n{out}"
    problems = problems_of(out)
    assert int(head.group(1)) == len(problems), out
    for e in expects:
        if e.line is not None or e.field is not None or e.text is not None or e.override is not None:
            assert any(e.matches(p) for p in problems), f"no problem line matches {e}:\n{out}"
        if e.absent is not None:
            assert e.absent not in out, f"{e.absent!r} should not appear:\n{out}"


# ------------------------------------------------------------------------------------------------
# Tests


def test_corpus_is_big_enough():
    assert len(CASES) >= MIN_CASES


@pytest.mark.parametrize(("case", "expects"), list(_params()))
def test_bad_recipe(case: Case, expects: list[Expect], cli, monkeypatch):
    use_registries(monkeypatch, case.requires)
    result = cli("validate", str(case.path), *case.overrides)
    check_error_block(result, expects)


def test_all_problems_reported_at_once(tmp_path, cli):
    path = tmp_path / "many.yaml"
    path.write_text(
        "model:\n"
        "  name_or_path: tiny-random\n"
        "rollout:\n"
        "  group_size: 1\n"  # 4
        "  temprature: 2\n"  # 5
        "run:\n"
        "  seed: -1\n"  # 7
        "  name: a b\n"  # 8
        "logging:\n"
        "  metrics_file: ../x\n"  # 10
        "  dashboard: fancy\n",  # 11
        encoding="utf-8",
    )
    expects = [
        Expect(line=4, field="rollout.group_size", text="at least 2"),
        Expect(line=5, field="rollout.temprature", text="did you mean 'temperature'"),
        Expect(line=7, field="run.seed", text="greater than or equal to 0"),
        Expect(line=8, field="run.name", text="run name"),
        Expect(line=10, field="logging.metrics_file", text="inside the run directory"),
        Expect(line=11, field="logging.dashboard", text="(got 'fancy')"),
    ]
    result = cli("validate", str(path))
    check_error_block(result, expects)
    assert len(problems_of(result.output)) == len(expects), result.output


def test_file_and_override_problems_reported_together(tmp_path, cli):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name_or_path: tiny-random\nrollout:\n  temprature: 2\n", encoding="utf-8")
    result = cli("validate", str(path), "rollout.group_size=1")
    check_error_block(
        result,
        [
            Expect(line=4, field="rollout.temprature", text="did you mean"),
            Expect(override="rollout.group_size=1", field="rollout.group_size", text="at least 2"),
        ],
    )


@pytest.mark.parametrize(
    ("content", "text"),
    [
        (b"", "the recipe is empty"),
        (b"   \n\n", "the recipe is empty"),
        (b"model:\n  name_or_path: caf\xe9\n", "not UTF-8"),
    ],
    ids=["zero-bytes", "blank", "latin-1"],
)
def test_unreadable_recipe_files(tmp_path, cli, content, text):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    check_error_block(cli("validate", str(path)), [Expect(text=text)])


def test_missing_recipe_file(tmp_path, cli):
    check_error_block(cli("validate", str(tmp_path / "nope.yaml")), [Expect(text="recipe file not found")])


def test_recipe_path_is_a_directory(tmp_path, cli):
    check_error_block(cli("validate", str(tmp_path)), [Expect(text="is a directory")])


@pytest.mark.parametrize(("section", "key", "word"), [("data", "chat_template", "off"), ("data", "chat_template", "on"),
                                                      ("logging", "dashboard", "off")])
def test_documented_on_off_values_parse_unquoted(tmp_path, cli, section, key, word):
    path = tmp_path / "r.yaml"
    path.write_text(f"model:\n  name_or_path: tiny-random\n{section}:\n  {key}: {word}\n", encoding="utf-8")
    result = cli("validate", "-q", str(path))
    assert result.exit_code == 0, result.output


def test_an_oversized_recipe_is_refused_before_it_is_parsed(tmp_path, cli):
    path = tmp_path / "huge.yaml"
    path.write_text("model:\n  name_or_path: tiny-random\ndata:\n  system_prompt: '" + "x" * 300_000 + "'\n")
    check_error_block(cli("validate", str(path)), [Expect(text="a recipe may be at most 262,144 bytes")])


@pytest.mark.parametrize(("value", "text"), [
    ("{a: " + "[" * 100 + "]" * 100 + "}", "nested more than 64 levels deep"),
    ("{a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], " + ", ".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcde", "bcdef")) + "}", "expands to more than"),
    ("9" * 5000, "out of range (at most 32 digits)"),
], ids=["deep", "alias-bomb", "5000-digits"])
def test_override_values_are_under_the_same_caps(tmp_path, cli, value, text):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name_or_path: tiny-random\n", encoding="utf-8")
    key = "run.seed" if value.isdigit() else "data.task_kwargs"
    check_error_block(cli("validate", str(path), f"{key}={value}"),
                      [Expect(override=f"{key}={value}", field=key, text=text)])
