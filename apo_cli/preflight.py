"""Preflight: cheap checks of a recipe's data, rewards and prompt lengths before any model is loaded.

``apo validate --preflight`` runs these; each problem is a :class:`Finding`:

- the training (and evaluation) data load, with counts;
- the batch arithmetic: steps per pass over the data, whole groups per mini- and micro-batch;
- every reward runs on a few rows twice — with the reference answer written as a completion and
  with a wrong answer: does the reference parse, is the reference judged correct and the wrong
  answer not, does the reward give every completion the same value (no signal)?
- prompt lengths (tokens with a tokenizer, else estimated at 4 characters per token, and said so)
  against ``rollout.max_prompt_tokens`` (left truncation) and the model's context.

It never loads a model. Levels: ``info`` (figures worth seeing), ``warning`` (probably a mistake),
``error`` (the run would fail or learn nothing): :func:`print_findings` raises on errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from apo_cli.errors import ApoError, DataError

if TYPE_CHECKING:
    from apo_cli.data import Example
    from apo_cli.recipe import Recipe

CHARS_PER_TOKEN = 4
REWARD_ROWS = 8
LENGTH_ROWS = 2000


@dataclass(frozen=True)
class Finding:
    level: Literal["info", "warning", "error"]
    message: str


def run_preflight(recipe: Recipe, tokenizer: Any = None) -> list[Finding]:
    """Every finding for ``recipe``; ``tokenizer`` (optional) gives exact prompt lengths."""
    findings: list[Finding] = []
    train = _check_data(recipe, findings)
    if train is None:
        return findings
    _check_batches(recipe, len(train), findings)
    _check_rewards(recipe, train[:REWARD_ROWS], findings)
    _check_prompts(recipe, train, tokenizer, findings)
    return findings


def print_findings(findings: list[Finding]) -> None:
    """Print findings (info dim, warnings yellow, errors red) to stderr; DataError if any is an error."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    style = {"info": "dim", "warning": "yellow", "error": "bold red"}
    for f in findings:
        # errors are listed with a mark; the single "error:" line is the DataError raised below
        label = "✗" if f.level == "error" else f"{f.level}:"
        console.print(f"[{style[f.level]}]{label}[/{style[f.level]}] {escape(f.message)}")
    errors = [f for f in findings if f.level == "error"]
    if not any(f.level != "info" for f in findings):
        console.print("[green]preflight: no problems found[/green]")
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise DataError(f"preflight found {len(errors)} error{'s' if len(errors) > 1 else ''}: {errors[0].message}{more}")


# --------------------------------------------------------------------------------------------------


def _check_data(recipe: Recipe, findings: list[Finding]) -> list[Example] | None:
    from apo_cli.data import load_examples

    spec = recipe.data
    try:
        train = load_examples(spec, recipe.run.seed, "train")
    except ApoError as e:
        findings.append(Finding("error", f"data: {e}"))
        return None
    if not train:
        findings.append(Finding("error", f"data: {spec.source} gives no training rows"))
        return None
    msg = f"data: {len(train)} training rows from {spec.source}"
    if spec.eval_split is not None or spec.eval_fraction > 0:
        try:
            evals = load_examples(spec, recipe.run.seed, "eval")
        except ApoError as e:
            findings.append(Finding("error", f"data (evaluation): {e}"))
        else:
            msg += f", {len(evals)} evaluation rows"
            if not evals:
                findings.append(Finding("warning", "data: the evaluation split is empty"))
    if spec.eval_split is not None and spec.eval_fraction > 0:
        findings.append(Finding("warning", "data.eval_fraction is ignored because data.eval_split is set"))
    findings.append(Finding("info", msg))
    return train


def _check_batches(recipe: Recipe, n_rows: int, findings: list[Finding]) -> None:
    p, g = recipe.rollout.prompts_per_step, recipe.rollout.group_size
    mb, micro = recipe.algorithm.mini_batches, recipe.optim.micro_batch_size
    if p % mb:
        findings.append(Finding("error", f"batches: {p} prompts per step do not split into {mb} mini-batches of whole groups"))
    elif micro % g:
        findings.append(Finding("error", f"batches: optim.micro_batch_size={micro} does not hold whole groups of {g}"))
    elif (p // mb * g) % micro:
        findings.append(Finding("error", f"batches: {p // mb} prompts × {g} = {p // mb * g} sequences per mini-batch "
                                         f"are not divisible by optim.micro_batch_size={micro}"))
    if n_rows < p:
        findings.append(Finding("warning", f"batches: only {n_rows} training rows for {p} prompts per step: "
                                           "problems repeat within a step"))
    msg = f"batches: {p} prompts × {g} completions = {p * g} sequences per step in {mb} mini-batch(es)"
    if recipe.run.max_steps is not None:
        msg += f"; {recipe.run.max_steps} steps ≈ {recipe.run.max_steps * p / n_rows:.2f} passes over {n_rows} rows"
    if n_rows % p:
        msg += f" ({n_rows // p} full steps per pass + {n_rows % p} rows)"
    findings.append(Finding("info", msg))


def _answer_completions(example: Example) -> tuple[str, str]:
    """(a completion stating the reference answer, one stating a wrong answer)."""
    from apo_cli.rewards.extract import extract_gold, parse_number

    gold = (extract_gold(example.answer) if example.answer is not None else None) or ""
    number = parse_number(gold) if gold else None
    wrong = str(number + 1) if number is not None and number.denominator == 1 else (
        f"{float(number) + 1:g}" if number is not None else ("-98765" if gold != "-98765" else "-12345"))

    def say(answer: str) -> str:
        """A short completion that states ``answer`` in every format the built-ins look for."""
        return f"<think>Let me work through the problem.</think>\n<answer>The final answer is \\boxed{{{answer}}}.</answer>"

    return say(gold), say(wrong)


def _check_rewards(recipe: Recipe, rows: list[Example], findings: list[Finding]) -> None:
    from apo_cli.rewards import RewardSet

    from apo_cli.trust import TrustError

    try:
        rewards = RewardSet(list(recipe.rewards))
    except TrustError:
        raise  # not a finding about the recipe: the user has not allowed its code to run
    except ApoError as e:
        findings.append(Finding("error", f"rewards: {e}"))
        return
    k = len(rows)
    pairs = [_answer_completions(x) for x in rows]
    completions = [a for a, _ in pairs] + [b for _, b in pairs]
    ids = [list(range(math.ceil(len(c) / CHARS_PER_TOKEN))) for c in completions]
    try:
        out = rewards([x.prompt for x in rows] * 2, completions, ids, rows + rows)
    except ApoError as e:
        findings.append(Finding("error", f"rewards: {e}"))
        return
    for name in rewards.names:
        _reward_findings(name, name in rewards.verifying, out.per_reward[name], out.metrics, rows, findings)
    if out.correct is not None:
        missed = [rows[i].index for i in range(k) if not out.correct[i]]
        accepted = [rows[i].index for i in range(k) if out.correct[k + i]]
        if missed:
            findings.append(Finding("warning", f"rewards: the reference answer, written as a boxed completion, is not "
                                               f"judged correct for {len(missed)}/{k} sampled rows (rows {_few(missed)})"))
        if accepted:
            findings.append(Finding("warning", f"rewards: a wrong answer is judged correct for rows {_few(accepted)}"))


def _reward_findings(name: str, verifies: bool, values: list[float | None], metrics: dict[str, float],
                     rows: list[Example], findings: list[Finding]) -> None:
    k = len(rows)
    for key in ("errors", "timeouts"):
        if metrics.get(f"rewards/{name}/{key}"):
            findings.append(Finding("warning", f"reward {name}: {metrics[f'rewards/{name}/{key}']:g} {key} on "
                                               f"{2 * k} test completions (the first is printed above)"))
    bad_gold = metrics.get(f"rewards/{name}/gold_parse_failures", 0) + metrics.get(f"rewards/{name}/gold_missing", 0)
    if bad_gold:
        unparsed = [x for i, x in enumerate(rows) if values[i] is None and values[k + i] is None]
        example = f" (e.g. row {unparsed[0].index}: {str(unparsed[0].answer)[:80]!r})" if unparsed else ""
        findings.append(Finding("warning", f"reward {name}: the reference answer of {len(unparsed)}/{k} sampled rows "
                                           f"is missing or does not parse{example}; those samples get no reward"))
    seen = {v for v in values if v is not None}
    if len(seen) == 1 and k:
        level = "warning" if verifies else "info"
        why = "" if verifies else " (expected for a shaping reward on these short synthetic completions)"
        findings.append(Finding(level, f"reward {name} gives the reference and the wrong completions the same value "
                                       f"{seen.pop():g}{why}"))


def _few(indices: list[int]) -> str:
    return ", ".join(map(str, indices[:5])) + (", ..." if len(indices) > 5 else "")


def _check_prompts(recipe: Recipe, train: list[Example], tokenizer: Any, findings: list[Finding]) -> None:
    from apo_cli.data import render_prompt, uses_chat_template

    spec = recipe.data
    rows = train if len(train) <= LENGTH_ROWS else train[:: math.ceil(len(train) / LENGTH_ROWS)]
    try:
        chat = tokenizer is not None and uses_chat_template(spec, tokenizer)
        # without a tokenizer there is no chat template to apply: measure the plain text
        plain = spec if tokenizer is not None else spec.model_copy(update={"chat_template": "off"})
        texts = [render_prompt(x, plain, tokenizer) for x in rows]
    except ApoError as e:
        findings.append(Finding("error", f"prompts: {e}"))
        return
    if tokenizer is not None:
        lengths = [len(tokenizer(t, add_special_tokens=not chat)["input_ids"]) for t in texts]
        unit = "tokens"
    else:
        lengths = [math.ceil(len(t) / CHARS_PER_TOKEN) for t in texts]
        unit = "tokens (estimated)"
        template = " and without the chat template" if spec.chat_template != "off" else ""
        findings.append(Finding("info", f"prompts: no tokenizer given, so lengths are estimated at {CHARS_PER_TOKEN} "
                                        f"characters per token{template}"))
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    findings.append(Finding("info", f"prompts: {len(lengths)} prompts, {unit}: min {ordered[0]}, median "
                                    f"{ordered[len(ordered) // 2]}, p95 {p95}, max {ordered[-1]}"))
    _check_truncation(recipe, lengths, tokenizer, findings)


def _check_truncation(recipe: Recipe, lengths: list[int], tokenizer: Any, findings: list[Finding]) -> None:
    """Left truncation by rollout.max_prompt_tokens, and prompt + completion against the context."""
    exact = tokenizer is not None
    rollout = recipe.rollout
    note = "" if exact else " (estimated)"
    longest = max(lengths)
    if rollout.max_prompt_tokens is not None:
        over = sum(n > rollout.max_prompt_tokens for n in lengths)
        if over:
            level = "error" if exact and over > len(lengths) / 2 else "warning"
            findings.append(Finding(level, f"prompts: {over}/{len(lengths)} ({over / len(lengths):.0%}) are longer than "
                                           f"rollout.max_prompt_tokens={rollout.max_prompt_tokens}{note} and will lose "
                                           "their beginning (left truncation)"))
        longest = min(longest, rollout.max_prompt_tokens)
    context = recipe.model.max_context
    tok_max = getattr(tokenizer, "model_max_length", None)
    if context is None and isinstance(tok_max, int) and tok_max < 10**7:
        context = tok_max
    limits = [("the tokenizer's model_max_length" if recipe.model.max_context is None else "model.max_context", context)]
    if getattr(recipe.backend, "kind", None) == "gpu":
        limits.append(("backend.max_model_len", recipe.backend.max_model_len))
    for name, ctx in limits:
        if ctx is not None and longest + rollout.max_new_tokens > ctx:
            findings.append(Finding("error" if exact else "warning",
                                    f"prompts: longest prompt {longest}{note} + rollout.max_new_tokens "
                                    f"{rollout.max_new_tokens} exceeds {name}={ctx}"))
