"""Step 1 of the loop, the rollout: this step's prompts, sampled and scored, group by group.

:func:`collect` takes ``rollout.prompts_per_step`` prompts from the seeded data order, renders and
encodes them, has the backend sample G completions of each and the rewards score them
(apo_cli/sampling.py). The loop (apo_cli/train/loop.py) then computes the group advantages.

**Dynamic sampling** (DAPO; ``rollout.dynamic_sampling.enabled``). A group whose G rewards have
no spread (their std is 0, as ``frac_reward_zero_std`` counts it) gives every group objective a
zero advantage: nothing to learn. Such groups are dropped and another ``prompts_per_step`` prompts
are taken from the data order and sampled, round after round, until ``prompts_per_step``
informative groups are in hand or ``max_rounds`` rounds were sampled. The step trains on the first
``prompts_per_step`` informative groups in sampling order (the surplus of the last round is
dropped, as in DAPO). A step that ran out of rounds trains on what there is, cut down to a
multiple of ``algorithm.mini_batches`` × the number of torchrun processes (every mini-batch and
every process gets as many whole groups); with none left it makes no update. The metrics say so:
``sampling/dynamic_rounds``, ``sampling/filtered_groups`` (zero-spread groups dropped),
``sampling/trained_groups``, and ``sampling/reward``: the mean total reward of every completion the
step sampled, the policy's reward (``reward`` covers only the trained groups, which have spread, so
it reads near the middle of the reward range whatever the policy does; `apo compare` reads
``sampling/reward`` when it is there).

Round k of step s samples with the seed ``round_seed(seed, s, k)`` (round 0: the step's seed, as
without dynamic sampling) and every round's prompts come from the one data order, whose position
the checkpoint holds: a resumed run takes the same rounds as an uninterrupted one. Under torchrun
each rank samples its block of each round's prompts and the round is gathered
(:func:`apo_cli.sampling.sample_and_score`), so every rank filters the same groups and trains
whole groups of the same step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from apo_cli.rewards import merge_outputs
from apo_cli.sampling import Scored, encode_prompts, sample_and_score
from backends import SamplingParams


@dataclass
class Rollout:
    """One step's samples, flattened group by group: row k belongs to group k // G."""

    prompt_ids: list[list[int]]  # [N]
    completion_ids: list[list[int]]  # [N]
    completions: list[str]  # [N]
    prompts: list[str]  # [N]
    finish: list[str]  # [N]
    engine_logprobs: list[list[float]] | None
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N] (filled in by the loop)
    group_ids: torch.Tensor  # [N]


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919) % (2**63 - 1)


def round_seed(seed: int, step: int, k: int) -> int:
    """The sampling seed of dynamic-sampling round ``k`` of ``step`` (round 0: the step's seed)."""
    return (step_seed(seed, step) + k * 1_000_000_007) % (2**63 - 1)


def zero_spread(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] bool: the groups (consecutive rows) whose rewards are all equal, as ``frac_reward_zero_std`` counts them."""
    std = rewards.to(torch.float32).view(-1, group_size).std(dim=-1)
    return torch.isclose(std, torch.zeros_like(std))


@dataclass
class _Round:
    ids: list[list[int]]  # [B] encoded prompts
    texts: list[str]  # [B] rendered prompts
    scored: Scored  # [B * G] completions and rewards


def _sample_round(t: Any, k: int) -> _Round:
    """Round ``k`` of this step: the next ``prompts_per_step`` prompts of the data order, sampled and scored."""
    r, st = t.recipe, t.state
    examples = [t.examples[i] for i in st.order.take(r.rollout.prompts_per_step)]
    texts = [t.render(ex) for ex in examples]
    enc = encode_prompts(t.tok, texts, chat=t.chat, limit=t.prompt_limit)
    st.truncated_prompts += enc.truncated
    params = SamplingParams(
        n=t.G, max_new_tokens=r.rollout.max_new_tokens, temperature=r.rollout.temperature,
        top_p=r.rollout.top_p, top_k=r.rollout.top_k, stop=tuple(r.rollout.stop),
        seed=round_seed(r.run.seed, st.step, k),
    )
    scored = sample_and_score(t.backend, t.tok, t.rewards, enc.ids, texts, examples, params, t.world)
    return _Round(enc.ids, texts, scored)


def collect(t: Any) -> tuple[Rollout, torch.Tensor | None, dict[str, float]]:
    """This step's rollout (advantages not yet computed: zeros), its correctness flags and the
    rewards' metrics (with dynamic sampling: over every round's completions, and ``sampling/*``).

    ``t`` is the :class:`apo_cli.train.loop.Trainer`."""
    r, G = t.recipe, t.G
    ds, want = r.rollout.dynamic_sampling, r.rollout.prompts_per_step
    rounds: list[_Round] = []
    kept: list[tuple[int, int]] = []  # (round, group) of the informative groups, in sampling order
    filtered = 0
    for k in range(ds.max_rounds if ds.enabled else 1):
        rounds.append(_sample_round(t, k))
        rewards = torch.tensor(rounds[-1].scored.rewards.total, dtype=torch.float32)
        flat = zero_spread(rewards, G).tolist() if ds.enabled else [False] * want
        kept += [(k, g) for g in range(want) if not flat[g]]
        filtered += sum(flat)
        if len(kept) >= want:
            break
    unit = r.algorithm.mini_batches * t.world.size  # every mini-batch, on every rank, as many whole groups
    kept = kept[:want] if len(kept) >= want else kept[: len(kept) // unit * unit]
    ro, correct = _select(rounds, kept, G)
    metrics = dict(merge_outputs([x.scored.rewards for x in rounds]).metrics)
    if ds.enabled:
        sampled = [v for x in rounds for v in x.scored.rewards.total]  # every completion of every round
        metrics.update({"sampling/dynamic_rounds": float(len(rounds)), "sampling/filtered_groups": float(filtered),
                        "sampling/trained_groups": float(len(kept)),
                        "sampling/reward": sum(sampled) / len(sampled)})
    return ro, correct, metrics


def _select(rounds: list[_Round], kept: list[tuple[int, int]], G: int) -> tuple[Rollout, torch.Tensor | None]:
    """The rollout of the ``kept`` groups, renumbered 0..B-1 in that order."""
    rows = [(k, g * G + j) for k, g in kept for j in range(G)]
    comps = [rounds[k].scored.completions[i] for k, i in rows]
    engine_lp = None if any(c.logprobs is None for c in comps) else [c.logprobs for c in comps]
    total = [rounds[k].scored.rewards.total[i] for k, i in rows]
    ro = Rollout(
        prompt_ids=[rounds[k].ids[i // G] for k, i in rows], completion_ids=[c.ids for c in comps],
        completions=[rounds[k].scored.texts[i] for k, i in rows], prompts=[rounds[k].texts[i // G] for k, i in rows],
        finish=[c.finish_reason for c in comps], engine_logprobs=engine_lp,
        rewards=torch.tensor(total, dtype=torch.float32), advantages=torch.zeros(len(rows)),
        group_ids=torch.arange(len(kept)).repeat_interleave(G),
    )
    if any(x.scored.rewards.correct is None for x in rounds):
        return ro, None
    return ro, torch.tensor([rounds[k].scored.rewards.correct[i] for k, i in rows], dtype=torch.bool)


def no_update_record(t: Any, metrics: dict[str, float], rollout_s: float) -> tuple[dict[str, Any], list]:
    """The metrics line of a step whose rounds found no informative group: no update, no samples."""
    st = t.state
    record = {"step": st.step, "epoch": st.order.progress, **metrics, "prompts/truncated": st.truncated_prompts,
              "learning_rate": st.lr_scheduler.get_last_lr()[0], "skipped_steps": st.skipped_total,
              "time/rollout": rollout_s, "step_time": rollout_s}
    return record, []
