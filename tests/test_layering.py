"""The package's layering, read from its source with ``ast``: no import cycles, gnc.training
imported by the entry points only, and the mathematical core (gnc.etf) free of the rest.

Every import counts: at module level or inside a function (a deferred import runs as soon as
its function does), and dynamic ones (``importlib.import_module`` / ``__import__``): a string
literal argument is the module imported; a computed one may be any module that a string
constant of the importing module names (e.g. a table of where moved names now live).
Importing ``gnc.a.b`` also runs the package ``gnc.a``, unless ``gnc.a`` is a package of the
importing module itself (then it is being imported already).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# the modules that may import gnc.training (the loop): the entry points
TRAINING_IMPORTERS = {"gnc.experiments", "gnc.bench", "gnc.cli"}
# what the mathematical core may import from the package
ETF_IMPORTS = {"gnc.validation"}


def package_modules() -> dict[str, Path]:
    """``{"gnc.data.base": Path(...), "gnc.data": .../data/__init__.py, ...}``."""
    modules = {}
    for path in sorted((SRC / "gnc").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _packages_of(name: str) -> list[str]:
    """``"gnc.data.base"`` → ``["gnc", "gnc.data"]``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_dynamic_import(call: ast.Call) -> bool:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name in ("import_module", "__import__")


def imported_names(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """``(name, line)`` of every import of ``module``, resolved to absolute names (``from P
    import n`` is ``P.n`` when that is a module, else ``P``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    constants = [n.value for n in ast.walk(tree)
                 if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in modules else base, node.lineno))
        elif isinstance(node, ast.Call) and _is_dynamic_import(node) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((arg.value, node.lineno))
            else:  # computed: any module a string constant here names
                found += [(c, node.lineno) for c in constants if c in modules]
    return sorted(found, key=lambda item: item[1])


def import_graph() -> dict[str, dict[str, str]]:
    """``{importer: {imported: "src/gnc/x.py:LINE"}}`` over the package's modules."""
    modules = package_modules()
    graph: dict[str, dict[str, str]] = {m: {} for m in modules}
    for module, path in modules.items():
        own_packages = set(_packages_of(module)) | {module}
        for name, line in imported_names(module, path, modules):
            if name != "gnc" and not name.startswith("gnc."):
                continue
            where = f"{path.relative_to(SRC.parent)}:{line}"
            implied = [p for p in _packages_of(name) if p not in own_packages]
            for target in [*implied, name]:
                if target != module:
                    graph[module].setdefault(target, where)
    return graph


def strongly_connected(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def shortest_cycle(graph: dict[str, dict[str, str]], start: str, within: set[str]) -> list[str]:
    """The shortest path ``start -> ... -> start`` through ``within`` (breadth first)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w in within and w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")


def import_cycles(graph: dict[str, dict[str, str]]) -> list[str]:
    """One cycle per strongly connected component of more than one module, as
    ``a -> b (src/gnc/a.py:12) -> a (src/gnc/b.py:3)``."""
    cycles = []
    for component in strongly_connected(graph):
        if len(component) < 2:
            continue
        path = shortest_cycle(graph, component[0], set(component))
        steps = [f"{b} ({graph[a][b]})" for a, b in zip(path, path[1:], strict=False)]
        cycles.append(" -> ".join([path[0], *steps])
                      + (f"  [component: {', '.join(component)}]" if len(component) > 2 else ""))
    return cycles


# --------------------------------------------------------------------------- the checker


def test_the_checker_resolves_imports_and_finds_cycles(tmp_path):
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:2"}, "c": {"a": "c.py:3", "d": "c.py:4"},
             "d": {}}
    assert import_cycles(graph) == [
        "a -> b (a.py:1) -> c (b.py:2) -> a (c.py:3)  [component: a, b, c]"]
    assert import_cycles({"a": {"b": "x"}, "b": {}}) == []
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom . import sub\nfrom .sub import f\nfrom gnc import x\n"
                      "def g():\n    from gnc.pkg import other\n"
                      "TABLE = {'x': 'gnc.pkg.other'}\n"
                      "def h(name):\n    import importlib\n"
                      "    return importlib.import_module(TABLE[name])\n")
    modules = {"gnc.pkg.m": source, "gnc.pkg.sub": source, "gnc.pkg.other": source,
               "gnc.pkg": source, "gnc": source}
    assert imported_names("gnc.pkg.m", source, modules) == [
        ("os", 1), ("gnc.pkg.sub", 2), ("gnc.pkg.sub", 3), ("gnc", 4), ("gnc.pkg.other", 6),
        ("importlib", 9), ("gnc.pkg.other", 10)]


def test_the_graph_holds_every_module_and_deferred_imports():
    graph = import_graph()
    assert {"gnc", "gnc.etf", "gnc.cli", "gnc.data.base", "gnc.models.backbones"} <= set(graph)
    assert "gnc.training" in graph["gnc.cli"]  # deferred: inside _cmd_train
    assert "gnc.data" in graph["gnc.config"]  # gnc.data.perturb runs gnc/data/__init__.py


# --------------------------------------------------------------------------- the package


def test_every_internal_import_names_a_module_of_the_package():
    modules = package_modules()
    missing = [f"{m} imports {name} (line {line})" for m, path in modules.items()
               for name, line in imported_names(m, path, modules)
               if (name == "gnc" or name.startswith("gnc.")) and name not in modules]
    assert not missing, "\n".join(missing)


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_training_is_imported_by_the_entry_points_only():
    graph = import_graph()
    wrong = [f"{m} imports gnc.training ({edges['gnc.training']})"
             for m, edges in graph.items()
             if "gnc.training" in edges and m not in TRAINING_IMPORTERS]
    assert not wrong, "\n".join(wrong)


def test_etf_imports_only_validation_from_the_package():
    edges = import_graph()["gnc.etf"]
    wrong = [f"gnc.etf imports {name} ({where})" for name, where in edges.items()
             if name not in ETF_IMPORTS]
    assert not wrong, "\n".join(wrong)


def _loaded_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_importing_etf_loads_the_core_only():
    loaded = _loaded_after("import gnc.etf")
    assert not {"torchvision", "gnc.measure", "gnc.evaluation", "gnc.models.backbones"} & loaded
    assert {m for m in loaded if m == "gnc" or m.startswith("gnc.")} == {
        "gnc", "gnc.etf", "gnc.validation"}


MEASURE_ORDERS = {
    "attribute first": "import gnc\nf = gnc.measure",
    "module first": "import gnc.measure as m\nassert callable(m.load_weights)\nimport gnc",
    "function first": "from gnc.measure import measure\nassert callable(measure)\nimport gnc",
    "from the package": "from gnc import measure\nimport gnc\nassert measure is gnc.measure",
}


@pytest.mark.parametrize("first", sorted(MEASURE_ORDERS))
def test_gnc_measure_is_the_module_and_callable(first):
    code = MEASURE_ORDERS[first] + """
import sys
import torch
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
data = TensorDataset(torch.randn(30, 4), torch.arange(30) % 3)
metrics = gnc.measure(model, DataLoader(data, batch_size=10))
assert 0 <= metrics["top1"] <= 100 and "nc1" in metrics, metrics
assert gnc.measure is sys.modules["gnc.measure"]
from gnc.measure import measure, load_weights
assert gnc.measure.measure is measure and gnc.measure.load_weights is load_weights
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_public_names_resolve_lazily():
    import gnc

    for name in gnc.__all__:
        assert getattr(gnc, name) is not None, name
        assert name in dir(gnc), name
    assert gnc.nearest_etf.__module__ == "gnc.declarative"
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        gnc.nope  # noqa: B018


def test_torchvision_is_imported_only_for_image_work():
    """torchvision (and scikit-learn) take 1–2 s to import each: the training loop, the
    experiments (and so every ``--jobs`` worker), the report and a non-image run do not pay it."""
    loaded = _loaded_after("import gnc.experiments, gnc.training, gnc.report, gnc.jobs, "
                           "gnc.evaluation, gnc.build, gnc.models, gnc.data")
    assert not {"torchvision", "sklearn"} & loaded
    build = "from gnc.models import build_backbone\nbuild_backbone({!r}, in_shape={!r})"
    assert "torchvision" not in _loaded_after(build.format("mlp", (64,)))
    assert "torchvision" in _loaded_after(build.format("resnet18", (3, 32, 32)))


def test_the_run_files_know_every_dataset_that_carries_a_path():
    """gnc.rundir resolves the relative path of a path dataset against the run's working
    directory; it keeps its own list (gnc.data is heavy to import): the two must agree."""
    from gnc.data.datasets import _PATH_DATASETS
    from gnc.rundir import DATA_PREFIXES

    assert DATA_PREFIXES == tuple(f"{name}:" for name in _PATH_DATASETS)


def test_the_code_is_ruff_clean():
    """`make lint` as part of the suite (CI runs `make test` only): ruff's rules include
    TC004, a name imported under TYPE_CHECKING but used at run time — a NameError that only
    the branch using it would meet (a GPU preset's CPU warning once did)."""
    root = SRC.parent
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "benchmarks"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
