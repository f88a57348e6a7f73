"""GIFT-SW training: only the salient columns learn, on an accelerate loop.

The same code runs on one process or under ``accelerate launch`` / ``torchrun`` (DDP; gloo on
CPU). The global batch is ``micro_batch_size x grad_accum x world_size``; which examples a rank sees
at a step is a pure function of (seed, step, rank), so a resumed run sees the same data.

Checkpoints (every ``checkpoint_every`` steps and at the end) are accelerate's ``save_state`` folders
cut down to the trainable weights (safetensors), with optimizer and scheduler state, each rank's RNG
states and the ``key`` of what they were trained from (a hash of the recipe sections); they are
written into a temporary folder and renamed, and ``latest`` names the newest complete one. A resume
refuses a checkpoint of a different key before applying anything, and falls back to the previous one
when the newest is damaged (which restores every state again). A non-finite loss stops the run before
the optimizer step, so the last checkpoint stays the last good one.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import devices
from .distill import FullTeacher, TopKTeacher
from .layers import param_groups, salient_layers
from .recipe import TrainSpec
from .rundir import RunError

log = logging.getLogger(__name__)


SMALLEST_SCALE = torch.finfo(torch.float16).tiny  # the smallest scale an fp16 export still holds as positive


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step and the checkpoint kept."""


def batch_indices(n: int, step: int, micro: int, spec: TrainSpec, rank: int, world: int, seed: int) -> torch.Tensor:
    """Examples of (step, micro-batch, rank): a seeded permutation per epoch, read in order."""
    start = ((step * spec.grad_accum + micro) * world + rank) * spec.micro_batch_size
    idx = []
    for pos in range(start, start + spec.micro_batch_size):
        epoch, i = divmod(pos, n)
        idx.append(int(_epoch_order(n, seed, epoch)[i]))
    return torch.tensor(idx)


def windows_read(n: int, spec: TrainSpec, world: int, seed: int) -> torch.Tensor:
    """The examples (of ``n``) that ``spec.steps`` steps on ``world`` processes read, sorted (each once)."""
    read = [batch_indices(n, step, micro, spec, rank, world, seed)
            for step in range(spec.steps) for micro in range(spec.grad_accum) for rank in range(world)]
    return torch.cat(read).unique()


def examples_per_step(spec: TrainSpec, world: int) -> int:
    return spec.grad_accum * world * spec.micro_batch_size


def epochs(n: int, spec: TrainSpec, world: int) -> float:
    """How many times a run of ``spec`` on ``world`` processes reads its ``n`` examples. Above one the
    same text comes back, and a few million trainable weights learn it by heart: the training loss drops
    the step the second pass begins and the held-out perplexity stops following it."""
    return spec.steps * examples_per_step(spec, world) / n


@lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded order of one epoch, drawn once (not once per example)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))


# ----------------------------------------------------------------------------- checkpoints
# accelerate's save_state / load_state write and restore the optimizer, the scheduler and every rank's RNG
# (random, numpy, torch, cuda; read back with weights_only=True); the pre-save hook keeps only the
# trainable tensors of the model (the frozen codes would be GBs at 7B). ``state.json`` adds the step and
# the key; the folder is renamed into place only when complete.


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _trainable_only(models: list[nn.Module], weights: list[dict], _output_dir: str) -> None:
    """accelerate's pre-save hook: each model's state dict cut down to the parameters that train."""
    for i, model in enumerate(models):
        names = _trainable_names(model)
        weights[i] = {n: t for n, t in weights[i].items() if n.removeprefix("module.") in names}


def _trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters that train, without the ``module.`` prefix of a DDP wrapper (accelerate saves
    the unwrapped names)."""
    return {n.removeprefix("module.") for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(accelerator, folder: Path, step: int, key: str = "") -> None:
    """Atomic: everything goes to ``.tmp-<step>`` first; ``latest`` is updated after the rename."""
    tmp, final = folder / f".tmp-{step}", folder / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps({"step": step, "key": key}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (folder / "latest.tmp").write_text(final.name)
        os.replace(folder / "latest.tmp", folder / "latest")
        for old in sorted(folder.glob("step-*"), key=lambda p: int(p.name[5:]))[:-2]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _check_key(ck: Path, saved: str, key: str) -> None:
    if saved != key:
        raise RunError(f"{ck} was trained from a different recipe (train section or an earlier stage); "
                          f"rerun with --from train to start the training again")


def check_resumable(folder: Path, key: str) -> None:
    """Refuse a training folder whose newest checkpoint was trained from other recipe sections."""
    state = Path(folder) / "checkpoints" / "latest"
    if not state.exists():
        return
    ck = state.parent / state.read_text().strip()
    try:
        saved = json.loads((ck / "state.json").read_text()).get("key", "")
    except (OSError, json.JSONDecodeError):
        return  # damaged: load_checkpoint falls back to an older one and checks that
    _check_key(ck, saved, key)


def load_checkpoint(accelerator, folder: Path, model, key: str = "") -> int:
    """Restore the newest readable checkpoint (``accelerate.load_state``); return its step (0 when there is none).

    The one ``latest`` names is tried first, then the older ones; a damaged one is skipped with a
    warning (a later one restores every state again, so a half-applied damaged one leaves nothing
    behind). A checkpoint trained from other recipe sections (``key``) is refused before anything is
    applied, and one whose weights are not exactly the model's trainable tensors is treated as damaged."""
    from safetensors import safe_open

    pointer = folder / "latest"
    if not pointer.exists():
        return 0
    newest = folder / pointer.read_text().strip()
    older = sorted(folder.glob("step-*"), key=lambda p: int(p.name[5:]), reverse=True)
    trainable = _trainable_names(model)
    for ck in [newest] + [p for p in older if p != newest]:
        try:
            state = json.loads((ck / "state.json").read_text())
            _check_key(ck, state.get("key", ""), key)
            with safe_open(str(ck / "model.safetensors"), "pt") as f:
                if {k.removeprefix("module.") for k in f.keys()} != trainable:
                    raise ValueError(f"its weights are {len(set(f.keys()))} tensors, not the {len(trainable)} trainable ones")
            accelerator.load_state(str(ck), strict=False)
        except RunError:
            raise
        except Exception as e:  # noqa: BLE001 (any damage: truncated, missing, not parseable)
            log.warning("checkpoint %s is damaged (%s: %s); trying the previous one", ck, type(e).__name__, e)
            continue
        log.info("resumed from %s (step %d)", ck, state["step"])
        return state["step"]
    raise TrainingError(f"no readable checkpoint in {folder}; rerun with --from train")


# ----------------------------------------------------------------------------- loop

def noise_factor(spec: TrainSpec, step: int) -> float:
    return 1.0 if spec.noise_schedule == "constant" else max(0.0, 1.0 - step / spec.steps)


@dataclass
class _Loop:
    """What one training run holds between steps: the prepared model, optimizer and schedule, the data, where
    checkpoints and the log go."""

    accelerator: object
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: object
    params: list[nn.Parameter]
    scales: list[nn.Parameter]  # learned grid scales (train.learn_scales), kept positive after every step
    teacher: FullTeacher | TopKTeacher | None
    ids: torch.Tensor
    labels: torch.Tensor
    spec: TrainSpec
    seed: int
    out_dir: Path

    @property
    def ckpt(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.out_dir / "train_log.jsonl"

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def _setup(model: nn.Module, ids, labels, spec: TrainSpec, out_dir: Path, seed: int,
           teacher: nn.Module | TopKTeacher | None, device: torch.device | None) -> _Loop:
    """Accelerate (bf16 autocast where asked or on a GPU that has it; gloo DDP on CPUs), AdamW over what requires
    grad, the schedule, the teacher on the same device."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if on_gpu and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(device)
    bf16 = spec.precision == "bf16" or (spec.precision == "auto" and on_gpu and torch.cuda.is_bf16_supported())
    # cpu=True is what makes accelerate use gloo DDP when torchrun starts several CPU processes; the scheduler
    # counts global steps, so it steps once per optimizer step whatever the number of processes
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not on_gpu,
                              step_scheduler_with_optimizer=False)
    accelerator.register_save_state_pre_hook(_trainable_only)
    torch.manual_seed(seed)
    random.seed(seed)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    scales = param_groups(model)["scales"]  # their own learning rate; the columns (or a LoRA's) take the rest
    rest = [p for p in params if all(p is not q for q in scales)]
    groups = [{"params": rest}] + ([{"params": scales, "lr": spec.scales_lr, "weight_decay": 0.0}] if scales else [])
    opt = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    sched = get_scheduler(spec.schedule, opt, num_warmup_steps=math.ceil(spec.warmup_ratio * spec.steps),
                          num_training_steps=spec.steps)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    if isinstance(teacher, nn.Module):
        teacher = FullTeacher(teacher.to(accelerator.device, dtype=torch.bfloat16 if bf16 else None),
                              spec.distill_temperature)
    return _Loop(accelerator, model, opt, sched, params, scales, teacher, ids, labels, spec, seed, Path(out_dir))


def _resume(loop: _Loop, key: str) -> int:
    """The step to start from (the newest readable checkpoint of ``key``, else 0); the log keeps the lines up
    to it (the steps after it run again). Warns when the steps read the data more than once."""
    start = load_checkpoint(loop.accelerator, loop.ckpt, loop.model, key)
    spec, n = loop.spec, len(loop.ids)
    if loop.accelerator.is_main_process:
        loop.out_dir.mkdir(parents=True, exist_ok=True)
        kept = loop.log_path.read_text().splitlines() if start and loop.log_path.exists() else []
        loop.log_path.write_text("".join(x + "\n" for x in kept if x and json.loads(x)["step"] <= start))
        if epochs(n, spec, loop.world) > 1:
            log.warning("train: %d steps of %d examples read the %d examples of train.data %.2f times; repeated "
                        "text is memorized rather than recovered (benchmarks/RESULTS.md): add text to train.data "
                        "or lower train.steps", spec.steps, examples_per_step(spec, loop.world), n,
                        epochs(n, spec, loop.world))
    return start


def _step(loop: _Loop, step: int) -> float:
    """One optimizer step over ``grad_accum`` micro-batches (DDP syncs on the last); a non-finite loss on any
    process stops before the optimizer touches the weights. Returns the step's mean loss."""
    acc, spec = loop.accelerator, loop.spec
    step_loss = 0.0
    for micro in range(spec.grad_accum):
        idx = batch_indices(len(loop.ids), step, micro, spec, acc.process_index, loop.world, loop.seed)
        x, y = loop.ids[idx].to(acc.device), loop.labels[idx].to(acc.device)
        ctx = acc.no_sync(loop.model) if micro < spec.grad_accum - 1 else nullcontext()
        with ctx:
            with acc.autocast():  # the forward and the loss; backward outside it, as torch recommends
                out = loop.model(input_ids=x, labels=y, use_cache=False)
                loss = out.loss
                if loop.teacher is not None and spec.distill > 0:
                    loss = loss + spec.distill * loop.teacher.loss(out.logits, x, idx, y)
                del out  # the logits (in bf16 also accelerate's float32 copy) are not needed through backward
            acc.backward(loss / spec.grad_accum)
        step_loss += loss.item() / spec.grad_accum
    losses = acc.gather(torch.tensor([step_loss], device=acc.device))
    if not torch.isfinite(losses).all():
        last = (loop.ckpt / "latest").read_text().strip() if (loop.ckpt / "latest").exists() else "none"
        raise TrainingError(f"step {step + 1}: the loss is {losses.tolist()} (not finite); stopped before the "
                            f"optimizer step, last good checkpoint kept: {last}. Lower train.lr or set "
                            f"train.max_grad_norm, then rerun (it resumes from there)")
    if spec.max_grad_norm is not None:
        acc.clip_grad_norm_(loop.params, spec.max_grad_norm)
    loop.opt.step()
    with torch.no_grad():  # a step can push a small scale through zero; a grid's step stays positive (as fp16)
        for scale in loop.scales:
            scale.clamp_(min=SMALLEST_SCALE)
    loop.sched.step()
    loop.opt.zero_grad(set_to_none=True)
    devices.synchronize(acc.device)  # the optimizer's kernels belong to this step's time
    return step_loss


def _record(loop: _Loop, step: int, loss: float, seconds: float, bar) -> None:
    """The step's line in ``train_log.jsonl`` (every ``log_every`` steps) and the progress bar, on the main process."""
    spec = loop.spec
    rec = {"step": step + 1, "loss": loss, "lr": loop.sched.get_last_lr()[0],
           "tokens_per_s": spec.micro_batch_size * spec.grad_accum * loop.world * loop.ids.shape[1] / seconds,
           "s_per_step": seconds, "noise_factor": noise_factor(spec, step)}
    if loop.accelerator.is_main_process:
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{rec['lr']:.2e}")
        if (step + 1) % spec.log_every == 0:
            with open(loop.log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def train(
    model: nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor,
    spec: TrainSpec,
    out_dir: Path,
    seed: int = 0,
    teacher: nn.Module | TopKTeacher | None = None,
    on_step: Callable[[int, float], None] | None = None,
    device: torch.device | None = None,
    key: str = "",
    checkpoints: bool = True,
) -> dict:
    """Train the parameters of ``model`` that require grad; return timing and loss summary.

    ``device``: where to train (default: the GPU when there is one); under ``accelerate launch`` each
    process takes the GPU accelerate gives it. ``teacher``: a model (run beside every step; it goes to the same
    device, in bfloat16 when training in bf16) or the cached top-k of one (``distill.TopKTeacher``). ``key`` identifies what the model was built from; checkpoints of another key are
    refused on resume. ``checkpoints=False`` writes none (a benchmark's throwaway steps: at 7B the trainable
    state is GBs)."""
    loop = _setup(model, ids, labels, spec, out_dir, seed, teacher, device)
    start = _resume(loop, key)
    layers = list(salient_layers(loop.accelerator.unwrap_model(loop.model)).values())
    loop.model.train()
    bar = tqdm(range(start, spec.steps), desc="train", unit="step", disable=not loop.accelerator.is_main_process)
    t_start, loss = time.time(), float("nan")
    for step in bar:
        t0 = time.time()
        for layer in layers:
            layer.noise_factor = noise_factor(spec, step)
        loss = _step(loop, step)
        _record(loop, step, loss, time.time() - t0, bar)
        if checkpoints and ((step + 1) % spec.checkpoint_every == 0 or step + 1 == spec.steps):
            save_checkpoint(loop.accelerator, loop.ckpt, step + 1, key)
        if on_step is not None:
            on_step(step + 1, loss)
    loop.model.eval()
    wall = time.time() - t_start
    tokens = (spec.steps - start) * examples_per_step(spec, loop.world) * ids.shape[1]
    return {"final_loss": loss, "train_s": wall, "steps_run": spec.steps - start, "processes": loop.world,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0, "epochs": epochs(len(ids), spec, loop.world)}
