"""The paper's baseline (METHOD section 6): a PEFT LoRA on the plain quantized model, without salient
columns, of the salient columns' trainable size, trained on the same data, steps and schedule as
GIFT-SW (its distillation included), without noise. It trains on the plain stage's quantization (a run quantizes plainly once; an
imported checkpoint is its own plain quantization) and writes a GPTQ v1 checkpoint with the trained
adapter beside it (``export/``, ``export/adapter``): the artifact the report scores.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .checkpoint import load_quantized, read_json
from .data import training_examples
from .gptq_lora_format import export_gptq_lora
from .modes import teacher
from .plan import plan_lora
from .recipe import Recipe
from .rundir import Run, Stage
from .train import check_resumable, train

log = logging.getLogger(__name__)


def lora_rank(salient: int, shapes: list[tuple[int, int]]) -> int:
    """LoRA rank whose trainable parameters ``r * sum(in + out)`` come closest to ``salient``."""
    return max(1, round(salient / sum(i + o for i, o in shapes)))


def run_lora(run: Run, tmp: Path) -> dict:
    from peft import LoraConfig, get_peft_model

    r = run.recipe
    model, tok, base = run.mode.plain(run)  # the model holds the dense quantized weights
    export_gptq_lora(model, tok, base, tmp / "export", fmt=run.fmt)
    salient = sum(qw.salient_idx.numel() * qw.codes.shape[0] for qw in load_quantized(
        run.stage("quantize") / "quantized.safetensors").values())
    rank = lora_rank(salient, [(qw.codes.shape[1], qw.codes.shape[0]) for qw in base.values()])
    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                             target_modules=r.saliency.targets))
    ids, labels = training_examples(r, tok, run.dir)
    work = run.dir / "lora.work"
    spec = r.train.model_copy(update={"noise": "none"})
    summary = train(model, ids, labels, spec, work, seed=r.seed, teacher=teacher(run, len(ids)), device=run.device,
                    key=run.key("lora"))
    model.save_pretrained(tmp / "export" / "adapter")
    shutil.copy(work / "train_log.jsonl", tmp / "train_log.jsonl")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA baseline: rank %d, %d trainable parameters (salient columns: %d)", rank, trainable, salient)
    return {"rank": rank, "trainable": trainable, "salient": salient, **summary}


def _wanted(recipe: Recipe, _mode) -> bool:
    return "lora" in recipe.eval.baselines


STAGE = Stage("lora", ("calibration", "saliency", "quant", "train"), run_lora, check_resumable, _wanted, plan_lora,
              knob="train.micro_batch_size, train.seq_len or train.gradient_checkpointing: true")


def rank(run: Run) -> int:
    """The rank the LoRA stage trained."""
    return read_json(run.stage("lora") / "manifest.json")["rank"]


def reconstructed(run: Run):
    """The LoRA baseline rebuilt in memory where its export cannot load here: the plain quantized weights with
    the trained adapter merged in."""
    from peft import PeftModel

    return PeftModel.from_pretrained(run.mode.plain(run)[0], run.stage("lora") / "export" / "adapter").merge_and_unload()
