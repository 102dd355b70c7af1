"""A recipe alone never makes code outside apo run (issue 14, item 4).

Custom rewards (``module:function``, ``file.py:function``) and ``model.trust_remote_code: true`` need
the user's opt-in: ``--trust-code`` or ``APO_TRUST_CODE=1``. Without it: one line naming what the
recipe wants to run and how to allow it, and nothing has run. conftest.py trusts the tests' own
reward files; every test here takes that away first.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from apo_cli import trust
from apo_cli.recipe import RewardSpec, recipe_from_dict
from apo_cli.rewards import RewardSet
from tests.helpers import install_plugin, tiny_recipe, uninstall_plugin, write_recipe


@pytest.fixture(autouse=True)
def untrusted(monkeypatch):
    monkeypatch.delenv(trust.ENV, raising=False)
    assert not trust.code_trusted()


def _shell_recipe(tmp_path: Path, marker: Path, reward: str = "os:system", arg: str = "command", **sections):
    d = tiny_recipe(tmp_path, "run", rewards=[{"name": reward, "kwargs": {arg: f"touch {marker}"}}], **sections)
    return write_recipe(tmp_path, d)


def _one_error_line(res, *needles: str) -> None:
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in lines[0], res.output


@pytest.mark.parametrize(("reward", "arg"), [("os:system", "command"), ("subprocess:getoutput", "cmd")])
@pytest.mark.parametrize("command", [["validate", "--preflight"], ["train"]])
def test_a_shell_command_in_a_recipe_is_refused(cli, tmp_path, reward, arg, command):
    """Before: `rewards: [{name: os:system, kwargs: {command: ...}}]` ran the command."""
    marker = tmp_path / "pwned"
    res = cli(*command, str(_shell_recipe(tmp_path, marker, reward, arg)))
    assert res.exit_code == 2, res.output
    _one_error_line(res, f"rewards[0] imports {reward!r}", "--trust-code", "APO_TRUST_CODE=1")
    assert not marker.exists()
    assert not (tmp_path / "run").exists()  # refused before the run directory is touched


def test_eval_of_a_run_directory_someone_sent_is_refused(cli, tmp_path, monkeypatch):
    """The main attack: a run directory whose recipe.yaml names os:system, evaluated with `apo eval RUN`."""
    d = tiny_recipe(tmp_path, "run", run={"max_steps": 1}, rewards=[{"name": "exact_match"}],
                    data={"task_kwargs": {"level": 1, "size": 40}, "eval_fraction": 0.1})
    assert cli("train", str(write_recipe(tmp_path, d))).exit_code == 0
    marker = tmp_path / "pwned"
    sent = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    sent["rewards"] = [{"name": "os:system", "kwargs": {"command": f"touch {marker}"}}]
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(sent))
    res = cli("eval", str(tmp_path / "run"), "-k", "1", "--limit", "1")
    assert res.exit_code == 2, res.output
    _one_error_line(res, "rewards[0] imports 'os:system'", "--trust-code")
    assert not marker.exists()
    res = cli("eval", "tiny-random", "--data", "builtin:arithmetic", "--reward", "os:system", "--limit", "1")
    assert res.exit_code == 2 and not marker.exists(), res.output
    _one_error_line(res, "imports 'os:system'")


def test_plain_validate_never_imports_the_recipe_code(cli, tmp_path):
    marker = tmp_path / "imported"
    (tmp_path / "mine.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef score(completions, **_):\n"
                                      "    return [1.0] * len(completions)\n")
    d = tiny_recipe(tmp_path, "run", rewards=[{"name": "mine.py:score"}, {"name": "os:system",
                                                                          "kwargs": {"command": f"touch {marker}"}}])
    res = cli("validate", str(write_recipe(tmp_path, d)))
    assert res.exit_code == 0, res.output
    assert not marker.exists()


def test_trust_code_allows_the_users_own_reward_file(cli, tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text("def score(completions, **_):\n    return [float(len(c)) for c in completions]\n")
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, "run", rewards=[{"name": "mine.py:score"}]))
    res = cli("validate", "--preflight", str(path))
    assert res.exit_code == 2
    _one_error_line(res, "rewards[0] imports", "mine.py:score")
    res = cli("validate", "--preflight", "--trust-code", "-q", str(path))
    assert res.exit_code == 0, res.output
    assert not trust.code_trusted()  # the flag ends with the command
    monkeypatch.setenv(trust.ENV, "1")
    assert cli("validate", "--preflight", "-q", str(path)).exit_code == 0


def test_with_the_opt_in_the_named_code_does_run(cli, tmp_path):
    """The gate is the only thing between a recipe and its code: with --trust-code, os:system runs."""
    marker = tmp_path / "ran"
    res = cli("validate", "--preflight", "--trust-code", str(_shell_recipe(tmp_path, marker)))
    assert marker.exists()
    assert res.exit_code != 0 and "returned 0; expected a list" in res.output  # and is then no reward


def test_trust_remote_code_needs_the_opt_in(cli, tmp_path, tiny):
    d = tiny_recipe(tmp_path, "run", model={"name_or_path": str(tiny), "trust_remote_code": True},
                    rewards=[{"name": "exact_match"}])
    res = cli("train", str(write_recipe(tmp_path, d)))
    assert res.exit_code == 2, res.output
    _one_error_line(res, "model.trust_remote_code: true runs the Python code of", "--trust-code")
    from apo_cli.models import load_policy

    with pytest.raises(trust.TrustError, match="model.trust_remote_code"):  # the Python API too
        load_policy(recipe_from_dict(d).model)
    with trust.trusting():
        load_policy(recipe_from_dict(d).model)


def test_the_python_api_needs_the_opt_in_too(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("def score(completions, **_):\n    return [1.0] * len(completions)\n")
    with pytest.raises(trust.TrustError, match=r"rewards\[0\] imports '.*mine.py:score'.*APO_TRUST_CODE=1"):
        RewardSet([RewardSpec(name=f"{path}:score")])
    from apo_cli.rewards.loading import load_reward

    with pytest.raises(trust.TrustError):
        load_reward("os:system")
    with trust.trusting():
        RewardSet([RewardSpec(name=f"{path}:score")]).close()
    assert not trust.code_trusted()


def test_installed_entry_point_rewards_need_no_opt_in(tmp_path, monkeypatch):
    """A package's `apo.rewards` entry point is code the user installed: allowed."""
    install_plugin(monkeypatch, tmp_path / "site", {"mypkg_rewards": textwrap.dedent("""
        def always_one(completions, **_):
            return [1.0] * len(completions)
    """)}, {"apo.rewards": {"always_one": "mypkg_rewards:always_one"}})
    try:
        from apo_cli.data import Example

        rs = RewardSet([RewardSpec(name="always_one")])
        ex = Example(index=0, prompt="q", answer="1", columns={})
        assert rs(["q", "q"], ["a", "b"], [[1], [2]], [ex, ex]).total == [1.0, 1.0]
        rs.close()
    finally:
        uninstall_plugin(["mypkg_rewards"])


@pytest.fixture
def tiny():
    from apo_cli.models import ensure_tiny

    return ensure_tiny()
