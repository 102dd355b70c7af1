"""Log-probs of the completions under the policy (with gradient), the anchor and the KL reference.

- :meth:`Policy.logprobs`: per-token log-probs of completions given their prompts, on the backend's
  device in its compute dtype (apo_cli/batching.py packs whole groups and runs each prompt once).
- :meth:`Policy.ref_logprobs`: the same under the KL reference: a frozen copy of the initial model,
  or, for a LoRA policy, the policy with its adapter disabled.
- :func:`disable_dropout` (``algorithm.disable_dropout``, on by default): the policy stays in train mode
  (gradient checkpointing needs it), so without it every pass draws its own dropout mask and the
  anchor would differ from the policy's own log-probs at the very same weights.
- :class:`Anchors`: each row's log-probs at the rollout weights, the anchor of APO's ``u`` and the
  old policy of GRPO's ratio. A row trained first, at exactly the rollout weights, is anchored by
  its own forward (detached, no extra pass); the others get a no-grad pass before the first update.
  Under torchrun each rank computes an equal block of the rows and the ranks exchange them (FSDP
  needs every rank to run the same forwards); in one process the exchange is a no-op.
"""

from __future__ import annotations

from typing import Any

import torch

from apo_cli.batching import completion_logprobs, pack
from apo_cli.runtime.world import World


# float attributes that modules apply as functional dropout (attention probabilities, LoRA, ...)
_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "dropout", "hidden_dropout", "activation_dropout")


def disable_dropout(model: Any) -> int:
    """Set every dropout probability of ``model`` to 0: each ``nn.Dropout`` (LoRA's ``lora_dropout``
    included; what TRL's ``disable_dropout_in_model`` does), the float dropout rates modules apply
    functionally (HF attention's ``attention_dropout``) and those of the config. Returns how many were > 0."""
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            n += module.p > 0
            module.p = 0.0
        for name in _DROPOUT_ATTRS:
            value = getattr(module, name, None)
            if isinstance(value, float) and not isinstance(value, bool):
                n += value > 0
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for name in (*_DROPOUT_ATTRS, "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob",
                 "attention_probs_dropout_prob"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    return int(n)


class Policy:
    """The model being trained, where the backend placed it, and its KL reference."""

    def __init__(self, model: Any, tok: Any, backend: Any, ref_model: Any = None):
        self.model, self.tok, self.backend, self.ref_model = model, tok, backend, ref_model
        self.device = backend.device

    def forward(self, model: Any, prompts: list[list[int]], completions: list[list[int]], *, grad: bool,
                entropy: bool = False, entropy_grad: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(logp [n, T], entropy [n, T] or None, mask [n, T])`` of ``completions`` after ``prompts``."""
        packed = pack(prompts, completions, self.tok.pad_token_id).to(self.device)
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            logp, ent = completion_logprobs(model, packed, autocast=self.backend.autocast(), with_entropy=entropy,
                                            entropy_grad=entropy_grad and grad)
        return logp, ent, packed.mask

    def logprobs(self, prompts: list[list[int]], completions: list[list[int]], *, entropy_grad: bool = False):
        """The policy's log-probs with gradient, and the per-token entropy (with gradient when
        ``entropy_grad``: ``algorithm.entropy_coef > 0``)."""
        return self.forward(self.model, prompts, completions, grad=True, entropy=True, entropy_grad=entropy_grad)

    def ref_logprobs(self, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
        if self.ref_model is not None:
            return self.forward(self.ref_model, prompts, completions, grad=False)[0]
        with self.model.disable_adapter():  # LoRA: the reference is the base model
            return self.forward(self.model, prompts, completions, grad=False)[0]


class Anchors:
    """Row index -> log-probs at the rollout weights, for one step (see the module docstring)."""

    def __init__(self, policy: Policy, world: World, prompts: list[list[int]], completions: list[list[int]],
                 micro_batch_size: int):
        self.policy, self.world = policy, world
        self.prompts, self.completions = prompts, completions
        self.micro_batch_size = micro_batch_size
        self.rows: dict[int, torch.Tensor] = {}
        self.own: set[int] = set()  # the rows this rank anchored (each row's mismatch is counted once)

    def __contains__(self, i: int) -> bool:
        return i in self.rows

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]

    def compute(self, rows: list[int]) -> None:
        """No-grad log-probs for ``rows`` (the same list on every rank), before any update of the step."""
        local: dict[int, torch.Tensor] = {}
        mine = self.world.part(rows)
        mbs = self.micro_batch_size
        for s in range(0, len(mine), mbs):
            chunk = mine[s : s + mbs]
            logp, _, _ = self.policy.forward(self.policy.model, [self.prompts[i] for i in chunk],
                                             [self.completions[i] for i in chunk], grad=False)
            for k, i in enumerate(chunk):
                local[i] = logp[k, : len(self.completions[i])].detach()
        self.own.update(local)
        self.rows.update(self.world.exchange(local, self.policy.device))

    def take(self, i: int, logp_row: torch.Tensor) -> None:
        """Row ``i`` trained for the first time at the rollout weights: its own forward is its anchor."""
        if i not in self.rows:
            self.rows[i] = logp_row[: len(self.completions[i])].detach().clone()
            self.own.add(i)

    def share(self, rows: list[int]) -> None:
        """After the first mini-batch: the anchors its rows took from their own forward, on the rank
        that trained each, for the later epochs that hand those rows to other ranks."""
        have = {i: self.rows[i] for i in rows if i in self.rows}
        for i, t in self.world.exchange(have, self.policy.device).items():
            self.rows.setdefault(i, t)

    def mean_logprobs(self, n: int) -> torch.Tensor:
        """Mean log-prob of each of the ``n`` rows (a signal of the rollout policy's confidence)."""
        return torch.tensor([float(self.rows[i].mean()) if self.rows[i].numel() else 0.0 for i in range(n)])

    def mine(self) -> dict[int, torch.Tensor]:
        return {i: t for i, t in self.rows.items() if i in self.own}
