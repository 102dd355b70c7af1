"""The tied embedding's row-sparse backward (apo_cli/train/embedding.py): the same gradient bit for
bit as PyTorch's dense one, a dense ``.grad``, and only where it applies."""

from __future__ import annotations

import copy

import pytest
import torch

from apo_cli.batching import completion_logprobs, pack
from apo_cli.models import tiny_config
from apo_cli.train.embedding import row_gradient_embedding


def _model(**overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(40, **overrides))
    model.train()
    return model


def _grads(model, steps: int = 2) -> dict[str, torch.Tensor]:
    """Two micro-batches of whole groups (shared prompts: two forward passes each, repeated and padded
    tokens), accumulated into ``.grad`` as the loop does."""
    model.zero_grad(set_to_none=True)
    prompts = [[1, 5, 5, 7, 0, 9]] * 3 + [[1, 8, 9, 9]] * 3  # 0 is the padding id, also inside a prompt
    completions = [[5, 6, 2], [6, 6, 6, 2], [7], [5, 0, 5], [9, 9], [3, 4, 5, 6, 2]]
    for k in range(steps):
        packed = pack(prompts, [c[::-1] if k else c for c in completions], pad_id=0)
        logp, _ = completion_logprobs(model, packed)
        (-(logp * torch.linspace(0.5, 1.5, logp.shape[0])[:, None]).sum() / packed.mask.sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_gradient_is_the_dense_one_bit_for_bit_and_grad_stays_dense():
    dense = _model()
    rows = copy.deepcopy(dense)
    assert row_gradient_embedding(rows, torch.device("cpu"))
    want, got = _grads(dense), _grads(rows)
    assert want.keys() == got.keys()
    for name in want:
        assert got[name].layout == torch.strided, name
        assert torch.equal(got[name], want[name]), name
    emb = got["model.embed_tokens.weight"]
    assert emb[0].abs().sum() > 0  # the padding row's gradient comes from the head (the tied weight), as dense
    # a step with it equals a step without it (fused AdamW, as the trainer builds it)
    for m in (dense, rows):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
        _grads(m)
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), rows.state_dict().values()))


def test_no_gradient_and_no_grad_mode_take_the_plain_forward():
    model = _model()
    assert row_gradient_embedding(model, torch.device("cpu"))
    ids = torch.tensor([[1, 5, 0, 7]])
    with torch.no_grad():
        out = model.get_input_embeddings()(ids)
    assert out.grad_fn is None and torch.equal(out, model.get_input_embeddings().weight[ids])


@pytest.mark.parametrize("why", ["untied", "frozen", "cuda", "max_norm"])
def test_left_dense_where_it_does_not_apply(why):
    model = _model(tie_word_embeddings=why != "untied")
    emb = model.get_input_embeddings()
    device = torch.device("cpu")
    if why == "frozen":  # LoRA: the base weights do not train
        emb.weight.requires_grad_(False)
    elif why == "cuda":
        device = torch.device("cuda")
    elif why == "max_norm":
        emb.max_norm = 1.0
    forward = emb.forward
    assert not row_gradient_embedding(model, device)
    assert emb.forward == forward
