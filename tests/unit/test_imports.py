"""The package's import graph: no cycles (function-local imports included), and every module
imports on its own, first, in a fresh interpreter."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mmtrain", "kernels", "mmtrain_testing")


def modules():
    """Dotted name -> file of every module of the packages."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph(mods):
    """Module -> the modules it imports anywhere in its file (importing a.b.c runs a and a.b too)."""

    def targets(name):
        found = set()
        while name:
            if name in mods:
                found.add(name)
            name = name.rpartition(".")[0]
        return found

    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for a in node.names:
                    edges |= targets(a.name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                for a in node.names:
                    edges |= targets(f"{base}.{a.name}") | targets(base)
        edges.discard(name)
        graph[name] = {e for e in edges if not name.startswith(e + ".")}  # a module's own packages
    return graph


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def late():\n    from a import x\n")
    mods = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    assert cycles(import_graph(mods)) == [["a", "b"]]


def test_no_import_cycles():
    found = cycles(import_graph(modules()))
    assert not found, "import cycles (function-local imports count): " + "; ".join(
        " <-> ".join(c) for c in found
    )


def test_every_module_imports_first_in_a_fresh_interpreter():
    """One interpreter imports the heavy third-party libraries once, then forks a child per module:
    each child imports its module before any other module of the packages."""
    script = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import torch, transformers, deepspeed, peft, omegaconf, webdataset, torchmetrics  # noqa
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
        except BaseException as e:
            print(f"{{name}}: {{type(e).__name__}}: {{e}}", flush=True)
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1]:
        failed.append(name)
sys.exit(1 if failed else 0)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    names = sorted(modules())
    r = subprocess.run(
        [sys.executable, "-c", script, *names], capture_output=True, text=True, env=env, timeout=600
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


# What a package may not import, anywhere in its files (docs/design.md, "Layers").
FORBIDDEN = {
    "mmtrain.schema": ("mmtrain",),
    "kernels": ("mmtrain",),
    "mmtrain.models": ("mmtrain.engine", "mmtrain.recipes", "mmtrain.config", "mmtrain.cli"),
    "mmtrain.data": ("mmtrain.engine", "mmtrain.recipes", "mmtrain.models", "mmtrain.config"),
    "mmtrain.metrics": ("mmtrain.engine", "mmtrain.recipes", "mmtrain.models"),
    "mmtrain.parallelize": ("mmtrain",),
    "mmtrain.engine": ("mmtrain.cli", "mmtrain.pipeline", "mmtrain.tools"),
    "mmtrain.recipes": ("mmtrain.engine", "mmtrain.cli", "mmtrain.pipeline", "mmtrain.tools"),
    "mmtrain.config": ("mmtrain.engine", "mmtrain.cli", "mmtrain.pipeline", "mmtrain.tools"),
}


def layer_breaches(graph):
    found = []
    for name, targets in sorted(graph.items()):
        for layer, banned in FORBIDDEN.items():
            if name != layer and not name.startswith(layer + "."):
                continue
            bad = [t for t in targets for b in banned if t == b or t.startswith(b + ".")]
            found += [f"{name} -> {t}" for t in sorted(set(bad)) if t != name]
    return found


def test_layers_import_only_downwards():
    assert not layer_breaches(import_graph(modules()))


DOTTED = re.compile(r"^(mmtrain(?:\.\w+)+)(?::\w+)?$")


def string_references(mods):
    """Module -> the modules its string constants name (`mmtrain.a.b` or `mmtrain.a.b:attr`, as a
    registry names what it loads later)."""
    graph = {}
    for name, path in mods.items():
        named = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                m = DOTTED.match(node.value)
                if m and m.group(1) in mods:
                    named.add(m.group(1))
        graph[name] = named - {name}
    return graph


def test_no_layer_names_a_higher_one_by_string():
    """A registry string is an import made later: it obeys the layers too."""
    assert not layer_breaches(string_references(modules()))


def test_the_string_check_sees_a_registry_naming_a_tool(tmp_path):
    (tmp_path / "reg.py").write_text('COMMANDS = {"kdsl": "mmtrain.tools.kdsl:add_commands"}\n')
    mods = {"mmtrain.recipes": tmp_path / "reg.py", "mmtrain.tools.kdsl": tmp_path / "reg.py"}
    assert layer_breaches(string_references(mods)) == ["mmtrain.recipes -> mmtrain.tools.kdsl"]


def test_the_layer_check_sees_a_model_importing_the_engine(tmp_path):
    graph = {"mmtrain.models.x": {"mmtrain.engine.trainer"}, "mmtrain.engine.trainer": set()}
    assert layer_breaches(graph) == ["mmtrain.models.x -> mmtrain.engine.trainer"]


# Stand-ins and benchmarks beside the library: only the commands that run them import them.
OUTSIDE_THE_LIBRARY = ("mmtrain.bench", "mmtrain_testing")
MAY_IMPORT_THEM = ("mmtrain.cli", *OUTSIDE_THE_LIBRARY)


def library_imports_of_fixtures(graph):
    return [
        f"{name} -> {t}"
        for name, targets in sorted(graph.items())
        if name.startswith("mmtrain.") and not name.startswith(MAY_IMPORT_THEM)
        for t in sorted(targets)
        if t.startswith(OUTSIDE_THE_LIBRARY)
    ]


def test_the_library_never_imports_the_stand_ins_or_the_benchmarks():
    assert not library_imports_of_fixtures(import_graph(modules()))


def test_the_fixture_check_sees_an_engine_module_importing_the_stand_ins():
    graph = {"mmtrain.engine.x": {"mmtrain_testing.tiny"}, "mmtrain.cli": {"mmtrain.bench.data"}}
    assert library_imports_of_fixtures(graph) == ["mmtrain.engine.x -> mmtrain_testing.tiny"]
