"""Run stages of a recipe: check, load, calibrate + quantize, evaluate, save.

Every stage output is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .calibrate import decoder_layers, target_linears
from .compress import quantize_model
from .evaluate import nonoverlapping_windows, perplexity
from .recipe import Recipe, RecipeError
from .saliency import resolve_k
from .sources import load_model, read_text, resolve_model, sample_windows, tokenize

log = logging.getLogger(__name__)


def check_against_model(recipe: Recipe) -> None:
    """Fail before loading weights if targets or k do not fit the model (built on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    where = resolve_model(recipe.model.ref)
    config = AutoConfig.from_pretrained(where, trust_remote_code=recipe.model.trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    linears = target_linears(decoder_layers(model)[0], recipe.saliency.targets)
    found = {n.rsplit(".", 1)[-1]: m for n, m in linears.items()}
    missing = [t for t in recipe.saliency.targets if t not in found]
    if missing:
        have = sorted({n.rsplit(".", 1)[-1] for n, m in decoder_layers(model)[0].named_modules()
                       if isinstance(m, torch.nn.Linear)})
        raise RecipeError(f"saliency.targets = {recipe.saliency.targets}: {config.model_type} model has no "
                          f"linear {missing}; its projections are {have}")
    for short, m in found.items():
        try:
            resolve_k(recipe.saliency.k_for(short), m.in_features)
        except ValueError as e:
            raise RecipeError(f"saliency.k for {short} = {recipe.saliency.k_for(short)}: {e}") from None
        g = recipe.quant.group_size
        if g != -1 and g > m.in_features:
            raise RecipeError(f"quant.group_size = {g}: larger than {short}'s {m.in_features} inputs; use -1 or less")


def atomic_dir(target: Path):
    """A temporary sibling folder to write into; ``commit(tmp)`` renames it to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))


def commit_dir(tmp: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def calibration_windows(recipe: Recipe, tokenizer) -> torch.Tensor:
    c = recipe.calibration
    return sample_windows(tokenize(tokenizer, read_text(c.data)), c.n_samples, c.seq_len, recipe.seed)


def eval_windows(recipe: Recipe, tokenizer) -> torch.Tensor:
    e = recipe.eval
    return nonoverlapping_windows(tokenize(tokenizer, read_text(e.ppl_data)), e.ppl_seq_len, e.ppl_max_windows)


def quantize(recipe: Recipe) -> dict:
    """``gift-quant quantize``: quantize, save the dense effective model, report perplexity."""
    check_against_model(recipe)
    run = recipe.run_dir()
    t0 = time.time()
    model, tok = load_model(recipe.model.ref, getattr(torch, recipe.model.dtype), recipe.model.trust_remote_code)
    calib = calibration_windows(recipe, tok)
    t1 = time.time()
    c = recipe.calibration
    results = quantize_model(model, calib, recipe.saliency, recipe.quant, c.batch_size, c.sequential, c.true_sequential)
    t2 = time.time()
    ppl = perplexity(model, eval_windows(recipe, tok), recipe.eval.batch_size)
    summary = {"recipe": recipe.digest(), "perplexity": ppl, "layers": len(results),
               "load_s": t1 - t0, "quantize_s": t2 - t1, "eval_s": time.time() - t2}
    target = run / "quantized"
    tmp = atomic_dir(target)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    commit_dir(tmp, target)
    log.info("wrote %s", target)
    return summary
