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


def family_config(ref: str):
    """The tiny config of the family (``gift_quant.families``) whose hub models include ``ref``; the real config of a
    model that is on this machine."""
    from transformers import AutoConfig

    from gift_quant.families import FAMILIES
    from gift_quant.sources import resolve_model

    for family in FAMILIES:
        if ref in family.hub:
            return family.tiny_config(128)
    return AutoConfig.from_pretrained(resolve_model(ref))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_targets_exist_in_the_family(path):
    from gift_quant.checks import check_targets
    from gift_quant.plan import meta_model

    r = load_recipe(path, ["saliency.k=4", "saliency.k_overrides={}"])  # k of the real model exceeds the tiny one
    check_targets(r, meta_model(family_config(r.model.ref)))


def test_target_typo_and_oversized_k_are_caught_before_loading():
    from gift_quant.checks import check_targets
    from gift_quant.plan import meta_model

    with pytest.raises(RecipeError, match=r"saliency.targets.*\['gate_prj'\] is no projection of a known family.*"
                                          r"gate_proj, gate_up_proj"):
        parse_recipe({"model": {"ref": "m"}, "saliency": {"targets": ["q_proj", "gate_prj"], "k": 4}}, "t")
    r = parse_recipe({"model": {"ref": "m"}, "saliency": {"targets": ["qkv_proj", "o_proj"], "k": 4}}, "t")
    with pytest.raises(RecipeError, match=r"a llama model \(llama\) has no projection \['qkv_proj'\]; set "
                                          r"saliency.targets to some of \['q_proj', 'k_proj'"):
        check_targets(r, meta_model(family_config("meta-llama/Llama-2-7b-hf")))
    r = parse_recipe({"model": {"ref": "m"}, "saliency": {"targets": ["q_proj", "o_proj"], "k": 4}}, "t")
    with pytest.raises(RecipeError, match=r"a phi3 model \(phi3\) has no projection \['q_proj'\].*'qkv_proj'"):
        check_targets(r, meta_model(family_config("microsoft/Phi-3-mini-4k-instruct")))
    from transformers import AutoConfig

    with pytest.raises(RecipeError, match=r"model.ref = 'm': model_type 'gpt2' is not a family .*supported: gemma2"):
        check_targets(r, meta_model(AutoConfig.for_model("gpt2", n_layer=1, n_embd=64, n_head=4)))
    r = parse_recipe({"model": {"ref": "m"}, "saliency": {"k": 100}}, "t")
    with pytest.raises(RecipeError, match="saliency.k for q_proj = 100: .*outside 0..64"):
        check_targets(r, meta_model(family_config("meta-llama/Llama-2-7b-hf")))


def test_a_field_its_section_leaves_unread_changes_no_stage_key():
    """The reconstruct and train keys hash what their settings read: the latent weights' fields only when every
    weight trains, the scales' learning rate only when scales train, the noise grid only with noise, the
    teacher's temperature only with distillation; any read field still changes its key."""
    from gift_quant.pipeline import open_run

    def key(stage, *sets):
        return open_run(load_recipe(RECIPES[0].with_name("smollm2-135m-instruct-w3.yaml"), [
            "reconstruct.enabled=true", "reconstruct.train=columns", *sets])).key(stage)

    base = key("reconstruct")
    assert key("reconstruct", "reconstruct.weights_lr=3e-3", "reconstruct.init=quantized") == base
    assert key("reconstruct", "reconstruct.scales_lr=3e-3", "reconstruct.noise_bits=2") == base
    assert key("reconstruct", "reconstruct.learn_scales=true") != base
    assert key("reconstruct", "reconstruct.lr=3e-3") != base
    weights = key("reconstruct", "reconstruct.train=weights")
    assert weights != base and key("reconstruct", "reconstruct.train=weights", "reconstruct.weights_lr=3e-3") != weights
    assert key("reconstruct", "reconstruct.train=weights", "reconstruct.learn_scales=true") == weights
    plain = ("train.distill=0", "train.distill_topk=null")
    train = key("train", *plain)
    assert key("train", *plain, "train.distill_temperature=2", "train.scales_lr=1e-2", "train.noise_bits=2") == train
    assert key("train", *plain, "train.steps=7") != train
    assert key("train", "train.distill_temperature=2") != key("train")
    assert key("train", "train.noise=gaussian", "train.noise_bits=2") != key("train", "train.noise=gaussian")
