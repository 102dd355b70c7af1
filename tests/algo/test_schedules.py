"""Signals, alpha schedules and adaptive tau: values by hand, behaviour, state round trips, no dead fields."""

from __future__ import annotations

import json
import math

import pytest
import torch

from apo_cli.algo import Signals, TauSchedule, compute_advantages, compute_signals, make_alpha_schedule
from apo_cli.recipe import AdaptiveTauSpec, AlphaScheduleSpec

F64 = torch.float64
L16 = math.log(16)


def _sig(step=0, reward=0.5, r=0.5, c=0.5, calibration=0.5) -> Signals:
    return Signals(step=step, reward=reward, reward_signal=r, confidence=c, entropy_proxy=1 - c,
                   calibration=calibration)


# --------------------------------------------------------------------------------------------------
# Signals


def test_compute_signals_by_hand():
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0], dtype=F64)
    adv, _ = compute_advantages(rewards, ids, "none")
    # per-token NLL in units of log|V| (|V| = 16): h_i = clip(-logp_mean_i / ln 16, 0, 1)
    nll = torch.tensor([0.125, 0.25, 0.5, 2.0, 0.25, 0.5, 0.75, 0.6], dtype=F64)
    s = compute_signals(5, rewards, adv, ids, -nll * L16, vocab_size=16, correct=rewards > 0.5)
    assert s.step == 5 and s.reward == pytest.approx(4 / 8)
    # r: group 0 advantages [.75, -.25, -.25, -.25] -> min-max [1, 0, 0, 0] (mean 1/4);
    #    group 1 [.25, .25, .25, -.75] -> [1, 1, 1, 0] (mean 3/4);  r = (1/4 + 3/4) / 2 = 1/2
    assert s.reward_signal == pytest.approx(0.5)
    # h = mean(.125, .25, .5, 1 (clipped), .25, .5, .75, .6) = 3.975 / 8 = 0.496875 ; c = 1 - h
    assert s.entropy_proxy == pytest.approx(3.975 / 8) and s.confidence == pytest.approx(1 - 3.975 / 8)
    # calibration: group 0: correct row (nll .125) beats the 3 wrong ones (.25, .5, 2.0): 3/3;
    #   group 1: wrong row nll .6; correct .25 and .5 beat it, .75 does not: 2/3;  total 5/6
    assert s.calibration == pytest.approx(5 / 6)
    # without `correct` the reward ranks the pairs; here the same pairs
    assert compute_signals(5, rewards, adv, ids, -nll * L16, 16).calibration == pytest.approx(5 / 6)
    assert Signals(**json.loads(json.dumps(s.as_dict()))) == s  # a logged row replays exactly


def test_calibration_ties_and_undefined():
    ids = torch.tensor([0, 0, 1, 1])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64)
    adv, _ = compute_advantages(rewards, ids)
    tie = compute_signals(0, rewards, adv, ids, torch.tensor([-1.0, -1.0, -2.0, -3.0], dtype=F64), 100)
    assert tie.calibration == 0.5  # one pair (group 0), a tie counts 1/2; group 1 has no pair
    flat = torch.ones(4, dtype=F64)
    none = compute_signals(0, flat, torch.zeros(4, dtype=F64), ids, torch.tensor([-1.0, -2, -3, -4]), 100)
    assert none.calibration == 0.5 and none.reward_signal == 0.0  # no pairs; equal rewards give r = 0


# --------------------------------------------------------------------------------------------------
# Stateless kinds by hand


def test_constant_linear_cosine_by_hand():
    assert make_alpha_schedule(AlphaScheduleSpec(kind="constant"), 10).step(_sig()) == 0.9  # value None -> alpha_max
    assert make_alpha_schedule(AlphaScheduleSpec(kind="constant", value=0.42), 10).step(_sig()) == 0.42
    lin = make_alpha_schedule(AlphaScheduleSpec(kind="linear", alpha_max=0.9, alpha_min=0.3), max_steps=10)
    # steps 0 .. 9 of a 10-step run: 0.9 + (0.3 - 0.9) * step / 9, alpha_min on the last (issue 15)
    assert [lin.step(_sig(step=s)) for s in (0, 5, 9, 20)] == pytest.approx([0.9, 0.9 - 0.6 * 5 / 9, 0.3, 0.3])
    cos = make_alpha_schedule(AlphaScheduleSpec(kind="cosine", alpha_max=0.9, alpha_min=0.3, steps=10), 99)
    # 0.9 - 0.6 * (1 - cos(pi step / 9)) / 2: step 2 -> 0.9 - 0.6 * 0.1169778 = 0.8298133
    assert [cos.step(_sig(step=s)) for s in (0, 2, 9, 10)] == pytest.approx([0.9, 0.8298133, 0.3, 0.3])


@pytest.mark.parametrize(
    "c, r, want",
    [
        (0.8, 0.75, 0.9 - 0.55 * 0.8 * 0.5),  # s = 2r - 1 = 0.5, gate c*s = 0.4 -> 0.9 - 0.22 = 0.68
        (0.8, 0.4, 0.9),  # s < 0: gate 0 -> alpha_max
        (1.0, 1.0, 0.35),  # full gate -> alpha_min
    ],
)
def test_reward_confidence_is_the_reference_rule(c, r, want):
    sched = make_alpha_schedule(AlphaScheduleSpec(kind="reward_confidence"), 10)
    assert sched.step(_sig(r=r, c=c)) == pytest.approx(want)
    assert sched.metrics()["alpha/target"] == pytest.approx(want)


def test_adaptive_tau_by_hand():
    sig = Signals(step=0, reward=0.3, reward_signal=0.25, confidence=0.7, entropy_proxy=0.3, calibration=0.5)
    # s = 2 * 0.25 - 1 = -0.5; 1 + 0.2 * 0.3 + 0.5 * 0.7 * 0.5 = 1.235; tau = 0.5 * 1.235 = 0.6175
    assert TauSchedule(0.5, AdaptiveTauSpec(enabled=True)).step(sig) == pytest.approx(0.6175)
    assert TauSchedule(0.5, AdaptiveTauSpec()).step(sig) == 0.5  # disabled
    assert TauSchedule(5.0, AdaptiveTauSpec(enabled=True)).step(sig) == 1.5  # clipped at tau_max


# --------------------------------------------------------------------------------------------------
# The guarded rule


def _trajectory(n=50):
    """Reward rising 0.015 per step; calibration up to 0.8, a dip to 0.57 for steps 25-39, then back."""
    out = []
    for t in range(n):
        cal = 0.4 + 0.04 * t if t < 10 else (0.57 if 25 <= t < 40 else 0.8)
        out.append(_sig(step=t, reward=0.1 + 0.015 * t, calibration=cal))
    return out


def _run(spec: AlphaScheduleSpec, signals, sched=None):
    sched = sched or make_alpha_schedule(spec, max_steps=40)
    return [sched.step(s) for s in signals], sched


GUARDED = AlphaScheduleSpec(kind="guarded", ema=0.5)


def test_guarded_moves_down_only_when_improving_and_calibrated():
    alphas, sched = _run(GUARDED, _trajectory())
    assert alphas[: GUARDED.window - 1] == [0.9] * (GUARDED.window - 1)  # no evidence before a full window
    assert min(alphas) == pytest.approx(0.35)  # reaches alpha_min ...
    steps = [abs(b - a) for a, b in zip([0.9] + alphas, alphas)]
    assert max(steps) <= GUARDED.max_rate + 1e-12  # ... no faster than max_rate per step
    m = sched.metrics()
    assert m["alpha/improving"] == 1.0 and m["alpha/confident"] == 1.0 and m["alpha/reward_slope"] > 0
    # flat reward: never improving -> stays at alpha_max
    flat = [_sig(step=t, reward=0.5, calibration=0.9) for t in range(30)]
    assert _run(GUARDED, flat)[0] == [0.9] * 30
    # improving but uncalibrated (likelihood does not rank correct answers first): stays at alpha_max
    blind = [_sig(step=t, reward=0.01 * t, calibration=0.5) for t in range(30)]
    assert _run(GUARDED, blind)[0] == [0.9] * 30


def test_guarded_returns_to_coverage_when_reward_falls():
    up = [_sig(step=t, reward=0.02 * t, calibration=0.9) for t in range(30)]
    down = [_sig(step=30 + t, reward=0.6 - 0.02 * t, calibration=0.9) for t in range(30)]
    alphas, _ = _run(GUARDED, up + down)
    assert alphas[29] < 0.5 and alphas[-1] == pytest.approx(0.9)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine", "reward_confidence", "guarded"])
def test_state_dict_round_trip_continues_identically(kind):
    spec = AlphaScheduleSpec(kind=kind, ema=0.5)
    traj = _trajectory(40)
    first, original = _run(spec, traj[:20])
    state = json.loads(json.dumps(original.state_dict()))  # checkpoints store JSON
    restored = make_alpha_schedule(spec, max_steps=40)
    restored.load_state_dict(state)
    assert restored.metrics() == pytest.approx(original.metrics())
    assert _run(spec, traj[20:], restored)[0] == _run(spec, traj[20:], original)[0]


@pytest.mark.parametrize("kind", ["constant", "linear", "reward_confidence", "guarded"])
def test_fresh_schedule_state_is_strict_json_and_has_no_metrics_yet(kind):
    sched = make_alpha_schedule(AlphaScheduleSpec(kind=kind), 10)
    json.dumps(sched.state_dict(), allow_nan=False)
    assert sched.metrics() == {}
    sched.step(_sig())
    json.dumps(sched.state_dict(), allow_nan=False)
    assert all(math.isfinite(v) for v in sched.metrics().values())


def test_annealed_schedule_needs_a_length():
    with pytest.raises(ValueError, match="alpha.steps"):
        make_alpha_schedule(AlphaScheduleSpec(kind="linear"), None)
    linear = make_alpha_schedule(AlphaScheduleSpec(kind="linear", steps=4), None)
    assert linear.step(_sig(step=2)) == pytest.approx(0.9 - 0.55 * 2 / 3)  # steps 0..3: the last one is alpha_min


def test_load_state_of_another_kind_is_refused():
    state = make_alpha_schedule(AlphaScheduleSpec(kind="guarded"), 10).state_dict()
    with pytest.raises(ValueError, match="kind"):
        make_alpha_schedule(AlphaScheduleSpec(kind="linear"), 10).load_state_dict(state)


def test_tau_state_round_trip():
    sig = _sig(r=0.2, c=0.6)
    a = TauSchedule(0.5, AdaptiveTauSpec(enabled=True))
    a.step(sig)
    b = TauSchedule(0.5, AdaptiveTauSpec(enabled=True))
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.metrics() == a.metrics() and b.step(sig) == a.step(sig)


# --------------------------------------------------------------------------------------------------
# No dead fields: each field of AlphaScheduleSpec / AdaptiveTauSpec changes the output of a kind that reads it

ALPHA_FIELD_CASES = [
    ("constant", "value", 0.5),
    ("constant", "alpha_max", 0.8),
    ("linear", "alpha_max", 0.8),
    ("linear", "alpha_min", 0.5),
    ("linear", "steps", 5),
    ("cosine", "alpha_max", 0.8),
    ("cosine", "alpha_min", 0.5),
    ("cosine", "steps", 5),
    ("reward_confidence", "alpha_max", 0.8),
    ("reward_confidence", "alpha_min", 0.5),
    ("guarded", "kind", "linear"),
    ("guarded", "alpha_max", 0.8),
    ("guarded", "alpha_min", 0.5),
    ("guarded", "ema", 0.9),
    ("guarded", "window", 4),
    ("guarded", "min_improvement", 0.05),
    ("guarded", "confidence_threshold", 0.9),
    ("guarded", "max_rate", 0.01),
    ("guarded", "smoothing", 0.9),
    ("guarded", "hysteresis", 0.0),
]


@pytest.mark.parametrize("kind, field, value", ALPHA_FIELD_CASES)
def test_every_alpha_schedule_field_changes_the_output(kind, field, value):
    base = AlphaScheduleSpec(kind=kind, ema=0.5)
    traj = [_sig(step=s.step, reward=s.reward, calibration=s.calibration, r=0.5 + 0.01 * s.step, c=0.9)
            for s in _trajectory()]
    changed = AlphaScheduleSpec(**{**base.model_dump(), field: value})
    assert _run(changed, traj)[0] != pytest.approx(_run(base, traj)[0])


# read by the training loop, not by the schedule's step: tests/algo/test_fidelity.py
LOOP_READ_ALPHA_FIELDS = {"granularity"}


def test_alpha_field_cases_cover_every_field():
    assert {f for _, f, _ in ALPHA_FIELD_CASES} | LOOP_READ_ALPHA_FIELDS == set(AlphaScheduleSpec.model_fields)


@pytest.mark.parametrize(
    "field, value", [("enabled", False), ("a", 0.6), ("b", 0.1), ("tau_min", 0.7), ("tau_max", 0.55)]
)
def test_every_adaptive_tau_field_changes_tau(field, value):
    sig = Signals(step=0, reward=0.3, reward_signal=0.25, confidence=0.7, entropy_proxy=0.3, calibration=0.5)
    base = AdaptiveTauSpec(enabled=True)  # tau_eff = 0.6175 (see test_adaptive_tau_by_hand)
    changed = AdaptiveTauSpec(**{**base.model_dump(), field: value})
    assert TauSchedule(0.5, changed).step(sig) != pytest.approx(TauSchedule(0.5, base).step(sig))
    assert {"enabled", "a", "b", "tau_min", "tau_max"} == set(AdaptiveTauSpec.model_fields)
