"""logging.report_to: the real TensorBoard, W&B (offline), MLflow (a local store) and Trackio (its
local store) get the run, and each library's own reader gets it back; --resume continues the same
tracker runs and sends no step twice; a tracker that breaks mid-run costs no metrics line.

The runs go through the CLI in a subprocess: each tracker keeps process-wide state (the W&B
service, Trackio's store location read at import), and the environment is the one a user has with
nothing configured (no W&B login, no MLFLOW_TRACKING_URI)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import tiny_recipe, write_recipe

pytest.importorskip("wandb")
pytest.importorskip("mlflow")
pytest.importorskip("trackio")
pytest.importorskip("tensorboard")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "apo-test"


def clean_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_")) and k != "NETRC"}
    env.update(HOME=str(tmp / "home"), TRACKIO_DIR=str(tmp / "trackio"), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    (tmp / "home").mkdir(exist_ok=True)
    return env


def apo(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "apo_cli", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


# -- each library's reader ----------------------------------------------------------------------------


def mlflow_history(run: Path, key: str) -> tuple[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    state = json.loads((run / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    exp = client.get_experiment_by_name(PROJECT)
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [state["run_id"]]  # one run, resumed in place
    assert runs[0].info.run_name == "t"
    hist = client.get_metric_history(state["run_id"], key)
    return state["run_id"], sorted((m.step, m.value) for m in hist)


def wandb_records(path: Path):
    """The records of a W&B transaction log (.wandb: LevelDB-log framing of wandb's Record protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0:  # zero padding at the end of a block
            pos += block - pos % block if pos % block else 0
            continue
        buf += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last fragment of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def wandb_history(run: Path) -> dict[str, dict[int, dict[str, float]]]:
    """run id -> step -> {metric: value}, over every offline run directory of the run."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for f in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        run_id = None
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run_id = rec.run.run_id
            elif kind == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                step = int(items.get("_step", rec.history.step.num))
                out.setdefault(run_id, {}).setdefault(step, {}).update(items)
    return out


TRACKIO_READER = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage
project = sys.argv[1]
runs = SQLiteStorage.get_runs(project)
print(json.dumps({"runs": runs, "logs": {r: SQLiteStorage.get_logs(project, r) for r in runs}}, default=str))
"""


def trackio_store(env: dict[str, str]) -> dict:
    r = subprocess.run([sys.executable, "-c", TRACKIO_READER, PROJECT], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def tensorboard_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return sorted((e.step, e.value) for e in acc.Scalars(tag))


# -- the tests -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_tracker_gets_the_run_and_resume_continues_it(tmp_path):
    env = clean_env(tmp_path)
    d = tiny_recipe(tmp_path, "t", run={"max_steps": 3}, checkpoint={"every": 2, "keep_last": 5},
                    logging={"report_to": ["wandb", "mlflow", "trackio", "tensorboard"], "project": PROJECT,
                             "samples_per_step": 1})
    recipe = write_recipe(tmp_path, d)
    run = tmp_path / "t"
    apo(env, "train", str(recipe))
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]

    # killed after step 3 was logged but before its checkpoint: the resume redoes step 3 from step 2
    shutil.rmtree(run / "checkpoints" / "step-3")
    apo(env, "train", str(recipe), "run.max_steps=4", "--resume", "--allow-recipe-change")
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    reward = {r["step"]: r["reward"] for r in rows}

    # MLflow: one run, its reward history one value per step (step 3 not sent twice)
    _, hist = mlflow_history(run, "reward")
    assert [s for s, _ in hist] == [1, 2, 3, 4]
    assert all(v == pytest.approx(reward[s]) for s, v in hist)

    # W&B: the offline runs of both sessions carry the same run id; the history continues
    by_run = wandb_history(run)
    state = json.loads((run / "trackers.json").read_text())
    assert list(by_run) == [state["wandb"]["run_id"]] and state["wandb"]["mode"] == "offline"
    assert len(list(run.glob("wandb/offline-run-*"))) == 2
    hist_w = by_run[state["wandb"]["run_id"]]
    assert sorted(hist_w) == [1, 2, 3, 4]
    assert hist_w[4]["reward"] == pytest.approx(reward[4]) and "alpha" in hist_w[1]

    # Trackio: the run of that name, continued, with its metrics per step
    store = trackio_store(env)
    assert store["runs"] == ["t"]
    logs = store["logs"]["t"]
    assert sorted(x["step"] for x in logs if "reward" in x) == [1, 2, 3, 4]
    assert {x["step"]: x["reward"] for x in logs if "reward" in x}[2] == pytest.approx(reward[2])

    # TensorBoard: the event reader finds alpha, once per step
    alpha = tensorboard_scalars(run, "alpha")
    assert [s for s, _ in alpha] == [1, 2, 3, 4]
    assert alpha[0][1] == pytest.approx(rows[0]["alpha"], rel=1e-6)


def test_a_tracker_failing_mid_run_is_reported_once_and_training_goes_on(tmp_path, capsys):
    """The MLflow store is wrecked during step 2 (a reward overwrites the SQLite header): one message,
    training goes on, every metrics line is written."""
    from apo_cli.recipe import recipe_from_dict
    from apo_cli.train import train_from_recipe

    store = tmp_path / "t" / "mlflow.db"
    rewards = tmp_path / "breaking.py"
    rewards.write_text(textwrap.dedent(f"""
        import os
        calls = []
        def frac_a(completions, **_):
            if os.path.exists({str(store)!r}):  # training has started (the preflight calls come before)
                calls.append(1)
            if len(calls) == 5:  # the first group of step 2 (4 groups a step)
                with open({str(store)!r}, "r+b") as f:
                    f.write(bytes(4096))
            return [c.count("a") / max(len(c), 1) for c in completions]
    """))
    d = tiny_recipe(tmp_path, "t", rewards=[{"name": f"{rewards}:frac_a"}],
                    logging={"report_to": ["mlflow"], "project": PROJECT})
    train_from_recipe(recipe_from_dict(d))
    out = capsys.readouterr()
    text = out.out + out.err
    assert text.count("mlflow failed at step 2") == 1 and "failed" not in text.replace("mlflow failed at step 2", ""), text
    assert [r["step"] for r in metrics(tmp_path / "t")] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "t" / "trackers.json").read_text())["mlflow"]["step"] == 1


def test_a_missing_tracker_is_one_line_naming_the_extra(cli, tmp_path, monkeypatch):
    import apo_cli.tracking as tracking

    monkeypatch.setitem(tracking.TRACKERS, "wandb", ("apo_cli.tracking.wandb_tracker", "no_such_wandb_pkg", "wandb"))
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, "t", logging={"report_to": ["wandb"]}))
    res = cli("train", str(recipe))
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "pip install 'apo-cli[wandb]'" in err, err
    assert not (tmp_path / "t" / "checkpoints").exists()


def test_logging_tensorboard_true_still_writes_events(tmp_path):
    from apo_cli.recipe import recipe_from_dict
    from apo_cli.train import train_from_recipe

    d = tiny_recipe(tmp_path, "t", run={"max_steps": 2}, logging={"tensorboard": True})
    r = recipe_from_dict(d)
    assert r.logging.trackers() == ["tensorboard"]
    train_from_recipe(r)
    assert [s for s, _ in tensorboard_scalars(tmp_path / "t", "reward")] == [1, 2]


@pytest.mark.parametrize("value, words", [
    ("[neptune]", ["logging.report_to", "neptune"]),
    ("[wandb, wandb]", ["logging.report_to", "more than once"]),
])
def test_report_to_is_validated(cli, tmp_path, value, words):
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, "t"))
    res = cli("validate", str(recipe), f"logging.report_to={value}")
    assert res.exit_code == 2, res.output
    for w in words:
        assert w in res.stderr, res.stderr
