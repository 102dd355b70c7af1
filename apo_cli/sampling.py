"""Prompt texts in, sampled and scored groups out: the one path `apo train`, `apo eval` and
`apo generate` share.

1. :func:`encode_prompts`: token ids of the rendered prompts (no extra BOS when a chat template put
   one in), each cut to its last :func:`prompt_limit` tokens, the cuts counted;
2. :func:`sample_groups`: the backend samples G completions per prompt; each is decoded;
3. :func:`sample_and_score`: 2, then the recipe's rewards score every completion.

Under torchrun :func:`sample_and_score` samples and scores this rank's block of the prompts and
gathers the others', so every rank returns the whole step; in one process it is a plain call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from apo_cli.runtime.world import World


def prompt_limit(context: int, max_new_tokens: int, max_prompt_tokens: int | None = None) -> int:
    """How many prompt tokens fit: ``max_prompt_tokens``, or what the context leaves for the completion."""
    return max_prompt_tokens or max(1, context - max_new_tokens)


@dataclass
class Encoded:
    ids: list[list[int]]
    truncated: int  # how many prompts were cut to the limit (their last ``limit`` tokens kept)
    limit: int


def encode_prompts(tok: Any, texts: list[str], *, chat: bool, limit: int) -> Encoded:
    """Token ids of ``texts``; a chat template carries its own BOS, a plain prompt gets the tokenizer's."""
    ids, cut = [], 0
    for text in texts:
        row = tok(text, add_special_tokens=not chat).input_ids
        if len(row) > limit:
            row = row[-limit:]
            cut += 1
        ids.append(row)
    return Encoded(ids, cut, limit)


@dataclass
class Sampled:
    """Completions of a list of prompts, flattened prompt by prompt: row k is prompt k // G's."""

    completions: list[Any]  # backends.Completion: ids, finish_reason, engine logprobs
    texts: list[str]  # decoded, special tokens skipped


def sample_groups(backend: Any, tok: Any, prompt_ids: list[list[int]], params: Any, streamer: Any = None) -> Sampled:
    """``streamer`` (one prompt, ``params.n == 1``): fed each token as it is sampled, where the backend can."""
    groups = backend.generate(prompt_ids, params, streamer=streamer) if streamer is not None else \
        backend.generate(prompt_ids, params)
    flat = [c for g in groups for c in g]
    return Sampled(flat, [tok.decode(c.ids, skip_special_tokens=True) for c in flat])


@dataclass
class Scored(Sampled):
    rewards: Any = None  # apo_cli.rewards.RewardOutput of every row


def sample_and_score(backend: Any, tok: Any, rewards: Any, prompt_ids: list[list[int]], prompts: list[str],
                     examples: list[Any], params: Any, world: World | None = None) -> Scored:
    """Sample ``params.n`` completions of each prompt and score them (``prompts`` are the texts,
    ``examples`` the dataset rows the rewards read). Under torchrun: this rank's block, gathered."""
    world = world or World()
    n = params.n
    rep = lambda xs: [x for x in xs for _ in range(n)]  # noqa: E731
    mine = world.shard(len(prompt_ids))
    if params.seed is not None:  # each rank draws its own samples
        params = dataclasses.replace(params, seed=params.seed + world.rank)
    # generation may run collectives (a tensor-parallel engine, gathering a sharded policy): a
    # failure there stops its rank at once. Rewards run none: a failure is shared with every rank
    s = sample_groups(backend, tok, [prompt_ids[i] for i in mine], params)
    with world.agree():
        out = rewards(rep([prompts[i] for i in mine]), s.texts, [c.ids for c in s.completions],
                      rep([examples[i] for i in mine]), check=not world.distributed)
    if not world.distributed:
        return Scored(s.completions, s.texts, out)
    from apo_cli.rewards import merge_outputs

    parts = world.gather((s.completions, s.texts, out))
    merged = Scored([c for p in parts for c in p[0]], [t for p in parts for t in p[1]],
                    merge_outputs([p[2] for p in parts]))
    with world.agree():  # the same verdict on every rank: a reward broken for the whole step
        rewards.check(merged.rewards)
    return merged
