"""Readable code, kept so: no function in the package over 60 lines (a function that long is two
things; split it where it changes subject)."""

import ast
from pathlib import Path

MAX_LINES = 60
PACKAGE = Path(__file__).resolve().parents[2] / "mmtrain"


def test_no_function_in_mmtrain_is_over_60_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(
                        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines})"
                    )
    assert not long, long


def _attributes_set(fn: ast.FunctionDef):
    for node in ast.walk(fn):
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for target in targets:
            for e in ast.walk(target):
                if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name):
                    if e.value.id == "self":
                        yield e.attr


def test_the_engines_classes_declare_every_attribute_in_init():
    """The trainer's state is explicit: whatever a method sets, `__init__` declared (a recipe's
    `setup` is its own declared step and is not held to this)."""
    late = []
    for path in sorted((PACKAGE / "engine").glob("*.py")):
        for cls in [
            n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)
        ]:
            methods = [f for f in cls.body if isinstance(f, ast.FunctionDef)]
            init = {
                a
                for f in methods
                if f.name in ("__init__", "__post_init__")
                for a in _attributes_set(f)
            }
            fields = {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)}
            for f in methods:
                late += [
                    f"{path.name}: {cls.name}.{f.name} sets self.{a}"
                    for a in set(_attributes_set(f)) - init - fields
                ]
    assert not late, sorted(late)
