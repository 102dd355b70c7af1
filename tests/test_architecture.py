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
from collections.abc import Iterable
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


# --- No import cycles -------------------------------------------------------------------------------
#
# The graph has an edge A -> B for every ``import``/``from ... import`` anywhere in module A (function-
# level imports included: they run on call, and a cycle through them breaks as soon as the function
# runs during an import; imports under ``if TYPE_CHECKING:`` excluded: they never run). Relative
# imports are resolved. ``from pkg import name`` goes to ``pkg.name`` where that is a module, else to
# ``pkg``. Importing ``pkg.sub`` first executes ``pkg/__init__``, so an edge to ``pkg.sub`` implies
# one to ``pkg`` -- except where ``pkg`` contains the importer: a module inside ``pkg`` runs only once
# ``pkg`` is being imported, so that edge is always satisfied (counting it would make every package
# whose ``__init__`` re-exports a submodule a cycle with that submodule's siblings). An explicit
# ``from pkg import name`` of a name defined in ``pkg/__init__`` is still an edge to ``pkg``.

PACKAGES = ("apo_cli", "backends")
ALL_SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ALL_SOURCES}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST):
    """Every Import/ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules) -> list[tuple[str, bool]]:
    """(imported module, explicit?) pairs; explicit=False for a package implied by its submodule."""
    if isinstance(node, ast.Import):
        named = [a.name for a in node.names]
    else:
        pkg = _resolve(module, is_package, node)
        named = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in modules else pkg for a in node.names]
    out = []
    for name in named:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            target = ".".join(parts[:i])
            if target in modules:
                out.append((target, i == len(parts)))
    return out


def _import_graph(modules: dict[str, Path]) -> dict[str, dict[str, str]]:
    """module -> {imported module: 'path:line' of the first import making that edge}."""
    graph: dict[str, dict[str, str]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        is_package = path.name == "__init__.py"
        own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1 + is_package)}
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            for target, explicit in _targets(module, is_package, node, modules):
                if target == module or (not explicit and target in own_packages):
                    continue
                edges.setdefault(target, f"{path.relative_to(ROOT)}:{node.lineno}")
    return graph


def _find_cycles(graph: dict[str, Iterable[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one, as the modules in order, the
    first repeated at the end: ``[a, b, a]``. Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    nodes = set(graph) | {t for ts in graph.values() for t in ts}
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        n = stack.pop()
                        on_stack.discard(n)
                        comp.append(n)
                        if n == node:
                            break
                    if len(comp) > 1 or node in graph.get(node, ()):
                        components.append(comp)
    return sorted(_cycle_through(min(c), set(c), graph) for c in components)


def _cycle_through(start: str, component: set[str], graph) -> list[str]:
    """The shortest cycle from ``start`` back to itself inside its component (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child in component and child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle")  # pragma: no cover


def test_the_cycle_finder_finds_a_planted_cycle_and_no_other():
    acyclic = {"a": ["b", "c"], "b": ["c", "d"], "c": ["d"], "d": []}
    assert _find_cycles(acyclic) == []
    planted = {**acyclic, "d": ["e"], "e": ["b"], "x": ["x"], "y": ["a"]}
    assert _find_cycles(planted) == [["b", "d", "e", "b"], ["x", "x"]]  # the shortest through b


def test_the_import_graph_resolves_relative_submodule_and_implied_imports(tmp_path):
    modules = {name: tmp_path / f"{name.replace('.', '_')}.py" for name in
               ("p", "p.a", "p.b", "p.sub", "p.sub.c", "q")}
    modules["p"] = tmp_path / "p" / "__init__.py"
    modules["p.sub"] = tmp_path / "p" / "sub" / "__init__.py"
    sources = {
        "p": "from .a import f\n",
        "p.a": "from . import b\nfrom .sub import c\nfrom typing import TYPE_CHECKING\n"
               "if TYPE_CHECKING:\n    import q\n",
        "p.b": "def g():\n    from p import VALUE\n",
        "p.sub": "", "p.sub.c": "from ..a import f\n", "q": "import p.sub.c\n",
    }
    for name, path in modules.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(sources[name])
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        graph = {m: set(e) for m, e in _import_graph(modules).items()}
    finally:
        ROOT = saved
    assert graph == {"p": {"p.a"}, "p.a": {"p.b", "p.sub.c", "p.sub"}, "p.b": {"p"},
                     "p.sub": set(), "p.sub.c": {"p.a"}, "q": {"p.sub.c", "p.sub", "p"}}
    assert _find_cycles(graph) == [["p", "p.a", "p.b", "p"]]


def test_no_import_cycles():
    graph = _import_graph(MODULES)
    assert len(graph) >= 30 and sum(map(len, graph.values())) >= 50  # not vacuous
    cycles = _find_cycles(graph)
    shown = [" -> ".join(f"{a} ({graph[a][b]})" for a, b in zip(c, c[1:])) + f" -> {c[-1]}" for c in cycles]
    assert not cycles, "import cycles (module (where it imports the next)):\n" + "\n".join(shown)


# --- Size limits ------------------------------------------------------------------------------------

TRAIN_FILE_LINES = 400  # apo_cli/train/
FILE_LINES = 600  # every other file of apo_cli/ and backends/
FUNCTION_LINES = 80  # ``def`` line to last line; a nested function counts for itself and for its outer one


def _long_functions(tree: ast.AST, limit: int) -> list[tuple[int, str, int]]:
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                n = child.end_lineno - child.lineno + 1
                if n > limit:
                    out.append((child.lineno, name, n))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def test_files_are_not_too_long():
    bad = []
    for path in ALL_SOURCES:
        rel = path.relative_to(ROOT)
        limit = TRAIN_FILE_LINES if rel.parts[:2] == ("apo_cli", "train") else FILE_LINES
        n = len(path.read_text().splitlines())
        if n > limit:
            bad.append(f"{rel}:1 {path.name} ({n} lines > {limit})")
    assert not bad, "files over their line limit:\n" + "\n".join(bad)


def test_functions_are_not_too_long():
    bad = [f"{p.relative_to(ROOT)}:{line} {name} ({n} lines)" for p in ALL_SOURCES
           for line, name, n in _long_functions(ast.parse(p.read_text(), str(p)), FUNCTION_LINES)]
    assert not bad, f"functions over {FUNCTION_LINES} lines:\n" + "\n".join(bad)


def test_the_function_length_rule_counts_nested_functions_for_both():
    src = "class C:\n    def m(self):\n        def inner():\n" + "            x = 1\n" * 5 + "        return 1\n"
    assert _long_functions(ast.parse(src), 3) == [(2, "C.m", 8), (3, "C.m.inner", 6)]
    assert _long_functions(ast.parse(src), 8) == []
