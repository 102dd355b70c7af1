"""The lazy backend registry, and the one-line errors when the GPU backend cannot run here."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import backends
import backends._optional as optional
from apo_cli.errors import BackendError
from apo_cli.recipe import CPUBackendSpec, GPUBackendSpec
from backends import backend_names, create_backend, load_backend_class


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_unknown_backend_lists_the_names():
    with pytest.raises(BackendError) as e:
        load_backend_class("tpu")
    assert "unknown backend 'tpu'" in str(e.value)
    for name in ("cpu", "gpu"):
        assert name in str(e.value)


def test_builtins_resolve():
    from backends.cpu import CPUBackend
    from backends.gpu import GPUBackend

    assert {"cpu", "gpu"} <= set(backend_names())
    assert load_backend_class("cpu") is CPUBackend
    assert load_backend_class("gpu") is GPUBackend
    assert isinstance(create_backend(CPUBackendSpec(threads=1)), backends.Backend)


def test_third_party_backends_register_through_entry_points(monkeypatch, request):
    import importlib.metadata

    class EP:
        name, value = "mine", "backends.cpu:CPUBackend"

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [EP()] if group == "apo.backends" else [])
    backends.BACKENDS.reset()  # the registry reads the (patched) entry points again ...
    request.addfinalizer(backends.BACKENDS.reset)  # ... and the real ones after the test
    assert "mine" in backend_names()
    from backends.cpu import CPUBackend

    assert load_backend_class("mine") is CPUBackend


def test_importing_backends_imports_neither_vllm_nor_the_gpu_module():
    r = run_python("""
        import sys
        import backends, backends.cpu
        from backends import backend_names
        backend_names()
        assert "vllm" not in sys.modules, "backends imported vllm"
        assert "backends.gpu" not in sys.modules, "the gpu backend was imported eagerly"
        import backends.gpu  # the GPU backend module itself imports vllm only when it builds an engine
        assert "vllm" not in sys.modules, "backends.gpu imported vllm at import time"
    """)
    assert r.returncode == 0, r.stderr


def test_missing_cuda_is_one_line_suggesting_the_cpu_backend(monkeypatch):
    monkeypatch.setattr(optional, "is_cuda_available", lambda: False)
    with pytest.raises(BackendError) as e:
        create_backend(GPUBackendSpec(rollout="hf"))
    msg = str(e.value)
    assert "\n" not in msg and "CUDA" in msg and "backend: {kind: cpu}" in msg


def test_missing_vllm_is_one_line_naming_the_extra(monkeypatch):
    import backends.gpu as gpu

    monkeypatch.setattr(gpu, "cuda_problem", lambda: None)  # as if on a GPU machine
    monkeypatch.setattr(optional, "vllm_distribution", lambda: None)
    with pytest.raises(BackendError) as e:
        create_backend(GPUBackendSpec(rollout="vllm"))
    msg = str(e.value)
    assert "\n" not in msg and "pip install 'apo-cli[gpu]'" in msg and "rollout: hf" in msg


def test_vllm_outside_the_supported_window_is_refused(monkeypatch):
    import backends.gpu as gpu

    monkeypatch.setattr(gpu, "cuda_problem", lambda: None)
    for version in ("0.9.2", "99.0.0"):
        monkeypatch.setattr(optional, "vllm_distribution", lambda v=version: ("vllm", v))
        assert not optional.is_vllm_available()
        with pytest.raises(BackendError, match=f"vllm {version} is outside the supported window"):
            create_backend(GPUBackendSpec(rollout="vllm"))
    for version in (optional.VLLM_MIN, "0.32.0+cpu", "0.11.0rc1"):
        monkeypatch.setattr(optional, "vllm_distribution", lambda v=version: ("vllm", v))
        assert optional.is_vllm_available(), version


def test_vllm_blocked_in_sys_modules_counts_as_missing():
    r = run_python("""
        import sys
        sys.modules["vllm"] = None
        from backends._optional import is_vllm_available, vllm_problem
        assert not is_vllm_available()
        print(vllm_problem())
    """)
    assert r.returncode == 0, r.stderr
    assert "apo-cli[gpu]" in r.stdout


def test_rollout_hf_needs_no_vllm(monkeypatch):
    from backends.gpu import GPUBackend

    monkeypatch.setattr(optional, "vllm_distribution", lambda: None)
    backend = GPUBackend(GPUBackendSpec(rollout="hf"), _device="cpu")
    assert backend.device.type == "cpu" and backend.engine is None


@pytest.mark.skipif(optional.is_cuda_available(), reason="this machine has CUDA")
def test_apo_train_with_the_gpu_backend_on_a_cpu_machine_fails_in_one_line(cli, tmp_path):
    from tests.helpers import tiny_recipe, write_recipe

    d = tiny_recipe(tmp_path)
    d["backend"] = {"kind": "gpu", "rollout": "hf"}
    result = cli("train", str(write_recipe(tmp_path, d)))
    assert result.exit_code == 1
    lines = [x for x in result.output.splitlines() if x.strip()]
    err = [x for x in lines if x.startswith("error:")]
    assert len(err) == 1 and "backend: {kind: cpu}" in err[0], result.output
