"""The training core's behaviour is pinned: the recipes of tests/golden/runs.py (2 mini-batches ×
2 epochs, KL to the initial model; APO, APO with LoRA, GRPO; a resume from the middle) give the
metrics and weights recorded before the redesign of issue 13, bit for bit, on each processor kind
recorded (tests/golden/train_golden-*.json)."""

from __future__ import annotations

import json

import pytest

from tests.golden.runs import RECORDS, capability, run_all

KINDS = {r["capability"]: r for r in (json.loads(p.read_text()) for p in RECORDS)}
RECORDED = KINDS.get(capability()) or next(iter(KINDS.values()))  # the names of the runs are the same in each


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if capability() not in KINDS:
        pytest.skip(f"recorded on {sorted(KINDS)}, this is {capability()!r}: floating point differs between "
                    "vector kernels (record this one from commit 8fe6e21 with python -m tests.golden.runs --record)")
    return run_all(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("name", sorted(RECORDED["runs"]))
def test_metrics_are_the_recorded_ones(runs, name):
    got, want = runs[name]["metrics"], RECORDED["runs"][name]["metrics"]
    assert len(got) == len(want) == 4
    for a, b in zip(got, want, strict=True):
        diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
        assert not diff, f"step {b['step']}: {diff}"


@pytest.mark.parametrize("name", sorted(RECORDED["runs"]))
def test_weights_are_the_recorded_ones(runs, name):
    got, want = runs[name]["weights"], RECORDED["runs"][name]["weights"]
    assert got.keys() == want.keys()
    for step in want:
        assert got[step].keys() == want[step].keys() and len(want[step]) > 0
        changed = [k for k in want[step] if got[step][k] != want[step][k]]
        assert not changed, f"step {step}: {changed[:5]} differ"
