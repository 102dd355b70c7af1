"""The completions' pass without padding (apo_cli/batching.py ``_RealRows``) gives the bits of the
padded pass: log-probs, entropies and every gradient, with and without LoRA, under no_grad too."""

from __future__ import annotations

import pytest
import torch

from apo_cli import batching


def _policy(lora: bool):
    from apo_cli.models import ensure_tiny, load_model, load_tokenizer
    from backends.attention import use_grouped_attention

    path = str(ensure_tiny())
    model, tok = load_model(path, dtype="float32"), load_tokenizer(path)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM"))
        for name, p in model.named_parameters():  # B = 0 at first: make the adapters' path count
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
    model.train()
    use_grouped_attention(model)
    return model, tok


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    prompts, completions = [], []
    for length in (5, 9):  # two groups of four, prompts of two lengths (left padding too)
        p = torch.randint(3, vocab, (length,), generator=g).tolist()
        for n in (1, 3, 8, 6):  # completions of several lengths: padding in the completions' pass
            prompts.append(p)
            completions.append(torch.randint(3, vocab, (n,), generator=g).tolist())
    return batching.pack(prompts, completions, 0)


def _run(model, packed, padding_free: bool, monkeypatch):
    monkeypatch.setattr(batching, "PADDING_FREE", padding_free)
    model.zero_grad(set_to_none=True)
    logp, ent = batching.completion_logprobs(model, packed, with_entropy=True)
    (-(logp.sum() + 0.1 * logp.exp().sum())).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        anchor, _ = batching.completion_logprobs(model, packed)
    return logp.detach(), ent, grads, anchor


@pytest.mark.parametrize("lora", [False, True])
def test_the_padding_free_pass_gives_the_bits_of_the_padded_one(lora, monkeypatch):
    model, _ = _policy(lora)
    packed = _batch(model.config.vocab_size)
    assert packed.shares_prompts and float(packed.mask.mean()) < 0.8
    free = _run(model, packed, True, monkeypatch)
    padded = _run(model, packed, False, monkeypatch)
    assert torch.equal(free[0], padded[0]) and torch.equal(free[1], padded[1])
    assert torch.equal(torch.signbit(free[0]), torch.signbit(padded[0]))  # padding's -0.0 as x * 0 gives
    assert free[2].keys() == padded[2].keys() and len(free[2]) > 0
    assert [n for n in free[2] if not torch.equal(free[2][n], padded[2][n])] == []
    assert torch.equal(free[3], free[0]) and torch.equal(padded[3], padded[0])  # anchors: the trained forward's
    assert torch.count_nonzero(free[0] * (1 - packed.mask)) == 0


def test_the_padding_free_pass_runs_the_head_on_real_tokens_only(monkeypatch):
    model, _ = _policy(False)
    packed = _batch(model.config.vocab_size)
    rows = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, a, out: rows.append(tuple(out.shape)))
    try:
        batching.completion_logprobs(model, packed)
    finally:
        hook.remove()
    real_inputs = int(packed.mask[:, :-1].sum())
    assert rows[-1] == (real_inputs, model.config.vocab_size)  # the completions' pass: [R, V], no padding
