"""`apo generate`: model resolution, prompt sources, determinism, n / stop / max tokens, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def records(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    from apo_cli.models import ensure_tiny

    return ensure_tiny(0)


def fake_run(root: Path, tiny_dir: Path, steps: list[int]) -> Path:
    """A run directory whose checkpoints are copies of the tiny model, with checksums like training writes."""
    from apo_cli.checkpoint import _sha256

    run = root / "run"
    for s in steps:
        ck = run / "checkpoints" / f"step-{s}"
        shutil.copytree(tiny_dir, ck)
        (ck / "trainer_state.json").write_text(json.dumps({"step": s}))
        (ck / "optimizer.pt").write_bytes(b"")
        sums = {p.name: _sha256(p) for p in sorted(ck.iterdir()) if p.is_file()}
        (ck / "checksums.json").write_text(json.dumps(sums))
    (run / "metrics.jsonl").write_text("")
    return run


def test_deterministic_for_a_seed_and_honours_n_and_max_tokens(cli):
    args = ["generate", "tiny-random", "-p", "1+2=", "-p", "7-3=", "-n", "3", "--max-new-tokens", "5"]
    a = records(cli(*args, "--seed", "1"))
    b = records(cli(*args, "--seed", "1"))
    c = records(cli(*args, "--seed", "2"))
    assert a == b
    assert [r["completion"] for r in a] != [r["completion"] for r in c]
    assert len(a) == 6
    assert [(r["prompt"], r["index"], r["sample"]) for r in a] == [
        (p, i, j) for i, p in enumerate(["1+2=", "7-3="]) for j in range(3)
    ]
    for r in a:
        assert set(r) >= {"prompt", "completion", "finish_reason", "tokens"}
        assert 1 <= r["tokens"] <= 5
        assert r["finish_reason"] == ("length" if r["tokens"] == 5 else "stop")


def test_stop_string_cuts_the_same_sample(cli):
    base = records(cli("generate", "tiny-random", "-p", "9+9=", "--max-new-tokens", "40", "--seed", "3"))[0]
    text = base["completion"]
    assert len(text) > 3, text
    stop = text[2]
    cut = text[: text.index(stop) + 1]
    got = records(cli("generate", "tiny-random", "-p", "9+9=", "--max-new-tokens", "40", "--seed", "3", "--stop", stop))[0]
    assert got["completion"] == cut
    assert got["finish_reason"] == "stop"


def test_greedy_ignores_the_seed(cli):
    a = records(cli("generate", "tiny-random", "-p", "3+3=", "--greedy", "-m", "6", "--seed", "1"))
    b = records(cli("generate", "tiny-random", "-p", "3+3=", "--greedy", "-m", "6", "--seed", "9"))
    assert a == b


def test_prompt_sources_and_output_file(cli, tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("1+1=\n\n2+2=\n")
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "1+1="}\n{"prompt": "2+2=", "other": 1}\n')
    common = ["-m", "4", "--seed", "5"]
    from_txt = records(cli("generate", "tiny-random", "-f", str(txt), *common))
    from_jsonl = records(cli("generate", "tiny-random", "-f", str(jl), *common))
    from typer.testing import CliRunner

    from apo_cli.main import app

    from_stdin = records(CliRunner().invoke(app, ["generate", "tiny-random", *common], input="1+1=\n2+2=\n"))
    assert [r["prompt"] for r in from_txt] == ["1+1=", "2+2="]
    assert from_txt == from_jsonl == from_stdin
    out = tmp_path / "out.jsonl"
    res = cli("generate", "tiny-random", "-f", str(txt), *common, "--output", str(out))
    assert res.exit_code == 0 and res.stdout == ""
    assert [json.loads(x) for x in out.read_text().splitlines()] == from_txt


def test_streaming_prints_the_same_completion(cli, tiny_dir):
    plain = records(cli("generate", "tiny-random", "-p", "5+5=", "-m", "12", "--seed", "4"))[0]
    res = cli("generate", "tiny-random", "-p", "5+5=", "-m", "12", "--seed", "4", "--stream")
    assert res.exit_code == 0, res.output
    assert res.stdout.rstrip("\n") == plain["completion"]
    assert f"{plain['tokens']} tokens" in res.stderr


def test_run_dir_means_its_latest_good_checkpoint(tmp_path, tiny_dir, capsys):
    from apo_cli.generation import resolve_model

    run = fake_run(tmp_path, tiny_dir, [1, 2])
    assert resolve_model(str(run)).path == str((run / "checkpoints" / "step-2").resolve())
    (run / "checkpoints" / "step-2" / "model.safetensors").write_bytes(b"broken")
    m = resolve_model(str(run))
    assert (m.step, m.run_dir, m.label) == (1, run.resolve(), "run/step-1")
    assert "step-2" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["unknown_path", "empty_file", "no_weights", "no_checkpoint", "bad_jsonl", "no_prompt"])
def test_bad_inputs_are_one_line_errors(cli, tmp_path, case):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    no_weights = tmp_path / "ckpt"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    args, code, words = {
        "unknown_path": (["./does/not/exist", "-p", "x"], 1, ["does/not/exist", "does not exist"]),
        "empty_file": (["tiny-random", "-f", str(empty)], 2, [str(empty), "no prompts"]),
        "no_weights": ([str(no_weights), "-p", "x"], 1, [str(no_weights.resolve()), "no model weights"]),
        "no_checkpoint": ([str(run), "-p", "x"], 1, [str(run), "no checkpoint"]),
        "bad_jsonl": (["tiny-random", "-f", str(bad)], 2, [f"{bad}:2", "'prompt'"]),
        "no_prompt": (["tiny-random"], 2, ["stdin", "no prompts"]),
    }[case]
    res = cli("generate", *args)
    assert res.exit_code == code, res.output
    err = res.stderr.strip()
    assert err.startswith("error:") and "Traceback" not in res.output
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err


def test_stop_strings_understand_escapes():
    from apo_cli.generation import unescape

    assert unescape(r"\n") == "\n" and unescape(r"a\tb") == "a\tb" and unescape(r"\\n") == "\\n"
    assert unescape("plain ✓") == "plain ✓"
