"""Recipe registry: a new method is one module here plus its configs.

Recipes are imported lazily so that `mmtrain config` on one recipe never imports another's
dependencies.
"""
from __future__ import annotations

import difflib
import importlib

RECIPES = {
    "toy_lm": "mmtrain.recipes.toy_lm:ToyLM",
}


def recipe_class(name: str):
    from mmtrain.config import ConfigError

    if name not in RECIPES:
        near = difflib.get_close_matches(name, RECIPES, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"unknown recipe 'recipe.name={name}'{hint} (known: {', '.join(sorted(RECIPES))})")
    module, _, attr = RECIPES[name].partition(":")
    return getattr(importlib.import_module(module), attr)
