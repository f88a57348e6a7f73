"""``gift-quant recover``: the staged pipeline of a recipe.

    quantize -> [plain] -> [reconstruct] -> [generate] -> [teacher] -> train -> [lora] -> export -> evaluate -> report
    (train.mode: post; ``stages.ORDER`` has pre / fp, each ``Stage.wanted`` when a bracketed one runs)

Each stage (``stages``, ``lora``) writes into ``<run>/<stage>/`` through a temporary folder renamed when
complete, with a ``manifest.json`` holding the hash of the recipe sections it depends on, package
versions and its wall time (``rundir``). A rerun skips stages whose manifest matches; a stage whose
inputs changed is reported, not silently reused (``--from STAGE`` redoes it and everything after). An
interrupted training resumes from its last checkpoint in ``<run>/train.work/``, and reconstruction, generation
and the teacher cache from their last finished piece in ``<run>/<stage>.work/``, evaluation from lm-eval's
answers cached there. This module is the
order alone: inputs checked (``checks``), the plan, the lock, the loop.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from . import devices, rundir
from .checks import adopt_checkpoint, check_inputs, imported_checkpoint
from .data import eval_windows
from .evaluate import perplexity
from .integrity import file_hashes
from .layers import merge_to_dense
from .modes import Mode, mode_for
from .recipe import Recipe, RecipeError
from .rundir import Run, Stage, atomic_dir
from .stages import ORDER, STAGES

log = logging.getLogger(__name__)

TRAINING = ("train", "lora")  # the stages that run on every process of a multi-process launch


def stages(recipe: Recipe) -> list[str]:
    """The names of the stages a run of ``recipe`` has, in order."""
    return [s.name for s in run_stages(recipe, mode_for(recipe, imported_checkpoint(recipe)))]


def run_stages(recipe: Recipe, mode: Mode) -> list[Stage]:
    """The stages a run of ``recipe`` has: those of its ``train.mode`` (``stages.ORDER``) that the recipe wants."""
    return [s for s in ORDER[recipe.train.mode] if s.wanted(recipe, mode)]


def plan_recipe(recipe: Recipe, device: torch.device, memory: int | None = None) -> dict:
    """The memory plan of a run of ``recipe`` on ``device`` (``gift-quant plan``; ``memory``: its capacity where the
    device is not on this machine), an imported checkpoint's grid adopted. Nothing loads."""
    from .plan import plan

    imported = imported_checkpoint(recipe)
    recipe = adopt_checkpoint(recipe, imported)
    return plan(recipe, device, run_stages(recipe, mode_for(recipe, imported)), memory=memory)


def open_run(recipe: Recipe, trust_remote_code: bool = False) -> Run:
    """Check every input, then the plan against the device, before anything loads; the run holds what the
    checks found."""
    checked = check_inputs(recipe, trust_remote_code)
    mode = mode_for(checked.recipe, checked.imported)
    run = Run(checked.recipe, run_stages(checked.recipe, mode), mode,
              devices.resolve(checked.recipe.device), checked.imported, checked.shape)
    _check_plan(run)
    return run


def recover(recipe: Recipe, from_stage: str | None = None, on_step: Callable | None = None,
            trust_remote_code: bool = False) -> Path:
    """Run every stage not yet done; return the report path."""
    run = open_run(recipe, trust_remote_code)
    if from_stage is not None and from_stage not in run.order:
        raise RecipeError(f"--from {from_stage}: train.mode={run.recipe.train.mode} has the stages {run.order}")
    # Under accelerate launch / torchrun every process runs this loop: the training stages run on
    # all of them (DDP), every other stage on the main process while the others wait.
    from accelerate import PartialState

    state = PartialState(cpu=run.device.type == "cpu")
    with run.lock() if state.is_main_process else nullcontext():
        if state.is_main_process:
            _prepare(run, from_stage)
        for name in run.order:
            state.wait_for_everyone()
            if run.is_done(name, full=False):
                log.info("stage %s: done, skipped", name)
                continue
            if name in TRAINING or state.is_main_process:
                _run_stage(run, name, state.is_main_process, **({"on_step": on_step} if name == "train" else {}))
    report = run.stage("report") / "report.md"
    log.info("report: %s", report)
    return report


def _prepare(run: Run, from_stage: str | None) -> None:
    """Under the lock: clear what ``--from`` redoes and what a killed run left, check every finished stage
    (recipe and files), and only then record the recipe."""
    _log_to_file(run.dir / "run.log")
    order = run.order
    if from_stage is not None:
        for name in order[order.index(from_stage):]:
            shutil.rmtree(run.stage(name), ignore_errors=True)
            shutil.rmtree(run.dir / f"{name}.work", ignore_errors=True)
    rundir.remove_leftovers(run.dir)
    for name in order:
        run.is_done(name)
    for stage in run.stages:
        if stage.check_work is not None and not run.is_done(stage.name, full=False):
            stage.check_work(run.dir / f"{stage.name}.work", run.key(stage.name))
    tmp = run.dir / "recipe.json.tmp"
    tmp.write_text(json.dumps(run.recipe.model_dump(mode="json"), indent=2))
    tmp.replace(run.dir / "recipe.json")


def _check_plan(run: Run) -> None:
    """Log the memory plan and refuse, before anything loads, a run that does not fit its device."""
    from .plan import check_fits, format_plan, plan

    result = plan(run.recipe, run.device, run.stages, run.shape)
    log.info("%s", format_plan(result))
    check_fits(result)


def _run_stage(run: Run, name: str, write: bool = True, **kwargs) -> None:
    """Run one stage into a temporary folder with its manifest; ``write`` renames it into place
    (other ranks of a multi-process run work in a scratch folder that is thrown away)."""
    log.info("stage %s: running", name)
    t0 = time.time()
    with atomic_dir(run.stage(name)) if write else tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with devices.peak(run.device, f"stage {name}") as used:
            try:
                extra = STAGES[name].run(run, tmp, **kwargs)
            finally:
                devices.release(run.device)
        extra = {**extra, "device": str(run.device), "peak_memory_bytes": used.peak,
                 "peak_memory_added_bytes": used.added}
        manifest = run.manifest(name, time.time() - t0, file_hashes(tmp), extra)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log.info("stage %s: finished in %.0f s", name, time.time() - t0)


def _log_to_file(path: Path) -> None:
    root = logging.getLogger("gift_quant")
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == str(path.resolve()) for h in root.handlers):
        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
        root.setLevel(logging.INFO)


def quantize(recipe: Recipe, trust_remote_code: bool = False) -> dict:
    """``gift-quant quantize``: only the quantize stage, then the perplexity of the result."""
    if recipe.train.mode != "post":
        raise RecipeError(f"train.mode={recipe.train.mode}: quantization comes after (pre) or without (fp) training; "
                          f"use gift-quant recover, or --set train.mode=post")
    run = open_run(recipe, trust_remote_code)
    with run.lock():
        rundir.remove_leftovers(run.dir)
        if not run.is_done("quantize"):
            _run_stage(run, "quantize")
    model, tok = run.mode.recovered(run, trained=False, reconstructed=False)  # this stage's result, not a later one's
    merge_to_dense(model)
    model.to(run.device)
    return {"run": str(run.dir), "perplexity": perplexity(model.eval(), eval_windows(run.recipe, tok),
                                                          run.recipe.eval.batch_size)}
