"""Recipe validation: every kind of bad input names its field; committed recipes validate."""
from pathlib import Path

import pytest

from gift_quant.recipe import RecipeError, load_recipe, parse_recipe

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
BASE = {"model": {"ref": "org/model"}}


def bad(overrides: list[str]) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe({"model": {"ref": "org/model"}}, "t.yaml", overrides)
    return str(e.value)


@pytest.mark.parametrize(
    "override,field,hint",
    [
        ("quant.bits=5", "quant.bits", "2, 3, 4 or 8"),
        ("quant.bitz=3", "quant.bitz", "unknown key"),
        ("quant.group_size=0", "quant.group_size", "-1 (per row)"),
        ("saliency.k=1.5", "saliency.k", "fraction in (0, 1)"),
        ("saliency.k=-3", "saliency.k", ">= 0"),
        ("saliency.rho=3", "saliency.rho", "1, 2 or .inf"),
        ("saliency.metric=foo", "saliency.metric", "'gift'"),
        ("calibration.n_samples=abc", "calibration.n_samples", "integer"),
        ("saliency.tau=2", "saliency", "metric: custom"),
    ],
)
def test_bad_values_name_the_field(override, field, hint):
    msg = bad([override])
    assert f"  {field} = " in msg and hint in msg, msg


def test_override_syntax_error():
    with pytest.raises(RecipeError, match="expected key.path=value"):
        parse_recipe(dict(BASE), "t", ["quant.bits"])


def test_overrides_apply_and_parse_yaml_values():
    r = parse_recipe({"model": {"ref": "m"}}, "t",
                     ["quant.bits=4", "saliency.k=0.03", "saliency.metric=custom", "saliency.rho=.inf",
                      "saliency.gamma=2"])
    assert r.quant.bits == 4 and r.saliency.k == 0.03
    m = r.saliency.resolved_metric()
    assert m.rho == float("inf") and m.gamma == 2 and m.tau is None


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_committed_recipes_validate(path):
    r = load_recipe(path)
    assert r.name == path.stem
