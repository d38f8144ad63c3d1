"""Recipe registry: a new method is one module here plus its configs.

A recipe outside mmtrain is named by its import path, `recipe.name=my_pkg.my_recipe:MyRecipe`.
Recipes are imported lazily so that `mmtrain config` on one recipe never imports another's
dependencies. A recipe's own commands and pipeline stage kinds live a layer up, in
mmtrain/tools/ (which this module never names).
"""

from __future__ import annotations

import difflib
import importlib

from mmtrain.schema import ConfigError

RECIPES = {
    "toy_lm": "mmtrain.recipes.toy_lm:ToyLM",
    "vikdf_distill": "mmtrain.recipes.vikdf:VIKDFDistill",
    "vikdf_fuse": "mmtrain.recipes.vikdf:VIKDFFuse",
    "dyncot": "mmtrain.recipes.dyncot:DynCoT",
    "kdsl": "mmtrain.recipes.kdsl:KDSL",
}


def load(target: str):
    """The object a `module:attribute` string names."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def recipe_class(name: str):
    """A registered name, or `package.module:Class` for a recipe that lives outside mmtrain."""

    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"recipe.name={name}: cannot import it ({e})") from None
        from mmtrain.recipes.base import Recipe

        if not (isinstance(cls, type) and issubclass(cls, Recipe)):
            raise ConfigError(
                f"recipe.name={name} is not a subclass of mmtrain.recipes.base.Recipe"
            )
        return cls
    if name not in RECIPES:
        near = difflib.get_close_matches(name, RECIPES, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(
            f"unknown recipe 'recipe.name={name}'{hint} (known: {', '.join(sorted(RECIPES))})"
        )
    return load(RECIPES[name])
