"""Alpha and tau schedules, driven by per-rollout signals (APO_METHOD §3).

Signals (:class:`Signals`, computed once per rollout by :func:`compute_signals` and logged under
their field names, so any schedule can be replayed exactly from ``metrics.jsonl``):

- ``reward``: mean raw reward;
- ``reward_signal`` r: advantages min-max normalised within each group, averaged over the batch
  (for one group with k of G correct on a 0/1 reward, r = k/G; a group with equal rewards gives 0).
  :func:`loss_batch_signals` takes the reference code's form instead, min and max over the whole
  loss batch (``algorithm.alpha.granularity: micro_batch``, APO_METHOD §3); over a whole rollout of
  many groups that form collapses to about 1/2 (the mean of centred advantages is 0, so r =
  -min A / (max A - min A) is set by two extreme rows), which is why a step keeps the per-group form;
- ``entropy_proxy`` h = mean_i clip(-logp_mean_i / log|V|, 0, 1) (per-token NLL of the sampled
  completion under the rollout policy, relative to a uniform distribution); ``confidence`` c = 1 - h;
- ``calibration``: how well the policy's own sequence log-prob (per-token mean) ranks better over
  worse completions of the same prompt: over all pairs (i, j) of a group with label_i > label_j
  (label = ``correct`` when given, else the reward), the fraction with logp_i > logp_j (ties count
  1/2) — a within-group AUROC. 0.5 when no group has a pair (or when likelihood says nothing about
  correctness); near 1 when the model is confident where it is right, the situation where
  exploiting its mode is safe.

Alpha schedules (``AlphaScheduleSpec.kind``, names of the :data:`ALPHA_SCHEDULES` registry, which
third-party packages extend through the ``apo.alpha_schedules`` entry-point group), alpha high =
coverage, low = exploitation:

- ``constant``: ``value`` (default alpha_max);
- ``linear`` / ``cosine``: alpha_max -> alpha_min over ``steps`` steps (default run.max_steps),
  a function of ``Signals.step`` (0 for the first rollout): alpha_max at step 0 and alpha_min
  exactly at step ``steps - 1``, the last training step;
- ``reward_confidence``: the reference rule, stateless: alpha = alpha_max - (alpha_max - alpha_min)
  * c * max(2r - 1, 0); with ``granularity: micro_batch`` the loop calls it at every loss call with
  that micro-batch's :func:`loss_batch_signals`, as the reference code does;
- ``guarded``: stateful. EMAs (factor ``ema``) of the reward and of the calibration; the policy is
  *improving* when the least-squares slope of the last ``window`` reward EMAs exceeds
  ``min_improvement`` per step, and *confident* when the calibration EMA reaches
  ``confidence_threshold`` (and stays confident until it falls below threshold - ``hysteresis``).
  The target is alpha_min when both hold, else alpha_max; it is smoothed (EMA factor
  ``smoothing``) and alpha follows it by at most ``max_rate`` per step.

The optional adaptive tau (:class:`TauSchedule`): tau_eff = clip(tau (1 + a h + b c (-s)),
tau_min, tau_max) with s = 2r - 1 — a hotter (softer) anchored softmax when the policy is uncertain
or losing, a cooler one when it is confident and winning.

Every ``state_dict`` is JSON-serialisable (floats, ints, bools, lists).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from apo_cli.algo.advantages import group_view
from apo_cli.registry import Registry, UnknownName

if TYPE_CHECKING:
    from apo_cli.algo.spec import AdaptiveTauSpec, AlphaScheduleSpec


# --------------------------------------------------------------------------------------------------
# Signals


@dataclass
class Signals:
    """Scalars computed once per rollout; all are logged under these names."""

    step: int
    reward: float  # mean raw reward
    reward_signal: float  # r of APO_METHOD §3
    confidence: float  # c = 1 - h
    entropy_proxy: float  # h
    calibration: float  # within-group AUROC of sequence log-prob vs correctness, in [0, 1]

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _pairwise_auroc(scores: Tensor, labels: Tensor, group_ids: Tensor) -> float:
    """Fraction of within-group pairs with label_i > label_j that the scores order the same way."""
    s, _ = group_view(scores, group_ids)  # [B, G]
    y, _ = group_view(labels, group_ids)  # [B, G]
    better = y[:, :, None] > y[:, None, :]  # [B, G, G] pairs (i better than j)
    n_pairs = int(better.sum())
    if n_pairs == 0:
        return 0.5
    ds = s[:, :, None] - s[:, None, :]  # [B, G, G]
    agree = (ds > 0).to(s.dtype) + 0.5 * (ds == 0).to(s.dtype)  # [B, G, G]
    return float((agree * better).sum() / n_pairs)


@torch.no_grad()
def compute_signals(
    step: int,
    rewards: Tensor,
    advantages: Tensor,
    group_ids: Tensor,
    seq_logp_mean: Tensor,
    vocab_size: int,
    correct: Tensor | None = None,
) -> Signals:
    """Signals of one rollout.

    Args:
        step: rollout index (0 for the first).
        rewards: [N] raw rewards.
        advantages: [N] advantages from ``compute_advantages``.
        group_ids: [N] group of each row.
        seq_logp_mean: [N] per-token mean log-prob of each completion under the rollout policy.
        vocab_size: |V| of the tokenizer (> 1).
        correct: [N] bool correctness, or None to rank by reward in the calibration.
    """
    dt = torch.float64
    a_g, _ = group_view(advantages.to(dt), group_ids)  # [B, G]
    lo = a_g.min(dim=-1, keepdim=True).values  # [B, 1]
    span = (a_g.max(dim=-1, keepdim=True).values - lo).clamp(min=1e-6)  # [B, 1]
    reward_signal = float(((a_g - lo) / span).mean())
    h = float((-seq_logp_mean.to(dt) / math.log(max(vocab_size, 2))).clamp(0.0, 1.0).mean())
    labels = (correct if correct is not None else rewards).to(dt)  # [N]
    return Signals(
        step=int(step),
        reward=float(rewards.to(dt).mean()),
        reward_signal=reward_signal,
        confidence=1.0 - h,
        entropy_proxy=h,
        calibration=_pairwise_auroc(seq_logp_mean.to(dt), labels, group_ids),
    )


def _entropy_proxy(seq_logp_mean: Tensor, vocab_size: int) -> float:
    return float((-seq_logp_mean.double() / math.log(max(vocab_size, 2))).clamp(0.0, 1.0).mean())


@torch.no_grad()
def loss_batch_signals(
    step: int,
    rewards: Tensor,
    advantages: Tensor,
    group_ids: Tensor,
    logp_mean: Tensor,
    logp_mean_old: Tensor,
    vocab_size: int,
) -> Signals:
    """Signals of one loss batch (a micro-batch of whole groups) as the reference code computes them
    at every loss call (APO_METHOD §3):

    - ``reward_signal`` r = mean_i (A_i - min A) / max(max A - min A, 1e-6), min and max over the
      whole loss batch (with one group per micro-batch: the per-group form);
    - ``confidence`` c = 1 - h with h from ``logp_mean`` [N], the per-token mean log-probs under
      the *current* policy (the reference's ``h_dynamic``);
    - ``entropy_proxy`` h from ``logp_mean_old`` [N], under the rollout policy (the reference's
      ``h_static``, the ``a * h`` term of adaptive tau);
    - ``calibration``: the within-group AUROC of the current log-probs against the rewards.
    """
    dt = torch.float64
    a = advantages.to(dt)  # [N]
    lo = a.min()
    reward_signal = float(((a - lo) / (a.max() - lo).clamp(min=1e-6)).mean())
    h_now = _entropy_proxy(logp_mean, vocab_size)
    return Signals(
        step=int(step),
        reward=float(rewards.to(dt).mean()),
        reward_signal=reward_signal,
        confidence=1.0 - h_now,
        entropy_proxy=_entropy_proxy(logp_mean_old, vocab_size),
        calibration=_pairwise_auroc(logp_mean.to(dt), rewards.to(dt), group_ids),
    )


# --------------------------------------------------------------------------------------------------
# Alpha schedules


class AlphaSchedule(Protocol):
    def step(self, signals: Signals) -> float:
        """Alpha for this rollout's updates (updates the state)."""
        ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: dict[str, Any]) -> None: ...


class _Stateless:
    """Base of schedules that are a function of the current signals only."""

    kind = ""

    def __init__(self) -> None:
        self.alpha: float | None = None  # None until the first step

    def metrics(self) -> dict[str, float]:
        return {} if self.alpha is None else {"alpha/target": self.alpha}

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "alpha": self.alpha}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        _check_kind(self.kind, d)
        self.alpha = None if d["alpha"] is None else float(d["alpha"])


def _check_kind(kind: str, d: dict[str, Any]) -> None:
    if d.get("kind") != kind:
        raise ValueError(f"alpha schedule state is for kind {d.get('kind')!r}, not {kind!r}")


class ConstantAlpha(_Stateless):
    kind = "constant"

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = float(value)

    def step(self, signals: Signals) -> float:
        self.alpha = self.value
        return self.alpha


class AnnealedAlpha(_Stateless):
    """alpha_max -> alpha_min over ``steps`` steps, linearly or along half a cosine."""

    def __init__(self, kind: str, alpha_max: float, alpha_min: float, steps: int) -> None:
        super().__init__()
        if kind not in ("linear", "cosine"):
            raise ValueError(f"annealed alpha kind must be linear or cosine, not {kind!r}")
        self.kind, self.alpha_max, self.alpha_min, self.steps = kind, alpha_max, alpha_min, max(int(steps), 1)

    def step(self, signals: Signals) -> float:
        # step indices run 0 .. steps-1: the last one is alpha_min exactly (a one-step schedule is alpha_min)
        t = 1.0 if self.steps == 1 else min(max(signals.step / (self.steps - 1), 0.0), 1.0)
        frac = t if self.kind == "linear" else 0.5 * (1.0 - math.cos(math.pi * t))  # 0 -> 1
        self.alpha = self.alpha_max * (1.0 - frac) + self.alpha_min * frac  # exact at both ends
        return self.alpha


class RewardConfidenceAlpha(_Stateless):
    """The reference rule: alpha = alpha_max - (alpha_max - alpha_min) * c * max(2r - 1, 0)."""

    kind = "reward_confidence"

    def __init__(self, alpha_max: float, alpha_min: float) -> None:
        super().__init__()
        self.alpha_max, self.alpha_min = alpha_max, alpha_min
        self.gate = 0.0

    def step(self, signals: Signals) -> float:
        self.gate = signals.confidence * max(2.0 * signals.reward_signal - 1.0, 0.0)
        self.alpha = self.alpha_max - (self.alpha_max - self.alpha_min) * self.gate
        return self.alpha

    def metrics(self) -> dict[str, float]:
        return {} if self.alpha is None else {"alpha/target": self.alpha, "alpha/gate": self.gate}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "gate": self.gate}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        super().load_state_dict(d)
        self.gate = float(d.get("gate", 0.0))  # checkpoints before the gate was saved: recomputed next step


def _slope(ys: list[float]) -> float:
    """Least-squares slope of ys against 0, 1, ..., n-1."""
    n = len(ys)
    x_mean, y_mean = (n - 1) / 2.0, sum(ys) / n
    num = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(ys))
    den = sum((i - x_mean) ** 2 for i in range(n))
    return num / den if den > 0 else 0.0


class GuardedAlpha:
    """Stateful guarded rule: exploit only while the reward improves and the model is calibrated."""

    kind = "guarded"

    def __init__(self, spec: AlphaScheduleSpec) -> None:
        self.spec = spec
        self.alpha = spec.alpha_max
        self.target = spec.alpha_max  # smoothed target
        self.reward_ema: float | None = None
        self.calibration_ema: float | None = None
        self.history: list[float] = []  # last `window` reward EMAs
        self.confident = False
        self.improving = False
        self.slope = 0.0

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else self.spec.ema * old + (1.0 - self.spec.ema) * new

    def step(self, signals: Signals) -> float:
        s = self.spec
        self.reward_ema = self._ema(self.reward_ema, signals.reward)
        self.calibration_ema = self._ema(self.calibration_ema, signals.calibration)
        self.history = (self.history + [self.reward_ema])[-s.window:]
        self.slope = _slope(self.history) if len(self.history) >= s.window else 0.0
        self.improving = len(self.history) >= s.window and self.slope > s.min_improvement
        # hysteresis: once confident, stay so until the EMA falls below threshold - margin
        bar = s.confidence_threshold - (s.hysteresis if self.confident else 0.0)
        self.confident = self.calibration_ema >= bar
        raw = s.alpha_min if (self.improving and self.confident) else s.alpha_max
        self.target = s.smoothing * self.target + (1.0 - s.smoothing) * raw
        change = min(max(self.target - self.alpha, -s.max_rate), s.max_rate)
        self.alpha = min(max(self.alpha + change, s.alpha_min), s.alpha_max)
        return self.alpha

    def metrics(self) -> dict[str, float]:
        if self.reward_ema is None or self.calibration_ema is None:
            return {}  # not stepped yet
        return {
            "alpha/target": self.target,
            "alpha/reward_ema": self.reward_ema,
            "alpha/calibration_ema": self.calibration_ema,
            "alpha/reward_slope": self.slope,
            "alpha/improving": float(self.improving),
            "alpha/confident": float(self.confident),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "alpha": self.alpha, "target": self.target, "reward_ema": self.reward_ema,
            "calibration_ema": self.calibration_ema, "history": list(self.history),
            "confident": self.confident, "improving": self.improving, "slope": self.slope,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        _check_kind(self.kind, d)
        self.alpha, self.target = float(d["alpha"]), float(d["target"])
        self.reward_ema = None if d["reward_ema"] is None else float(d["reward_ema"])
        self.calibration_ema = None if d["calibration_ema"] is None else float(d["calibration_ema"])
        self.history = [float(v) for v in d["history"]]
        self.confident, self.improving = bool(d["confident"]), bool(d["improving"])
        self.slope = float(d["slope"])


AlphaScheduleFactory = Callable[["AlphaScheduleSpec", "int | None"], AlphaSchedule]

ALPHA_SCHEDULES: Registry[AlphaScheduleFactory] = Registry("alpha schedule", group="apo.alpha_schedules")
"""Alpha schedule factories ``(spec, max_steps) -> AlphaSchedule`` by ``AlphaScheduleSpec.kind``.

A third-party package adds one through the ``apo.alpha_schedules`` entry-point group
(``mykind = "my_pkg.schedules:make_my_schedule"``); the factory reads the fields of
``AlphaScheduleSpec`` it needs. The built-ins below are registered the same way, by name."""


def _reads(*fields: str) -> Callable[[AlphaScheduleFactory], AlphaScheduleFactory]:
    """Declare the ``AlphaScheduleSpec`` fields a factory reads (besides ``kind``): a recipe that sets
    another one to a non-default value is an error naming it ("no dead field"). A third-party factory
    may declare its own ``params`` the same way; without it nothing is checked."""

    def deco(factory: AlphaScheduleFactory) -> AlphaScheduleFactory:
        factory.params = frozenset(fields)  # type: ignore[attr-defined]
        return factory

    return deco


@ALPHA_SCHEDULES.register("constant")
@_reads("value", "alpha_max")
def _constant(spec: AlphaScheduleSpec, max_steps: int | None) -> AlphaSchedule:
    return ConstantAlpha(spec.alpha_max if spec.value is None else spec.value)


@_reads("alpha_max", "alpha_min", "steps")
def _annealed(spec: AlphaScheduleSpec, max_steps: int | None) -> AlphaSchedule:
    steps = spec.steps or max_steps
    if not steps:
        raise ValueError(f"alpha schedule {spec.kind!r} needs algorithm.alpha.steps when run.max_steps is not set")
    return AnnealedAlpha(spec.kind, spec.alpha_max, spec.alpha_min, steps)


ALPHA_SCHEDULES.add("linear", _annealed)
ALPHA_SCHEDULES.add("cosine", _annealed)


@ALPHA_SCHEDULES.register("reward_confidence")
@_reads("alpha_max", "alpha_min", "granularity")
def _reward_confidence(spec: AlphaScheduleSpec, max_steps: int | None) -> AlphaSchedule:
    return RewardConfidenceAlpha(spec.alpha_max, spec.alpha_min)


@ALPHA_SCHEDULES.register("guarded")
@_reads("alpha_max", "alpha_min", "ema", "window", "min_improvement", "confidence_threshold", "max_rate",
        "smoothing", "hysteresis")
def _guarded(spec: AlphaScheduleSpec, max_steps: int | None) -> AlphaSchedule:
    return GuardedAlpha(spec)


def make_alpha_schedule(spec: AlphaScheduleSpec, max_steps: int | None) -> AlphaSchedule:
    """The schedule named by ``spec.kind``; ``max_steps`` is the default length of linear/cosine."""
    try:
        factory = ALPHA_SCHEDULES.get(spec.kind)
    except UnknownName:
        raise ValueError(f"unknown alpha schedule kind {spec.kind!r}") from None
    return factory(spec, max_steps)


class LossBatchSchedule:
    """``algorithm.alpha.granularity: micro_batch``: alpha and tau recomputed at every loss call from
    that micro-batch's :func:`loss_batch_signals`, as the reference code does (its min/max run over
    the batch passed to the loss, and its confidence uses the current policy's log-probs). Keeps what
    was used for the step's metrics line."""

    def __init__(self, alpha: AlphaSchedule, tau: TauSchedule, step: int, vocab_size: int) -> None:
        self.alpha, self.tau, self.step, self.vocab_size = alpha, tau, step, vocab_size
        self.used: list[tuple[float, float, Signals]] = []  # (alpha, tau, signals) per loss call

    @torch.no_grad()
    def values(self, rewards: Tensor, advantages: Tensor, group_ids: Tensor, logp: Tensor, logp_old: Tensor,
               mask: Tensor) -> dict[str, float]:
        """``{"alpha", "tau"}`` for one micro-batch: token log-probs [N, T] now and at the rollout."""
        m = (mask != 0).to(torch.float64)  # [N, T]
        n_tok = m.sum(dim=-1).clamp(min=1)  # [N]
        now = (logp.detach().double() * m).sum(dim=-1) / n_tok  # [N] per-token mean log-prob
        old = (logp_old.detach().double() * m).sum(dim=-1) / n_tok  # [N]
        sig = loss_batch_signals(self.step, rewards, advantages, group_ids, now.cpu(), old.cpu(), self.vocab_size)
        alpha, tau = self.alpha.step(sig), self.tau.step(sig)
        self.used.append((alpha, tau, sig))
        return {"alpha": alpha, "tau": tau}

    def log_into(self, metrics: dict[str, float]) -> tuple[float, float]:
        """Add :meth:`metrics` but alpha and tau to ``metrics``; return the step's (alpha, tau)."""
        m = self.metrics()
        metrics.update({k: v for k, v in m.items() if k not in ("alpha", "tau")})
        return m.get("alpha", float("nan")), m.get("tau", float("nan"))

    def metrics(self) -> dict[str, float]:
        """The step's alpha and tau (means over the loss calls) and what they were computed from."""
        if not self.used:
            return {}
        k = len(self.used)
        mean = lambda xs: sum(xs) / k  # noqa: E731
        alphas = [a for a, _, _ in self.used]
        return {
            "alpha": mean(alphas), "tau": mean([t for _, t, _ in self.used]),
            "alpha/min": min(alphas), "alpha/max": max(alphas), "alpha/loss_batches": float(k),
            "loss_batch/reward_signal": mean([s.reward_signal for _, _, s in self.used]),
            "loss_batch/confidence": mean([s.confidence for _, _, s in self.used]),
            "loss_batch/entropy_proxy": mean([s.entropy_proxy for _, _, s in self.used]),
        }


# --------------------------------------------------------------------------------------------------
# Adaptive tau


class TauSchedule:
    """tau_eff = clip(tau * (1 + a*h + b*c*(-s)), tau_min, tau_max), s = 2r - 1; plain tau when disabled."""

    def __init__(self, tau: float, spec: AdaptiveTauSpec) -> None:
        self.base, self.spec = float(tau), spec
        self.tau = float(tau)

    def step(self, signals: Signals) -> float:
        s = self.spec
        if not s.enabled:
            self.tau = self.base
        else:
            sign = 2.0 * signals.reward_signal - 1.0
            mod = 1.0 + s.a * signals.entropy_proxy + s.b * signals.confidence * (-sign)
            self.tau = min(max(self.base * mod, s.tau_min), s.tau_max)
        return self.tau

    def metrics(self) -> dict[str, float]:
        return {"tau": self.tau}

    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.tau = float(d["tau"])
