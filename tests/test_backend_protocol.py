"""The ``Backend`` Protocol: every member the callers use is declared, the built-in backends implement
each one explicitly, ``BackendBase`` gives the optional ones defaults, both backends share one
decoding sampler (``backends.decoding``), and streaming goes through ``generate(..., streamer=)``."""

from __future__ import annotations

import contextlib
import inspect
import subprocess
import sys
import textwrap

import pytest
import torch

from apo_cli.recipe import CPUBackendSpec, GPUBackendSpec
from backends import Backend, Completion, SamplingParams

EXPECTED = {"name", "device", "supports_torchrun", "join", "setup", "autocast", "generate", "sync_weights", "close"}


def protocol_members(proto: type) -> tuple[set[str], set[str]]:
    """(data members, methods) of a Protocol: ``typing.get_protocol_members`` for Python 3.11."""
    data = set(proto.__dict__.get("__annotations__", {}))
    methods = {k for k, v in proto.__dict__.items() if inspect.isfunction(v) and not k.startswith("_")}
    return data, methods


def tiny_policy(dtype: str = "float32"):
    from apo_cli.models import ensure_tiny, load_model, load_tokenizer

    path = str(ensure_tiny())
    return load_model(path, dtype=dtype), load_tokenizer(path)


def cpu_backend():
    from backends.cpu import CPUBackend

    return CPUBackend(CPUBackendSpec(threads=torch.get_num_threads()))


def hf_backend():
    from backends.gpu import GPUBackend

    return GPUBackend(GPUBackendSpec(rollout="hf"), _device="cpu")


class Recorder:
    """A transformers-style streamer that keeps what it was fed."""

    def __init__(self):
        self.put_calls: list[list[int]] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.put_calls.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended += 1


# -- the Protocol ---------------------------------------------------------------------------------


def test_the_protocol_declares_what_the_callers_use():
    data, methods = protocol_members(Backend)
    assert data | methods == EXPECTED
    assert data == {"name", "device", "supports_torchrun"}
    assert "release_memory" not in dir(Backend)  # declared and never called: removed
    for m in methods:
        assert (inspect.getdoc(getattr(Backend, m)) or "").strip(), f"Backend.{m} is not documented"
    streamer = inspect.signature(Backend.generate).parameters["streamer"]
    assert streamer.kind is inspect.Parameter.KEYWORD_ONLY and streamer.default is None


@pytest.mark.parametrize("cls_name", ["backends.cpu:CPUBackend", "backends.gpu:GPUBackend"])
def test_builtin_backends_implement_every_member_explicitly(cls_name):
    import importlib

    module, _, name = cls_name.partition(":")
    cls = getattr(importlib.import_module(module), name)
    data, methods = protocol_members(Backend)
    for m in data:  # a class attribute, or declared on the class and set by __init__
        assert m in vars(cls) or m in vars(cls).get("__annotations__", {}), f"{name}.{m}"
    for m in methods:
        assert inspect.isfunction(vars(cls).get(m)), f"{name}.{m} is not implemented by {name} itself"
        assert list(inspect.signature(getattr(cls, m)).parameters) == \
               list(inspect.signature(getattr(Backend, m)).parameters), f"{name}.{m}: signature"
    streamer = inspect.signature(cls.generate).parameters["streamer"]
    assert streamer.kind is inspect.Parameter.KEYWORD_ONLY and streamer.default is None
    assert not hasattr(cls, "release_memory")


def test_builtin_backend_instances_are_backends():
    for backend in (cpu_backend(), hf_backend()):
        assert isinstance(backend, Backend)
        assert isinstance(backend.device, torch.device) and backend.supports_torchrun is True


def test_backend_base_gives_the_optional_members_defaults():
    from backends.base import BackendBase

    class Echo(BackendBase):
        name = "echo"

        def setup(self, model, tokenizer):
            return model

        def generate(self, prompts, params, *, streamer=None):
            return [[Completion(ids=list(p), finish_reason="length") for _ in range(params.n)] for p in prompts]

    b = Echo(spec=None)
    assert isinstance(b, Backend)
    assert b.device == torch.device("cpu") and b.supports_torchrun is False
    assert b.join() is None and b.sync_weights() == 0.0 and b.close() is None
    with b.autocast():
        assert not torch.is_autocast_enabled("cpu")
    b.device = torch.device("meta")  # a subclass sets its own device as a plain attribute
    assert b.device == torch.device("meta") and Echo(None).device == torch.device("cpu")

    class Incomplete(BackendBase):
        name = "incomplete"

        def setup(self, model, tokenizer):
            return model

    with pytest.raises(TypeError, match="generate"):
        Incomplete(None)


def test_the_registry_and_the_base_class_import_no_torch_and_gpu_does_not_build_a_cpu_backend():
    code = """
        import sys
        import backends, backends.base
        assert "torch" not in sys.modules, "backends or backends.base imported torch"
        import backends.gpu
        assert "backends.cpu" not in sys.modules, "the GPU backend depends on the CPU backend"
        print("ok")
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# -- the shared sampler ---------------------------------------------------------------------------


def test_both_backends_hold_a_decoding_sampler_on_their_device_and_autocast():
    from backends.decoding import DecodingSampler

    for backend in (cpu_backend(), hf_backend()):
        model, tok = tiny_policy()
        model = backend.setup(model, tok)
        sampler = backend._sampler
        assert type(sampler) is DecodingSampler
        assert sampler.model is model and sampler.tokenizer is tok and sampler.device == backend.device
        assert sampler.autocast == backend.autocast  # the backend's compute dtype, not another's
        backend.close()
        assert backend._sampler is None


def test_the_sampler_alone_gives_the_backends_completions():
    from backends.decoding import DecodingSampler

    model, tok = tiny_policy("bfloat16")
    prompts = [tok("12+3=").input_ids, tok("hi").input_ids]
    params = SamplingParams(n=2, max_new_tokens=8, seed=11, top_k=20, top_p=0.9, temperature=0.7)
    backend = cpu_backend()
    backend.setup(model, tok)
    want = backend.generate(prompts, params)
    got = DecodingSampler(model, tok, torch.device("cpu"), contextlib.nullcontext).generate(prompts, params)
    assert [[(c.ids, c.finish_reason, c.logprobs) for c in g] for g in got] == \
           [[(c.ids, c.finish_reason, c.logprobs) for c in g] for g in want]
    assert backend.generate([], params) == []


def test_the_reserved_cache_holds_what_concatenation_holds():
    """A decoding step writes its keys into the reserved buffer: at every step (compactions and a
    step past the reserved room included) attention sees what transformers' concatenating layer holds."""
    from transformers.cache_utils import DynamicLayer

    from backends.decoding import _reserve

    class Cache:  # the part of a transformers cache the sampler touches
        def __init__(self):
            self.layers = [DynamicLayer()]

    torch.manual_seed(0)
    k0, v0 = torch.randn(6, 2, 5, 4), torch.randn(6, 2, 5, 4)
    plain, reserved = DynamicLayer(), Cache()
    plain.update(k0, v0)
    reserved.layers[0].update(k0.clone(), v0.clone())
    _reserve(reserved, 3)
    layer = reserved.layers[0]
    assert type(layer).__name__ == "ReservedLayer" and layer.k_buf.shape[-2] == 8
    for step in range(5):  # two steps past the room reserved
        if step == 2:
            keep = torch.tensor([0, 2, 3, 5])
            plain.batch_select_indices(keep)
            layer.batch_select_indices(keep)
        k, v = torch.randn(len(plain.keys), 2, 1, 4), torch.randn(len(plain.keys), 2, 1, 4)
        want, got = plain.update(k, v), layer.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
        assert layer.get_seq_length() == plain.get_seq_length() == 6 + step


def test_sampling_with_the_reserved_cache_gives_the_concatenating_caches_completions(monkeypatch):
    import backends.decoding as decoding
    from backends.decoding import DecodingSampler

    model, tok = tiny_policy()
    prompts = [tok("12+3=").input_ids, tok("a longer prompt 7*8=").input_ids]  # left padding
    params = SamplingParams(n=4, max_new_tokens=24, seed=2)
    sampler = DecodingSampler(model, tok, torch.device("cpu"), contextlib.nullcontext)
    got = sampler.generate(prompts, params)
    monkeypatch.setattr(decoding, "_reserve", lambda cache, extra: None)  # transformers' own layers
    want = sampler.generate(prompts, params)
    assert [[(c.ids, c.logprobs) for c in g] for g in got] == [[(c.ids, c.logprobs) for c in g] for g in want]


def _left_padded(tok):
    return [tok("12+3=").input_ids, tok("a longer prompt 7*8=").input_ids, tok("a much longer prompt: 19-4=").input_ids]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_cpu_backend_samples_with_grouped_attention_what_sdpa_samples(monkeypatch, dtype):
    from backends.attention import NAME
    from backends.cpu import CPUBackend

    model, tok = tiny_policy()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # a grouped-query model
    backend = CPUBackend(CPUBackendSpec(threads=torch.get_num_threads(), dtype=dtype))
    backend.setup(model, tok)
    assert model.config._attn_implementation == NAME
    grouped = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        grouped.append(kwargs.get("enable_gqa", False) and kwargs.get("attn_mask") is not None)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    params = SamplingParams(n=3, max_new_tokens=20, seed=5)
    got = backend.generate(_left_padded(tok), params)
    assert grouped and all(grouped)  # every call read the grouped keys in place, under the padding mask
    model.set_attn_implementation("sdpa")
    grouped.clear()
    want = backend.generate(_left_padded(tok), params)
    assert grouped and not any(grouped)
    assert [[(c.ids, c.logprobs) for c in g] for g in got] == [[(c.ids, c.logprobs) for c in g] for g in want]
    backend.close()


def test_grouped_attention_leaves_the_trained_forward_and_its_gradients_as_sdpa_makes_them():
    from apo_cli.batching import completion_logprobs, pack
    from backends.attention import use_grouped_attention

    (model, tok), (stock, _) = tiny_policy(), tiny_policy()
    assert use_grouped_attention(model) and stock.config._attn_implementation == "sdpa"
    prompts = _left_padded(tok)
    completions = [tok(" 15 ok").input_ids, tok(" 56").input_ids, tok(" 15 and more").input_ids]
    packed = pack(prompts, completions, tok.pad_token_id)
    logp, _ = completion_logprobs(model, packed)
    want, _ = completion_logprobs(stock, packed)
    assert torch.equal(logp, want)
    logp.sum().backward()
    want.sum().backward()
    grads = dict(stock.named_parameters())
    assert all(torch.equal(p.grad, grads[n].grad) for n, p in model.named_parameters())
    with torch.no_grad():  # the anchors' and the reference's pass: the same bits as the trained forward
        assert torch.equal(completion_logprobs(model, packed)[0], logp)


def test_a_model_with_attention_code_of_its_own_keeps_sdpa():
    from transformers import AutoModelForCausalLM, FalconConfig

    from backends.attention import use_grouped_attention

    falcon = AutoModelForCausalLM.from_config(FalconConfig(  # grouped-query; its own attention, branching on "sdpa"
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True))
    assert not use_grouped_attention(falcon)
    assert falcon.config._attn_implementation == "sdpa"


def test_the_kl_reference_runs_the_policys_attention_and_gives_its_log_probs_at_the_start(tmp_path):
    from apo_cli.recipe import recipe_from_dict
    from apo_cli.train import Trainer
    from backends.attention import NAME
    from tests.helpers import tiny_recipe

    t = Trainer(recipe_from_dict(tiny_recipe(tmp_path, algorithm={"kl_coef": 0.05})))
    policy = t.policy
    assert policy.model.config._attn_implementation == policy.ref_model.config._attn_implementation == NAME
    prompts = _left_padded(policy.tok)
    completions = [policy.tok(" 15 ok").input_ids, policy.tok(" 56").input_ids, policy.tok(" 15 and").input_ids]
    logp, _, _ = policy.logprobs(prompts, completions)
    assert torch.equal(policy.ref_logprobs(prompts, completions), logp.detach())


# -- streaming ------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [cpu_backend, hf_backend], ids=["cpu", "gpu-hf"])
def test_generate_feeds_a_streamer_when_one_completion_is_sampled(make):
    backend = make()
    model, tok = tiny_policy()
    backend.setup(model, tok)
    prompt = tok("5+5=").input_ids
    params = SamplingParams(n=1, max_new_tokens=12, seed=4)
    plain = backend.generate([prompt], params)
    rec = Recorder()
    streamed = backend.generate([prompt], params, streamer=rec)
    assert [(c.ids, c.logprobs) for c in streamed[0]] == [(c.ids, c.logprobs) for c in plain[0]]
    assert rec.put_calls[0] == prompt and rec.ended == 1
    drawn = [t for call in rec.put_calls[1:] for t in call]
    assert drawn[: len(plain[0][0].ids)] == plain[0][0].ids  # every kept token, in order, as it was drawn

    rec = Recorder()  # several completions: nothing to stream
    many = backend.generate([prompt], SamplingParams(n=2, max_new_tokens=6, seed=4), streamer=rec)
    assert len(many[0]) == 2 and rec.put_calls == [] and rec.ended == 0
    backend.close()


class _WholeBackend:
    """A backend that cannot stream (like vLLM): it ignores the streamer."""

    def __init__(self, ids: list[int]):
        self.ids = ids
        self.calls: list[dict] = []

    def generate(self, prompts, params, *, streamer=None):
        self.calls.append({"prompts": prompts, "streamer": streamer})
        return [[Completion(ids=self.ids, finish_reason="length")]]


def _bare_sampler(backend, tok):
    from apo_cli.generation import Sampler

    s = Sampler.__new__(Sampler)  # no model loading: only the backend and the tokenizer are used
    s.backend, s.tok = backend, tok
    return s


def test_stream_one_prints_a_non_streaming_backend_whole():
    _, tok = tiny_policy()
    ids = tok("abc").input_ids
    backend = _WholeBackend(ids)
    pieces: list[str] = []
    sample = _bare_sampler(backend, tok).stream_one([5, 6], SamplingParams(n=1, max_new_tokens=4), pieces.append)
    assert pieces == [tok.decode(ids, skip_special_tokens=True)] == [sample.completion]
    assert backend.calls[0]["prompts"] == [[5, 6]] and backend.calls[0]["streamer"] is not None
    assert not hasattr(backend, "streamer") and not hasattr(backend, "_hf")  # nothing set on the backend


def test_stream_one_streams_through_the_cpu_backend():
    backend = cpu_backend()
    model, tok = tiny_policy()
    backend.setup(model, tok)
    prompt = tok("5+5=").input_ids
    params = SamplingParams(n=1, max_new_tokens=12, seed=4)
    want = backend.generate([prompt], params)[0][0]
    pieces: list[str] = []
    sample = _bare_sampler(backend, tok).stream_one(prompt, params, pieces.append)
    assert sample.ids == want.ids and sample.finish_reason == want.finish_reason
    assert "".join(pieces) == sample.completion == tok.decode(want.ids, skip_special_tokens=True)
    assert not hasattr(backend, "streamer")
