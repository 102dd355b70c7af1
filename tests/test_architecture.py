"""Architecture rules as tests: device- and engine-specific code lives in ``backends/`` only.

- No module of ``apo_cli`` imports vLLM (``import vllm``, ``from vllm...``, ``importlib.import_module
  ("vllm...")``, ``__import__("vllm")``). The recipe may *name* vLLM (``rollout: vllm``): that is data.
- No module of ``apo_cli`` uses CUDA or NCCL: no ``cuda``/``nccl`` identifier (``torch.cuda``) and
  no string naming them as a device or process-group backend (``"cuda"``, ``"cuda:0"``, ``"nccl"``).
  The check is on lower-case spellings, which is how the APIs are spelled; prose such as "CUDA
  graphs" in a field description is allowed.
- ``apo_cli.train``, the CLI and the CPU backend import and run with vLLM absent.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "apo_cli").rglob("*.py"))
DEVICE_WORD = re.compile(r"\b(cuda|nccl)\b")


def _imports_vllm(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "vllm" for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            arg = node.args[0].value
            if name in ("import_module", "__import__", "find_spec") and isinstance(arg, str) \
                    and arg.split(".")[0] == "vllm":
                lines.append(node.lineno)
    return lines


def _device_api_uses(source: str) -> list[int]:
    lines = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.string in ("cuda", "nccl"):
            lines.append(tok.start[0])
        elif tok.type == tokenize.STRING and DEVICE_WORD.search(tok.string):
            lines.append(tok.start[0])
    return lines


def test_sources_are_found():
    assert len(SOURCES) >= 20, SOURCES  # the scan must not pass vacuously


def test_no_vllm_import_outside_backends():
    bad = [f"{p.relative_to(ROOT)}:{n}" for p in SOURCES for n in _imports_vllm(ast.parse(p.read_text(), str(p)))]
    assert not bad, f"vLLM is imported outside backends/: {bad}"


def test_no_cuda_or_nccl_outside_backends():
    bad = [f"{p.relative_to(ROOT)}:{n}" for p in SOURCES for n in _device_api_uses(p.read_text())]
    assert not bad, f"cuda/nccl used outside backends/ (device code belongs to a backend): {bad}"


def test_the_rules_catch_what_they_should():
    assert _imports_vllm(ast.parse("import vllm.sampling_params\nfrom vllm import LLM\n"
                                   "importlib.import_module('vllm.lora')")) == [1, 2, 3]
    assert _imports_vllm(ast.parse("x = 'vllm'\nrollout = Literal['vllm', 'hf']")) == []
    assert _device_api_uses("torch.cuda.synchronize()\nx.to('cuda:0')\ninit('nccl')\n") == [1, 2, 3]
    assert _device_api_uses("d = 'vLLM: disable CUDA graphs.'\n# cuda in a comment\n") == []


def test_train_loop_cli_and_cpu_backend_work_without_vllm():
    """With ``vllm`` blocked in sys.modules: import the loop and the CLI, run the CPU backend."""
    code = """
        import sys
        sys.modules["vllm"] = None  # any `import vllm` now raises ImportError
        import apo_cli.train, apo_cli.main
        from apo_cli.recipe import CPUBackendSpec
        from apo_cli.models import ensure_tiny, load_model, load_tokenizer
        from backends import SamplingParams, create_backend
        backend = create_backend(CPUBackendSpec(threads=1))
        path = str(ensure_tiny())
        backend.setup(load_model(path), load_tokenizer(path))
        out = backend.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=4, seed=0))
        assert len(out[0]) == 2
        assert sys.modules["vllm"] is None and "backends.gpu" not in sys.modules
        print("ok")
    """
    # the environment (offline Hugging Face, APO_CACHE) is conftest's
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
