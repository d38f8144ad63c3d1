"""`mmtrain config-reference`: every config key, from the dataclasses that define them.

Each key's type, default, allowed values or range (the rules `mmtrain.config.validate` checks)
and its comment in the source (the comment lines right above the field, and the one on its
line) become one row of docs/configs.md, which a test keeps equal to this output: the reference
cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
from typing import Dict, List, Tuple, Union, get_args, get_origin, get_type_hints


def _comments(cls) -> Dict[str, str]:
    """field name -> its comment in `cls`'s source (lines above, then the one on its line)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    by_line: Dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
    out: Dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, n = [], node.lineno - 1
        while n >= 1 and lines[n - 1].strip().startswith("#"):
            above.insert(0, by_line.get(n, ""))
            n -= 1
        inline = [by_line[k] for k in range(node.lineno, node.end_lineno + 1) if k in by_line]
        out[node.target.id] = " ".join([*above, *inline]).replace("|", "\\|")
    return out


def _type_name(hint) -> str:
    """int, float or null, list of float, dict of str to float, ..."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (list, List):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Dict):
        return f"dict of {_type_name(args[0])} to {_type_name(args[1])}" if args else "dict"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _intro(cls) -> str:
    """The first paragraph of a section's docstring (not dataclass's generated signature)."""
    doc = cls.__doc__ or ""
    if doc.startswith(cls.__name__ + "("):
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return "null" if value is None else repr(value).replace("|", "\\|")


def _rule(f: dataclasses.Field) -> str:
    meta = f.metadata
    if "choices" in meta:
        return " \\| ".join(meta["choices"])
    if "range" in meta:
        ge, gt, le, lt = meta["range"]
        parts = [
            f"{op} {b:g}"
            for b, op in ((ge, ">="), (gt, ">"), (le, "<="), (lt, "<"))
            if b is not None
        ]
        note = meta.get("note")
        return " and ".join(parts) + (f"; {note}" if note else "")
    if meta.get("shards"):
        return "shard dir or brace pattern"
    if "path" in meta:
        return "path" + (", must exist" if meta["path"] else "")
    return ""


def rows(cls, prefix: str) -> List[Tuple[str, str, str, str, str]]:
    """(key, type, default, rule, comment) of every field of `cls`, sections expanded."""
    hints = get_type_hints(cls)
    comments = _comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name, f.type)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            out += rows(hint, key + ".")
            continue
        out.append((key, _type_name(hint), _default(f), _rule(f), comments.get(f.name, "")))
    return out


def _table(title: str, intro: str, entries) -> List[str]:
    lines = [f"## {title}", "", *([intro, ""] if intro else [])]
    lines += ["| key | type | default | allowed | what it does |"]
    lines.append("|---|---|---|---|---|")
    lines += [f"| `{k}` | {t} | `{d}` | {r} | {c} |" for k, t, d, r, c in entries]
    return lines + [""]


def reference() -> str:
    from mmtrain.config import Config
    from mmtrain.recipes import RECIPES, recipe_class

    lines = [
        "# Config reference",
        "",
        "Every key a run config can set, generated from the code by `mmtrain config-reference`",
        "(a test keeps this page equal to its output). Set keys in a YAML file (`base:` names",
        "files it builds on) or on the command line as `key=value`; `mmtrain config CONFIG`",
        "prints the resolved, validated config. `allowed` is what `mmtrain config` and `mmtrain",
        "train` check before any process starts.",
        "",
    ]
    for section in dataclasses.fields(Config):
        if section.name == "recipe":
            continue
        cls = get_type_hints(Config)[section.name]
        lines += _table(f"`{section.name}`", _intro(cls), rows(cls, f"{section.name}."))
    for name in RECIPES:
        cfg = recipe_class(name).Config
        lines += _table(f"`recipe` for `recipe.name={name}`", _intro(cfg), rows(cfg, "recipe."))
    return "\n".join(lines).rstrip() + "\n"
