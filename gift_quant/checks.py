"""Everything a run reads, checked before any weights load.

A 7B run that fails an hour in on a typo costs an hour; these checks read only configs, safetensors
headers, the tokenizer and the texts, and say which field is wrong, its value and the fix. What they
find (the imported checkpoint's config, the model's shapes built once on the meta device) is handed
to the run, so no later step reads or builds it again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import gptq_checkpoint
from .calibrate import target_linears
from .families import UnsupportedModel, family_of
from .gptq_checkpoint import GPTQCheckpoint
from .plan import Shape, meta_model, shape_of
from .recipe import GENERATED, Recipe, RecipeError
from .saliency import PRESETS, resolve_k
from .sources import (
    SourceError,
    check_model_folder,
    check_text,
    load_tokenizer,
    records,
    resolve_model,
    unreachable,
)


@dataclass(frozen=True)
class Checked:
    """A recipe that passed the checks: with an imported checkpoint's grid adopted (``adopt_checkpoint``), that
    checkpoint's config, and the model's shapes."""

    recipe: Recipe
    imported: GPTQCheckpoint | None
    shape: Shape


def imported_checkpoint(recipe: Recipe) -> GPTQCheckpoint | None:
    """The checked config of the GPTQ checkpoint ``model.ref`` names, or None when it names a model to quantize."""
    if gptq_checkpoint.quant_method(recipe.model.ref) != "gptq":
        return None
    return gptq_checkpoint.read_config(recipe.model.ref)


def adopt_checkpoint(recipe: Recipe, ck: GPTQCheckpoint | None) -> Recipe:
    """For an imported GPTQ checkpoint: the recipe with ``quant.bits``, ``group_size`` and ``sym`` taken from the
    checkpoint's config (a different value set in the recipe is refused); other recipes unchanged."""
    if recipe.model.full_precision is not None and ck is None:
        raise RecipeError(f"model.full_precision = {recipe.model.full_precision!r}: only for a GPTQ checkpoint in "
                          f"model.ref, and {recipe.model.ref!r} is not one (no quantization_config.quant_method: gptq); "
                          f"drop model.full_precision to quantize {recipe.model.ref!r} here")
    if ck is None:
        return recipe
    found = {"bits": ck.bits, "group_size": ck.group_size, "sym": ck.sym, "method": "gptq"}
    for key, value in found.items():
        mine = getattr(recipe.quant, key)
        if key in recipe.quant.model_fields_set and mine != value:
            raise RecipeError(f"quant.{key} = {mine!r}, but the GPTQ checkpoint {recipe.model.ref!r} has {key} "
                              f"{value!r}; set quant.{key}: {value} or leave it out (an imported checkpoint keeps its own grid)")
    return recipe.model_copy(update={"quant": recipe.quant.model_copy(update=found)})


def check_import(recipe: Recipe, ck: GPTQCheckpoint) -> None:
    """What an imported GPTQ checkpoint allows, from its config and headers only: post-quantization training;
    without ``model.full_precision`` no metric that needs ``D``, no full-precision, RTN or GPTQ baseline, no
    distillation and no reconstruction; targets equal to the quantized projections; a full-precision model of the
    same shapes."""
    if recipe.train.mode != "post":
        raise RecipeError(f"train.mode = {recipe.train.mode}: {recipe.model.ref!r} is already quantized; an imported "
                          f"GPTQ checkpoint trains after quantization, train.mode: post")
    quantized = sorted({n.rsplit(".", 1)[-1] for n in gptq_checkpoint.quantized_layers(ck.folder)})
    gptq_checkpoint.check_all_scales(ck)
    if sorted(recipe.saliency.targets) != quantized:
        raise RecipeError(f"saliency.targets = {recipe.saliency.targets}, but the GPTQ checkpoint quantizes {quantized}; "
                          f"set saliency.targets: {quantized}")
    if recipe.model.full_precision is None:
        _check_without_full_precision(recipe)
    else:
        _check_same_model(recipe, ck)


def _check_without_full_precision(recipe: Recipe) -> None:
    """Without the full-precision weights: no ``D`` in the metric, no baseline or teacher that needs them."""
    sal = recipe.saliency
    if sal.resolved_metric().tau is not None and sal.keeps_columns():
        free = [n for n, m in PRESETS.items() if m.tau is None]
        raise RecipeError(f"saliency.metric = {sal.metric} scores D = W - deq(Q), which needs the "
                          f"full-precision weights: set model.full_precision to the model the checkpoint was "
                          f"quantized from, or use a metric without D: {', '.join(free)} (or custom with tau: null)")
    wants = [b for b in recipe.eval.baselines if b in ("fp", "rtn", "gptq")]
    if wants:
        raise RecipeError(f"eval.baselines = {recipe.eval.baselines}: {wants} need the full-precision model; set "
                          f"model.full_precision or drop them (the imported checkpoint is always a baseline)")
    if recipe.train.distill > 0:
        raise RecipeError(f"train.distill = {recipe.train.distill}: distillation needs the full-precision model "
                          f"as teacher; set model.full_precision or train.distill: 0")
    if recipe.reconstruct.enabled:
        what = "every weight from the full-precision weights" if recipe.reconstruct.train == "weights" else "each block"
        raise RecipeError(f"reconstruct.enabled = true (reconstruct.train = {recipe.reconstruct.train}): reconstruction "
                          f"trains {what} against the full-precision block; set model.full_precision or "
                          "reconstruct.enabled: false")


def _check_same_model(recipe: Recipe, ck: GPTQCheckpoint) -> None:
    """``model.full_precision`` is the model the checkpoint was quantized from (the same architecture and sizes)."""
    from transformers import AutoConfig

    fp = recipe.model.full_precision
    try:
        theirs = AutoConfig.from_pretrained(resolve_model(fp), trust_remote_code=recipe.model.trust_remote_code)
    except OSError as e:
        raise SourceError(unreachable("model.full_precision", fp, e)) from None
    ours = AutoConfig.from_pretrained(ck.folder, trust_remote_code=recipe.model.trust_remote_code)
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        if getattr(ours, key, None) != getattr(theirs, key, None):
            raise RecipeError(f"model.full_precision = {fp!r} has {key} {getattr(theirs, key, None)!r}, the GPTQ "
                              f"checkpoint {getattr(ours, key, None)!r}: name the model the checkpoint was quantized from")


def check_targets(recipe: Recipe, model: torch.nn.Module) -> None:
    """Targets, k and group size of ``recipe`` against a model (built on the meta device: ``plan.meta_model``)."""
    try:
        family = family_of(model)
    except UnsupportedModel as e:
        raise RecipeError(f"model.ref = {recipe.model.ref!r}: {e}") from None
    block = family.decoder_layers(model)[0]
    found = {n.rsplit(".", 1)[-1]: m for n, m in target_linears(block, recipe.saliency.targets).items()}
    missing = [t for t in recipe.saliency.targets if t not in found or t not in family.projections]
    if missing:
        raise RecipeError(f"saliency.targets = {recipe.saliency.targets}: a {family.name} model "
                          f"({model.config.model_type}) has no projection {missing}; set saliency.targets to some of "
                          f"{list(family.projections)}")
    for short, m in found.items():
        try:
            resolve_k(recipe.saliency.k_for(short), m.in_features)
        except ValueError as e:
            raise RecipeError(f"saliency.k for {short} = {recipe.saliency.k_for(short)}: {e}") from None
        g = recipe.quant.group_size
        if g != -1 and g > m.in_features:
            raise RecipeError(f"quant.group_size = {g}: larger than {short}'s {m.in_features} inputs; use -1 or less")


def model_shape(recipe: Recipe) -> Shape:
    """The model's config read once, built on the meta device once, its targets checked, measured for the plan."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model(recipe.model.ref),
                                            trust_remote_code=recipe.model.trust_remote_code)
    except OSError as e:
        raise SourceError(unreachable("model.ref", recipe.model.ref, e)) from None
    model = meta_model(config, recipe.model.trust_remote_code)
    check_targets(recipe, model)
    return shape_of(model, recipe)


def check_exports(recipe: Recipe, shape: Shape, ck: GPTQCheckpoint | None) -> None:
    """What each export format needs that the recipe alone does not show (``Format.check`` with the model's shape
    and an imported checkpoint's own grid)."""
    from .formats import FORMATS

    for f in recipe.export.formats:
        problem = FORMATS[f].check(recipe, shape, ck)
        if problem:
            raise RecipeError(problem)


def check_texts(recipe: Recipe) -> None:
    """Every text the run reads there and long enough for one window of its field's length."""
    tok = load_tokenizer(recipe.model.ref, recipe.model.trust_remote_code)
    t, c, e = recipe.train, recipe.calibration, recipe.eval
    texts = [("calibration.data", c.data, c.seq_len + 1)]
    if t.enabled and t.data_format == "text" and t.data != GENERATED:
        texts.append(("train.data", t.data, t.seq_len))
    texts.append(("eval.ppl_data", e.ppl_data, e.ppl_seq_len))
    for field, ref, need in texts:
        check_text(field, ref, tok, need)
    if t.enabled and t.data_format == "chat" and not len(records(t.data, "messages")):
        raise RecipeError(f"train.data = {t.data!r}: no conversations (records with 'messages') in it")


def check_inputs(recipe: Recipe, trust_remote_code: bool = False) -> Checked:
    """Everything a run reads, in the order a failure is cheapest to find: remote code confirmed, the model
    folders whole, an imported checkpoint's config and constraints, the targets and k against the model's
    shapes, every text there and long enough."""
    if recipe.model.trust_remote_code and not trust_remote_code:
        raise RecipeError("model.trust_remote_code = true runs code from the model's repository; confirm it "
                          "with --trust-remote-code on the command line")
    for field, ref in (("model.ref", recipe.model.ref), ("model.full_precision", recipe.model.full_precision)):
        if ref is not None:
            check_model_folder(field, ref)
    ck = imported_checkpoint(recipe)
    recipe = adopt_checkpoint(recipe, ck)
    if ck is not None:
        check_import(recipe, ck)
    shape = model_shape(recipe)
    check_exports(recipe, shape, ck)
    check_texts(recipe)
    return Checked(recipe, ck, shape)
