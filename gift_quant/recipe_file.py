"""A recipe file read into a validated ``Recipe``: YAML text, ``--set`` overrides, and one error line a problem.

``--set a.b=value`` overrides are applied to the raw data before validation, so they are checked the same way
as the file; every problem pydantic finds becomes one line with the dotted field path, the value as YAML writes
it and what is wrong in plain words (no Python type names).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .recipe import Recipe, RecipeError


def _format_errors(err: ValidationError, source: str) -> str:
    """One line a problem: the dotted field path, the value as YAML writes it, what is wrong in plain words."""
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against the recipe schema (gift_quant/recipe.py)"
        elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            msg = "expected a section: a mapping of its keys, one per line below it"
        if e["loc"]:
            lines.append(f"  {path} = {_as_yaml(e.get('input'))}: {msg}")
        else:  # a rule across sections: its message names the fields and their values
            lines.append(f"  {msg}")
    return "\n".join(lines)


def _as_yaml(value: Any, width: int = 60) -> str:
    """``value`` as a recipe writes it (``true``, ``null``, ``[3, 4]``; text quoted, so that its ends show), cut
    to ``width`` characters."""
    text = repr(value) if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True, width=10**6)
    text = text.strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return text if len(text) <= width else text[: width - 3] + "..."


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to raw recipe data."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {assignment!r}: expected key.path=value, e.g. quant.bits=4")
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {assignment!r}: {p!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {assignment!r}: the value {raw!r} is not YAML ({_yaml_problem(e)}); quote a "
                          f"string, e.g. --set '{key}=\"{raw}\"'") from None


def parse_recipe(data: dict[str, Any], source: str = "<dict>", overrides: list[str] = ()) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe {source}: expected a mapping at the top level, got {type(data).__name__}")
    for o in overrides:
        apply_override(data, o)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_errors(err, source)) from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(e, "problem", None) or e)


def shipped_recipes() -> dict[str, Path]:
    """Recipes installed with the package (the repository's ``recipes/``), by stem."""
    from importlib import resources

    return {f.name.removesuffix(".yaml"): Path(str(f)) for f in resources.files("gift_quant.recipes").iterdir()
            if f.name.endswith(".yaml")}


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """A recipe file, or a shipped recipe named by its stem (``smollm2-135m-instruct-w3``)."""
    path = Path(path)
    if not path.exists():
        shipped = shipped_recipes()
        if str(path) not in shipped:
            raise RecipeError(f"recipe {str(path)!r}: no such file, nor a shipped recipe; shipped: "
                              f"{', '.join(sorted(shipped))}")
        path = shipped[str(path)]
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe file {path} is not valid YAML: {_yaml_problem(e)}") from None
    return parse_recipe(data, str(path), overrides)
