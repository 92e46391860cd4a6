"""Recipes: the YAML schema (schema.py) and its loader with located errors (loader.py)."""

from mergetool.recipe.loader import load_recipe, parse_recipe
from mergetool.recipe.schema import (
    DataSplit,
    MergeConfig,
    ModelEntry,
    QuantizationConfig,
    Recipe,
    RouterConfig,
    SearchConfig,
    TaskConfig,
    json_schema,
)

__all__ = [
    "DataSplit", "MergeConfig", "ModelEntry", "QuantizationConfig", "Recipe", "RouterConfig",
    "SearchConfig", "TaskConfig", "json_schema", "load_recipe", "parse_recipe",
]
