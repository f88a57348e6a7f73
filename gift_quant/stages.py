"""The pipeline's stages, each a function ``(run, tmp) -> manifest extras`` that writes its own files into
``tmp`` and declares, beside it, the recipe sections it reads (``Stage.reads``; the stage key hashes
them and those of every stage before it). The models come from the run's mode (``modes``); the LoRA
baseline is its own module (``lora``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import devices, exports, lora
from .checkpoint import load_quantized, save_quantized
from .data import calibration_windows, eval_windows, training_examples
from .distill import teacher_topk
from .evaluate import interval, window_nll, zero_shot
from .formats import FORMATS, by_score_rank
from .generate import generate_texts
from .integrity import write_sums
from .layers import merge_to_dense, salient_layers
from .modes import Mode, plain_quantized, quantize_with, quantized_layers, teacher
from .plan import plan_evaluate, plan_generate, plan_quantize, plan_reconstruct, plan_teacher, plan_train
from .quantize import quantize_rtn_plain
from .recipe import GENERATED, Recipe
from .reconstruct import block_norms, reconstruct_model
from .rundir import Run, Stage, piece_checker
from .sizes import bits_per_weight, storage
from .sources import load_tokenizer
from .train import check_resumable, train, trainable_state, windows_read

log = logging.getLogger(__name__)


def run_quantize(run: Run, tmp: Path) -> dict:
    """GPTQ/RTN with salient columns, or the import of a GPTQ checkpoint (the mode's ``quantize``)."""
    results = run.mode.quantize(run)
    save_quantized(results, tmp / "quantized.safetensors")
    errors = {n: {"error": float(qw.error), "error_salient": float(qw.error_salient)} for n, qw in results.items()
              if qw.error is not None}
    if errors:
        log.info("%s", error_summary(errors))
    return {"layers": len(results), "bits_per_weight": bits_per_weight(results), "gptq_error": errors}


def error_summary(errors: dict[str, dict[str, float]], worst: int = 3) -> str:
    """One line: GPTQ's summed loss, the share of the all-columns-quantized loss the salient columns avoid, and
    the layers with the largest loss (where a bad calibration or grid shows first)."""
    total = sum(e["error"] for e in errors.values())
    avoided = sum(e["error_salient"] for e in errors.values())
    top = sorted(errors, key=lambda n: -errors[n]["error"])[:worst]
    return (f"GPTQ error: {total:.4g} over {len(errors)} layers; the salient columns avoid "
            f"{avoided / max(total + avoided, 1e-30):.1%} of what quantizing them too would give; largest: "
            + ", ".join(f"{n} {errors[n]['error']:.4g}" for n in top))


def run_plain(run: Run, tmp: Path) -> dict:
    """The plain quantization (the recipe's grid, no salient columns), once a run: the GPTQ row of the report and
    the LoRA baseline's base read ``base.safetensors``."""
    model, tok = run.load_fp()
    base = quantize_with(run, model, tok, sal=run.recipe.saliency.plain())
    save_quantized(base, tmp / "base.safetensors")
    return {"layers": len(base), "bits_per_weight": bits_per_weight(base)}


def run_reconstruct(run: Run, tmp: Path) -> dict:
    """Each decoder block's salient columns (and scales) trained against the full-precision block
    (``reconstruct``); ``quantized.safetensors`` holds the quantize stage's layers with what it trained, and with
    ``reconstruct.norms`` ``norms.safetensors`` the blocks' norm weights."""
    r = run.recipe
    model, tok = run.load_fp()
    results = load_quantized(run.stage("quantize") / "quantized.safetensors")
    losses = reconstruct_model(model, calibration_windows(r, tok), results, r.reconstruct, run.dir / "reconstruct.work",
                               run.key("reconstruct"), r.seed, run.device)
    save_quantized(results, tmp / "quantized.safetensors")
    if r.reconstruct.norms:
        save_file(block_norms(model), tmp / "norms.safetensors")
    before, after = (sum(b[k] for b in losses) for k in ("before", "after"))
    log.info("reconstruction: summed block loss %.4g -> %.4g (%.1f%% of it left)", before, after,
             100 * after / max(before, 1e-30))
    return {"blocks": losses, "loss_before": before, "loss_after": after}


def run_generate(run: Run, tmp: Path) -> dict:
    """``tokens.safetensors``: the training text sampled from the full-precision model (``generate``), and
    ``samples.txt``, its first sequences decoded for a reader."""
    r = run.recipe
    model, tok = run.load_fp()
    model.to(run.device)
    t0 = time.time()
    ids = generate_texts(model, tok, r.generate, r.seed, run.dir / "generate.work", run.key("generate"))
    save_file({"ids": ids}, tmp / "tokens.safetensors")
    (tmp / "samples.txt").write_text("\n\n----\n\n".join(tok.decode(s) for s in ids[:3]))
    rate = ids.numel() / max(time.time() - t0, 1e-9)
    log.info("generated %d sequences of %d tokens (%.0f tokens/s)", *ids.shape, rate)
    return {"sequences": ids.shape[0], "tokens": ids.numel(), "tokens_per_s": rate}


def run_teacher(run: Run, tmp: Path) -> dict:
    """``teacher.safetensors``: the full-precision model's top ``train.distill_topk`` log-probabilities and token ids
    at every position of the training windows the train stage's steps will read (``distill``), once."""
    r, t = run.recipe, run.recipe.train
    model, tok = run.load_fp()
    model.to(run.device)
    ids, _ = training_examples(r, tok, run.dir)
    windows = windows_read(len(ids), t, int(os.environ.get("WORLD_SIZE", "1")), r.seed)
    size = teacher_topk(model, ids, windows, tmp / "teacher.safetensors", k=t.distill_topk,
                        temperature=t.distill_temperature, batch_size=t.micro_batch_size, work=run.dir / "teacher.work",
                        key=run.key("teacher"))
    log.info("teacher: top-%d of %d windows cached (%.1f MB)", t.distill_topk, len(windows), size / 1e6)
    return {"windows": len(windows), "of": len(ids), "k": t.distill_topk, "bytes": size}


def run_train(run: Run, tmp: Path, on_step: Callable | None = None) -> dict:
    """The salient columns trained (noise, distillation and schedule from ``train``); ``trainable.safetensors``
    holds them, ``salient_idx.safetensors`` the columns where this stage picked them (pre / fp)."""
    r = run.recipe
    model, tok, columns = run.mode.to_train(run)
    if columns is not None:
        save_file({n: i.contiguous() for n, i in columns.items()}, tmp / "salient_idx.safetensors")
    t = r.train
    if not t.enabled:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        return {"trained": False}
    ids, labels = training_examples(r, tok, run.dir)
    work = run.dir / "train.work"
    summary = train(model, ids, labels, t, work, seed=r.seed, teacher=teacher(run, len(ids)), on_step=on_step,
                    device=run.device, key=run.key("train"))
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    shutil.copy(work / "train_log.jsonl", tmp / "train_log.jsonl")
    return summary


def run_export(run: Run, tmp: Path) -> dict:
    """The recovered model in each of ``export.formats``, every folder with its ``SHA256SUMS``, and the sizes."""
    r = run.recipe
    model, tok = run.mode.recovered(run, trained=True)
    results = quantized_layers(run) if run.mode.quantizes else {}
    for name, qw in results.items():  # what training changed: the salient columns, and learned scales
        model.get_submodule(name).write_to(qw)
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in salient_layers(model).items()}
    out = {}
    merge_to_dense(model)  # the exporters take the non-quantized tensors from the model, the layers from results
    for fmt in FORMATS.values():  # the table's order: dense, which casts the model, last
        if fmt.name in r.export.formats:
            fmt.write(model, tok, results, tmp / fmt.name, r, run.fmt)
    for fmt in r.export.formats:
        write_sums(tmp / fmt)  # each folder checkable on its own after a copy (gift-quant verify FOLDER)
    if results:
        out["bits_per_weight_formula"] = bits_per_weight(results)
        log.info("bits per weight of the quantized linears, METHOD section 7 formula: %.3f", out["bits_per_weight_formula"])
    out["formats"] = {fmt: storage(tmp / fmt, shapes) for fmt in r.export.formats}
    (tmp / "sizes.json").write_text(json.dumps(out, indent=2))
    for fmt, st in out["formats"].items():
        log.info("%-10s %8.1f MB on disk, %.3f bits per weight in the quantized linears", fmt, st["bytes"] / 1e6,
                 st["linear_bits_per_weight"])
    return out


Scored = Callable[[], tuple[torch.nn.Module, str]]  # builds a model to score and says where it came from


def scored_models(run: Run) -> Iterator[tuple[str, Scored]]:
    """``(label, build)`` of every model the report scores, in the report's order; each is built only when scored.
    A model the run exports is scored from its export, loaded as a user loads it; the others in memory."""
    r, m = run.recipe, run.mode
    bits = grid_label(r)
    if "fp" in r.eval.baselines:
        yield "full precision", lambda: (run.load_fp()[0], IN_MEMORY)
    if "rtn" in r.eval.baselines:
        def rtn():
            model = run.load_fp()[0]
            quantize_rtn_plain(model, r.saliency, r.quant)
            return model, IN_MEMORY
        yield f"RTN {bits}", rtn
    if run.imported:
        yield m.quant_label(r, bits), lambda: (run.load_imported()[0], "model.ref (the imported checkpoint)")
    if "gptq" in r.eval.baselines and r.quant.method == "gptq":
        yield f"GPTQ {bits}", lambda: (plain_quantized(run)[0], IN_MEMORY + ", the plain stage's quantization")
    # without training the export is the model before it (reconstructed where the run reconstructs): that row is
    # scored from the export, as the trained one would be, and not again in memory
    untrained = m.quant_label(r, bits) + (" + salient columns" if r.saliency.keeps_columns() else " (no salient columns)")
    exported_untrained = m.quantizes and not r.train.enabled
    if "salient" in r.eval.baselines and m.quantizes and not (exported_untrained and "reconstruct" not in run.order):
        yield untrained, lambda: (m.recovered(run, trained=False, reconstructed=False)[0], IN_MEMORY)
    if "reconstruct" in run.order:
        untrained += " reconstructed"
        if not exported_untrained:
            yield untrained, lambda: (m.recovered(run, trained=False)[0], IN_MEMORY)
    if r.train.enabled:
        yield m.label.format(bits=bits), lambda: _exported(run)
    elif exported_untrained:
        yield untrained, lambda: _exported(run)
    if "lora" in run.order:
        yield f"{m.quant_label(r, bits)} + LoRA r={lora.rank(run)}", lambda: _lora_exported(run)


def grid_label(recipe) -> str:
    """The grid as the report's labels write it: W3, W3 g128."""
    return f"W{recipe.quant.bits}" + ("" if recipe.quant.group_size == -1 else f" g{recipe.quant.group_size}")


IN_MEMORY = "in memory (not exported)"


def _exported(run: Run) -> tuple[torch.nn.Module, str]:
    """The recovered model from the first of its exports that loads here; rebuilt from the stage files only
    where none does (the reason goes to the report)."""
    dtype, why = getattr(torch, run.recipe.model.dtype), "no export format"
    for fmt in by_score_rank(run.recipe.export.formats):
        folder = run.stage("export") / fmt.name
        try:
            return fmt.load(folder, dtype, run.device)[0], f"export/{fmt.name}"
        except Exception as e:  # noqa: BLE001 (a format that needs gptqmodel's kernels: they refuse what they lack)
            if not fmt.needs_kernel:
                raise
            why = _not_loaded(f"export/{fmt.name}", e)
    return run.mode.recovered(run, trained=True)[0], f"rebuilt in memory: {why}"


def _lora_exported(run: Run) -> tuple[torch.nn.Module, str]:
    """The LoRA baseline from its GPTQ + adapter export (transformers + gptqmodel + peft), else rebuilt."""
    try:
        dtype = getattr(torch, run.recipe.model.dtype)
        return exports.load(run.stage("lora") / "export", dtype, run.device)[0], "lora/export"
    except Exception as e:  # noqa: BLE001 (gptqmodel missing, or no kernel of it for this device and shape)
        return lora.reconstructed(run), f"rebuilt in memory: {_not_loaded('lora/export', e)}"


def _not_loaded(what: str, e: Exception) -> str:
    line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    log.warning("%s does not load here (%s: %s); scoring the model rebuilt from the stage files", what,
                type(e).__name__, line)
    return f"{what} did not load here ({type(e).__name__}: {line})"


def score(run: Run, tmp: Path, label: str, model, tok, windows: torch.Tensor, cache: Path | None = None) -> dict:
    """Perplexity (with its interval) and the lm-eval tasks of ``model`` on the run's device; GIFT-SW layers are
    merged into plain linears first (the same weights, without dequantizing them on every forward). ``cache``:
    lm-eval's answers of this model (``zero_shot``)."""
    e = run.recipe.eval
    merge_to_dense(model)
    model.to(run.device).eval()
    t0 = time.time()
    nll = window_nll(model, windows, e.batch_size, desc=f"ppl {label}")
    row = {"ppl": math.exp(float(nll.mean())), "ppl_ci95": interval(nll), "ppl_windows": len(nll)}
    log.info("%s: perplexity %.3f (95%% interval %.3f-%.3f)", label, row["ppl"], *row["ppl_ci95"])
    if e.tasks:
        summary, raw = zero_shot(model, tok, e.tasks, e.limit, e.batch_size, e.num_fewshot, cache=cache)
        row["tasks"] = summary
        (tmp / "lm_eval").mkdir(exist_ok=True)
        (tmp / "lm_eval" / f"{_file_name(label)}.json").write_text(json.dumps(raw, indent=2, default=str))
        log.info("%s: mean acc %.4f", label, summary["mean_acc"])
    row["eval_s"] = time.time() - t0
    model.to("cpu")
    return row


def _file_name(label: str) -> str:
    return label.replace(" ", "_")


def run_evaluate(run: Run, tmp: Path) -> dict:
    """Every model of ``scored_models`` scored on the same windows and tasks; ``results.json`` holds the rows.

    lm-eval's answers of each model wait in ``evaluate.work/<key>/``, so a killed evaluation resumes at the
    request it had reached (the perplexity, a minute at most, is measured again). The folder is named by the
    stage key, which hashes every section the scored models came from: answers of another recipe's models are
    never read, and are removed."""
    r = run.recipe
    tok = load_tokenizer(r.model.ref, r.model.trust_remote_code)  # each scored model is loaded where it is scored
    windows = eval_windows(r, tok)
    work, key = run.dir / "evaluate.work", run.key("evaluate")
    for stale in (p for p in work.glob("*") if p.name != key):
        log.info("evaluate: removing another recipe's cached answers %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    rows = {}
    for label, build in scored_models(run):
        model, source = build()
        cache = work / key / _file_name(label)
        rows[label] = {**score(run, tmp, label, model, tok, windows, cache), "source": source}
        del model
        devices.release(run.device)  # a loaded LoRA or accelerate model is held by a reference cycle
    (tmp / "results.json").write_text(json.dumps(rows, indent=2))
    return {"variants": list(rows)}


def run_report(run: Run, tmp: Path) -> dict:
    """``report.md`` with its plots, and the model card of every export (``export/<format>/README.md``)."""
    from .card import write_cards
    from .report import write_report

    path = write_report([run.dir], tmp)
    cards = write_cards(run.dir, run.mode.label.format(bits=grid_label(run.recipe)))
    return {"report": path.name, "cards": cards}


def _plain_wanted(recipe: Recipe, mode: Mode) -> bool:  # the plain quantization, once a run, where a baseline reads it
    return mode.needs_plain(recipe)


def _generate_wanted(recipe: Recipe, _mode: Mode) -> bool:  # the training text sampled from the model
    return recipe.train.enabled and recipe.train.data == GENERATED


def _teacher_wanted(recipe: Recipe, _mode: Mode) -> bool:  # the teacher's top-k, cached before training
    t = recipe.train
    return t.enabled and t.distill > 0 and t.distill_topk is not None


def _reconstruct_wanted(recipe: Recipe, _mode: Mode) -> bool:
    return recipe.reconstruct.enabled


QUANTIZE = Stage("quantize", ("calibration", "saliency", "quant"), run_quantize, plan=plan_quantize,
                 knob="calibration.batch_size (one batch's forward) or calibration.seq_len")
PLAIN = Stage("plain", ("calibration", "saliency", "quant"), run_plain, wanted=_plain_wanted)
RECONSTRUCT = Stage("reconstruct", ("calibration", "saliency", "quant", "reconstruct"), run_reconstruct,
                    piece_checker("reconstruct"), _reconstruct_wanted, plan_reconstruct,
                    "reconstruct.batch_size or calibration.n_samples (the block inputs held)")
GENERATE = Stage("generate", ("generate",), run_generate, piece_checker("generate"), _generate_wanted, plan_generate,
                 "generate.batch_size or generate.seq_len")
TEACHER = Stage("teacher", ("train",), run_teacher, piece_checker("teacher"), _teacher_wanted, plan_teacher,
                "train.micro_batch_size or train.seq_len")
TRAIN = Stage("train", ("calibration", "saliency", "quant", "train"), run_train, check_resumable, plan=plan_train,
              knob="train.gradient_checkpointing: true, a smaller train.micro_batch_size (raise train.grad_accum to "
                   "keep the batch), train.seq_len, or train.distill: 0 (no teacher)")
EXPORT = Stage("export", ("export",), run_export)
EVALUATE = Stage("evaluate", ("eval",), run_evaluate, plan=plan_evaluate, knob="eval.batch_size")
REPORT = Stage("report", (), run_report)
# every stage a train.mode may have, in order (the order stage keys depend on); a run has those its recipe wants
ORDER: dict[str, tuple[Stage, ...]] = {
    "post": (QUANTIZE, PLAIN, RECONSTRUCT, GENERATE, TEACHER, TRAIN, lora.STAGE, EXPORT, EVALUATE, REPORT),
    "pre": (GENERATE, TEACHER, TRAIN, QUANTIZE, PLAIN, EXPORT, EVALUATE, REPORT),
    "fp": (PLAIN, GENERATE, TEACHER, TRAIN, EXPORT, EVALUATE, REPORT),
}
STAGES: dict[str, Stage] = {s.name: s for order in ORDER.values() for s in order}
