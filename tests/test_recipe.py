"""Recipe validation: every kind of bad input names its field; committed recipes validate."""
from pathlib import Path

import pytest

from gift_quant.recipe import RecipeError
from gift_quant.recipe_file import load_recipe, parse_recipe

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
        ("quant.group_size=128,quant.act_order=true", "quant", "quant.dynamic_groups=false"),
    ],
)
def test_bad_values_name_the_field(override, field, hint):
    msg = bad(override.split(","))
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


def family_config(stem: str):
    """A tiny config of the recipe's model family (the name's prefix), as transformers defines it."""
    import transformers as tf

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, head_dim=16)
    for prefix, cls in [("smollm2", "LlamaConfig"), ("llama", "LlamaConfig"), ("mistral", "MistralConfig"),
                        ("qwen2.5", "Qwen2Config"), ("gemma-2", "Gemma2Config"), ("gemma-3", "Gemma3TextConfig")]:
        if stem.startswith(prefix):
            return getattr(tf, cls)(**small)
    raise AssertionError(f"recipe {stem}: no family config known; add it to family_config")


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_targets_exist_in_the_family(path):
    from gift_quant.checks import check_targets
    from gift_quant.plan import meta_model

    r = load_recipe(path, ["saliency.k=4", "saliency.k_overrides={}"])  # k of the real model exceeds the tiny one
    check_targets(r, meta_model(family_config(path.stem)))


def test_target_typo_and_oversized_k_are_caught_before_loading():
    from gift_quant.checks import check_targets
    from gift_quant.plan import meta_model

    r = parse_recipe({"model": {"ref": "m"}, "saliency": {"targets": ["q_proj", "gate_prj"], "k": 4}}, "t")
    with pytest.raises(RecipeError, match=r"saliency.targets = .*no linear \['gate_prj'\].*'gate_proj'"):
        check_targets(r, meta_model(family_config("llama")))
    r = parse_recipe({"model": {"ref": "m"}, "saliency": {"k": 100}}, "t")
    with pytest.raises(RecipeError, match="saliency.k for q_proj = 100: .*outside 0..64"):
        check_targets(r, meta_model(family_config("llama")))
