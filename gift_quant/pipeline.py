"""``gift-quant recover``: the staged pipeline of a recipe.

    quantize -> train -> export -> evaluate -> report

Each stage writes into ``<run>/<stage>/`` through a temporary folder renamed when complete, with a
``manifest.json`` holding the hash of the recipe sections it depends on, package versions and its
wall time. A rerun skips stages whose manifest matches; a stage whose inputs changed is reported,
not silently reused (``--from STAGE`` redoes it and everything after). An interrupted training
resumes from its last checkpoint in ``<run>/train.work/``.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import devices, gptq_checkpoint, rundir
from .calibrate import decoder_layers, target_linears
from .compress import collect_stats, quantize_model, quantize_rtn_plain, select_salient
from .evaluate import interval, nonoverlapping_windows, perplexity, window_nll, zero_shot
from .gptq import compensate
from .export import CheckpointError, bits_per_weight, export_gptq_lora, load_quantized, save_quantized, storage
from .gift_format import export_gift
from .integrity import check_hashes, file_hashes, read_json, write_sums
from .layers import merge_to_dense, salient_layers, wrap_full_precision, wrap_quantized
from .quantize import QuantizedWeight
from .recipe import Recipe, RecipeError, SaliencySpec
from .rundir import atomic_dir
from .saliency import resolve_k
from .sources import (SourceError, check_model_folder, check_text, load_model, load_tokenizer, read_records, read_text,
                      resolve_model, sample_windows, tokenize, unreachable)
from .train import chat_examples, check_resumable, text_examples, train, trainable_state

log = logging.getLogger(__name__)

STAGES = ["quantize", "train", "lora", "export", "evaluate", "report"]
# recipe sections a stage reads itself; it also depends on those of every stage before it
_READS = {"quantize": ("calibration", "saliency", "quant"), "train": ("calibration", "saliency", "quant", "train"),
          "lora": ("calibration", "saliency", "quant", "train"), "export": ("export",), "evaluate": ("eval",),
          "report": ()}
_SECTIONS = ("model", "calibration", "saliency", "quant", "seed", "train", "export", "eval")


def stages(recipe: Recipe) -> list[str]:
    """Stage order of the recipe's training mode (see ``Mode``)."""
    return mode(recipe).order(recipe)


def depends(recipe: Recipe, name: str) -> tuple[str, ...]:
    """Recipe sections stage ``name`` depends on: its own and those of the stages before it."""
    order = stages(recipe)
    used = {"model", "seed"}.union(*(_READS[s] for s in order[: order.index(name) + 1]))
    return tuple(sec for sec in _SECTIONS if sec in used)


def check_against_model(recipe: Recipe) -> None:
    """Fail before loading weights if targets or k do not fit the model (built on the meta device)."""
    from transformers import AutoConfig

    where = resolve_model(recipe.model.ref)
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=recipe.model.trust_remote_code)
    except OSError as e:
        raise SourceError(unreachable("model.ref", recipe.model.ref, e)) from None
    check_targets(recipe, config)


def check_targets(recipe: Recipe, config) -> None:
    """Targets and k of ``recipe`` against a model of ``config`` instantiated without weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    block = decoder_layers(model)[0]
    found = {n.rsplit(".", 1)[-1]: m for n, m in target_linears(block, recipe.saliency.targets).items()}
    missing = [t for t in recipe.saliency.targets if t not in found]
    if missing:
        have = sorted({n.rsplit(".", 1)[-1] for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)})
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


class Run:
    """A run folder and its stage manifests; ``imported``: the GPTQ checkpoint ``model.ref`` names, if it is one."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.dir = recipe.run_dir()
        self.device = devices.resolve(recipe.device)
        self.imported = gptq_checkpoint.read_config(recipe.model.ref) if is_imported(recipe) else None

    @property
    def fmt(self) -> str:
        """GPTQ layout of the packed exports: the imported checkpoint's (its tensors stay bit-identical), else v1."""
        return self.imported.fmt if self.imported else "gptq"

    def stage(self, name: str) -> Path:
        return self.dir / name

    def is_done(self, name: str, full: bool = True) -> bool:
        """Whether stage ``name`` finished with this recipe; with ``full``, its files are also checked against
        their recorded sha256 and a change of package versions since is logged."""
        manifest = self.stage(name) / "manifest.json"
        if not manifest.exists():
            return False
        saved = read_json(manifest)
        if saved.get("key") != self.recipe.digest(*depends(self.recipe, name)):
            raise RecipeError(
                f"stage '{name}' in {self.dir} was run with a different recipe (sections "
                f"{', '.join(depends(self.recipe, name))}); "
                f"rerun with --from {name} to redo it, or set output_dir to a new folder")
        if not full:
            return True
        problems = check_hashes(self.stage(name), saved.get("files", {}))
        if problems:
            raise CheckpointError(f"stage '{name}': {problems[0]}; rerun with --from {name}")
        now = rundir.versions()
        changed = {k: (v, now.get(k)) for k, v in saved.get("versions", {}).items() if now.get(k) != v}
        if changed:
            log.warning("stage %s was run with other package versions (then, now): %s", name, changed)
        return True

    def lock(self):
        return rundir.lock(self.dir)

    def manifest(self, name: str, seconds: float, files: dict[str, str], extra: dict | None = None) -> dict:
        return {"stage": name, "key": self.recipe.digest(*depends(self.recipe, name)), "seconds": seconds,
                "versions": rundir.versions(), "files": files, **(extra or {})}

    def load_fp(self):
        """``(model, tokenizer)`` the run starts from: the full-precision model; for an imported checkpoint,
        ``model.full_precision`` or, without it, the checkpoint dequantized."""
        r = self.recipe.model
        if self.imported and r.full_precision is None:
            return self.load_imported()[:2]
        return load_model(r.full_precision or r.ref, getattr(torch, r.dtype), r.trust_remote_code)

    def load_imported(self):
        """``(model, tokenizer, layers)`` of the imported checkpoint (see ``gptq_checkpoint.load``)."""
        r = self.recipe.model
        return gptq_checkpoint.load(self.imported, getattr(torch, r.dtype), r.trust_remote_code)


# ----------------------------------------------------------------------------- stages

def calibration_windows(recipe: Recipe, tokenizer) -> torch.Tensor:
    c = recipe.calibration
    return sample_windows(tokenize(tokenizer, read_text(c.data)), c.n_samples, c.seq_len, recipe.seed)


def eval_windows(recipe: Recipe, tokenizer) -> torch.Tensor:
    e = recipe.eval
    return nonoverlapping_windows(tokenize(tokenizer, read_text(e.ppl_data)), e.ppl_seq_len, e.ppl_max_windows)


def stage_quantize(run: Run, tmp: Path) -> dict:
    """GPTQ/RTN with salient columns, or the import of a GPTQ checkpoint (the mode's ``quantize``)."""
    results = mode(run.recipe).quantize(run)
    save_quantized(results, tmp / "quantized.safetensors")
    return {"layers": len(results), "bits_per_weight": bits_per_weight(results)}


def _quantize(run: Run, model, tok, sal: SaliencySpec | None = None, salient: dict[str, torch.Tensor] | None = None):
    """``quantize_model`` with the recipe's calibration data and mode (``sal`` overrides its saliency)."""
    r = run.recipe
    c = r.calibration
    return quantize_model(model, calibration_windows(r, tok), sal or r.saliency, r.quant, c.batch_size, c.sequential,
                          c.true_sequential, salient, run.device)


def _train_salient(run: Run) -> dict[str, torch.Tensor]:
    return load_file(run.stage("train") / "salient_idx.safetensors")


def _load_trained(model, run: Run) -> None:
    state = load_file(run.stage("train") / "trainable.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def _full_precision_model(run: Run, noise: str, trained: bool):
    """pre / fp: the full-precision model with GIFT-SW layers on the train stage's columns."""
    model, tok = run.load_fp()
    wrap_full_precision(model, _train_salient(run), noise, run.recipe.train.noise_bits, _noise_device(run, noise))
    if trained:
        _load_trained(model, run)
    return model, tok


def _noise_device(run: Run, noise: str) -> torch.device | None:
    """Where GIFT-SW layers are built: on the run's device when there is a noise grid to search (minutes
    a 7B model on a CPU), else where the weights are."""
    return run.device if noise != "none" else None


def _fp_salient_model(run: Run, tmp: Path):
    """pre / fp: the full-precision model with GIFT-SW layers on columns scored from its own statistics
    (the indices are saved for the later stages)."""
    r = run.recipe
    model, tok = run.load_fp()
    stats = collect_stats(model, calibration_windows(r, tok), r.saliency.targets, r.calibration.batch_size, run.device)
    modules = dict(model.named_modules())
    salient = {n: select_salient(modules[n].weight.detach().float(), st, r.saliency, r.quant, n.rsplit(".", 1)[-1])
               for n, st in stats.items()}
    save_file({n: i.contiguous() for n, i in salient.items()}, tmp / "salient_idx.safetensors")
    wrap_full_precision(model, salient, r.train.noise, r.train.noise_bits, _noise_device(run, r.train.noise))
    return model, tok


class Mode:
    """One of the paper's training settings (``train.mode``): the order of its stages, the model its training
    starts from, the model it quantizes, the model it evaluates and exports, and its name in the report.

    ``recovered(run, trained, noise)`` is the model with GIFT-SW layers, salient columns trained or not;
    ``noise`` sets up the recipe's training noise (its grid search costs time, so export and evaluation
    skip it)."""

    stages: tuple[str, ...] = ()
    label = ""  # the trained model's row in the report ({bits}: e.g. W3 g128)
    quantizes = True  # False: nothing is quantized (no untrained-salient baseline, nothing to pack)

    def order(self, recipe: Recipe) -> list[str]:
        return list(self.stages)

    def to_train(self, run: Run, tmp: Path):
        raise NotImplementedError

    def quantize(self, run: Run) -> dict[str, QuantizedWeight]:
        """The quantize stage's layers: codes, grid and salient columns."""
        raise NotImplementedError

    def quant_label(self, recipe: Recipe, bits: str) -> str:
        """The plain quantization's name in the report (``bits``: e.g. W3 g128)."""
        return f"{recipe.quant.method.upper()} {bits}"

    def recovered(self, run: Run, trained: bool, noise: bool = False):
        raise NotImplementedError


class Post(Mode):
    """Quantize (salient columns scored on the full-precision model), then train the salient columns with noise
    on the frozen quantized weights; with ``lora`` in ``eval.baselines`` the LoRA baseline trains beside it."""

    stages = ("quantize", "train", "lora", "export", "evaluate", "report")
    label = "GIFT-SW {bits}"

    def order(self, recipe: Recipe) -> list[str]:
        return [s for s in self.stages if s != "lora" or "lora" in recipe.eval.baselines]

    def quantize(self, run: Run) -> dict[str, QuantizedWeight]:
        return _quantize(run, *run.load_fp())

    def plain(self, run: Run):
        """``(model, tokenizer, layers)``: the plain quantization (no salient columns) that the LoRA baseline
        trains on, its dense weights in the model."""
        model, tok = run.load_fp()
        return model, tok, _quantize(run, model, tok, sal=_plain(run.recipe.saliency))

    def to_train(self, run: Run, tmp: Path):
        return self.recovered(run, trained=False, noise=True)

    def recovered(self, run: Run, trained: bool, noise: bool = False):
        t = run.recipe.train
        kind = t.noise if noise else "none"
        model, tok = run.load_fp()
        results = load_quantized(run.stage("quantize") / "quantized.safetensors")
        wrap_quantized(model, results, kind, t.noise_bits, _noise_device(run, kind))
        if trained:
            _load_trained(model, run)
        return model, tok


class Pre(Mode):
    """Train the salient columns with noise on the full-precision weights, then quantize with exactly those
    columns kept (their trained values are what GPTQ keeps)."""

    stages = ("train", "quantize", "export", "evaluate", "report")
    label = "Pre-GIFT-SW {bits}"

    def to_train(self, run: Run, tmp: Path):
        return _fp_salient_model(run, tmp)

    def quantize(self, run: Run) -> dict[str, QuantizedWeight]:
        model, tok = _full_precision_model(run, "none", trained=True)
        merge_to_dense(model)  # the full-precision model with its trained columns
        return _quantize(run, model, tok, salient=_train_salient(run))

    def recovered(self, run: Run, trained: bool, noise: bool = False):
        """Trained: the quantize stage's result (it quantized the trained model); untrained: the
        full-precision model quantized with the same columns."""
        t = run.recipe.train
        kind = t.noise if noise else "none"
        model, tok = run.load_fp()
        results = (load_quantized(run.stage("quantize") / "quantized.safetensors") if trained
                   else _quantize(run, model, tok, salient=_train_salient(run)))
        wrap_quantized(model, results, kind, t.noise_bits, _noise_device(run, kind))
        return model, tok


class FullPrecision(Mode):
    """Full-precision GIFT-SW: nothing is quantized; the salient columns train with noise on the dense weights."""

    stages = ("train", "export", "evaluate", "report")
    label = "GIFT-SW full precision"
    quantizes = False

    def to_train(self, run: Run, tmp: Path):
        return _fp_salient_model(run, tmp)

    def recovered(self, run: Run, trained: bool, noise: bool = False):
        return _full_precision_model(run, run.recipe.train.noise if noise else "none", trained)


class Imported(Post):
    """Post-quantization GIFT-SW on a GPTQ checkpoint made elsewhere (``model.ref``): the quantize stage reads
    its codes, scales, zeros and ``g_idx`` as they are and only picks the salient columns; training, export
    and evaluation are ``Post``'s. With ``model.full_precision`` the metric sees ``D = W - deq(Q)`` and the
    columns start from the full-precision weights corrected by least squares for the imported codes' error
    (``gptq.compensate``: what GPTQ would have pushed into them); without it only metrics without ``D``
    apply and the columns start from the dequantized checkpoint."""

    def quantize(self, run: Run) -> dict[str, QuantizedWeight]:
        r = run.recipe
        if r.model.full_precision:  # W and the activations from the original model, the codes beside it
            model, tok = run.load_fp()
            layers = gptq_checkpoint.read_layers(run.imported, model)
        else:
            model, tok, layers = run.load_imported()
        stats = collect_stats(model, calibration_windows(r, tok), r.saliency.targets, r.calibration.batch_size,
                              run.device)
        modules = dict(model.named_modules())
        for name, qw in layers.items():
            w, short = modules[name].weight.detach().float(), name.rsplit(".", 1)[-1]
            if r.model.full_precision:
                q = qw.dequantize_grid()
                qw.salient_idx = select_salient(w, stats[name], r.saliency, r.quant, short, w - q)
                qw.salient_weight = compensate(w, q, stats[name].hessian, qw.salient_idx, r.quant.damp)
            else:  # w is the dequantized checkpoint itself
                qw.salient_idx = select_salient(w, stats[name], r.saliency, r.quant, short)
                qw.salient_weight = w[:, qw.salient_idx].clone()
        return layers

    def plain(self, run: Run):
        return run.load_imported()

    def quant_label(self, recipe: Recipe, bits: str) -> str:
        return f"GPTQ {bits} (imported)"


MODES: dict[str, Mode] = {"post": Post(), "pre": Pre(), "fp": FullPrecision()}


def is_imported(recipe: Recipe) -> bool:
    """Whether ``model.ref`` is a GPTQ checkpoint to import rather than a model to quantize."""
    return gptq_checkpoint.quant_method(recipe.model.ref) == "gptq"


def mode(recipe: Recipe) -> Mode:
    if recipe.train.mode == "post" and is_imported(recipe):
        return Imported()
    return MODES[recipe.train.mode]


def stage_train(run: Run, tmp: Path, on_step: Callable | None = None) -> dict:
    r = run.recipe
    model, tok = mode(r).to_train(run, tmp)
    t = r.train
    if not t.enabled:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        return {"trained": False}
    ids, labels = training_examples(r, tok)
    teacher = run.load_fp()[0] if t.distill > 0 else None
    work = run.dir / "train.work"
    summary = train(model, ids, labels, t, work, seed=r.seed, teacher=teacher, on_step=on_step, device=run.device,
                    key=r.digest(*depends(r, "train")))
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    shutil.copy(work / "train_log.jsonl", tmp / "train_log.jsonl")
    return summary


def training_examples(recipe: Recipe, tok) -> tuple[torch.Tensor, torch.Tensor]:
    t = recipe.train
    if t.data_format == "chat":
        return chat_examples(tok, read_records(t.data, "messages"), t.seq_len)
    return text_examples(tokenize(tok, read_text(t.data)), t.seq_len)


def _plain(sal: SaliencySpec) -> SaliencySpec:
    """The same targets without salient columns (the plain GPTQ / RTN baselines)."""
    return sal.model_copy(update={"k": 0, "k_overrides": {}})


def lora_rank(salient: int, shapes: list[tuple[int, int]]) -> int:
    """LoRA rank whose trainable parameters ``r * sum(in + out)`` come closest to ``salient``."""
    return max(1, round(salient / sum(i + o for i, o in shapes)))


def stage_lora(run: Run, tmp: Path) -> dict:
    """The paper's baseline: a PEFT LoRA on the plain quantized model (no salient columns), of the salient
    columns' trainable size, trained on the same data, steps and schedule as GIFT-SW, without noise.

    Writes ``base.safetensors`` (the plain quantization, which evaluate's GPTQ baseline reuses) and
    ``export/`` (a GPTQ v1 checkpoint with the trained adapter in ``export/adapter``)."""
    from peft import LoraConfig, get_peft_model

    r = run.recipe
    model, tok, base = mode(r).plain(run)  # the model holds the dense quantized weights
    save_quantized(base, tmp / "base.safetensors")
    export_gptq_lora(model, tok, base, tmp / "export", fmt=run.fmt)
    salient = sum(qw.salient_idx.numel() * qw.codes.shape[0] for qw in load_quantized(
        run.stage("quantize") / "quantized.safetensors").values())
    rank = lora_rank(salient, [(qw.codes.shape[1], qw.codes.shape[0]) for qw in base.values()])
    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                             target_modules=r.saliency.targets))
    ids, labels = training_examples(r, tok)
    work = run.dir / "lora.work"
    spec = r.train.model_copy(update={"noise": "none", "distill": 0.0})
    summary = train(model, ids, labels, spec, work, seed=r.seed, device=run.device, key=r.digest(*depends(r, "lora")))
    model.save_pretrained(tmp / "export" / "adapter")
    shutil.copy(work / "train_log.jsonl", tmp / "train_log.jsonl")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA baseline: rank %d, %d trainable parameters (salient columns: %d)", rank, trainable, salient)
    return {"rank": rank, "trainable": trainable, "salient": salient, **summary}


def _lora_base(run: Run):
    """The model with the LoRA stage's plain quantization (no salient columns) in its linears."""
    model, tok = run.load_fp()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, qw in load_quantized(run.stage("lora") / "base.safetensors").items():
            modules[name].weight.copy_(qw.effective_weight())
    return model, tok


def _lora_model(run: Run):
    """The LoRA baseline for scoring: the plain quantized weights with the trained adapter merged in."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_lora_base(run)[0], run.stage("lora") / "export" / "adapter").merge_and_unload()
    rank = read_json(run.stage("lora") / "manifest.json")["rank"]
    return model, rank


def stage_export(run: Run, tmp: Path) -> dict:
    r = run.recipe
    model, tok = mode(r).recovered(run, trained=True)
    results = load_quantized(run.stage("quantize") / "quantized.safetensors") if mode(r).quantizes else {}
    for name, qw in results.items():
        qw.salient_weight = model.get_submodule(name).salient_weight.detach().clone()
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in salient_layers(model).items()}
    out = {}
    merge_to_dense(model)  # the exporters take the non-quantized tensors from the model, the layers from results
    if "gift" in r.export.formats:
        extra = {"saliency": r.saliency.model_dump(mode="json"), "quant": r.quant.model_dump(mode="json")}
        export_gift(model, tok, results, tmp / "gift", extra, run.fmt)
    if "gptq_lora" in r.export.formats:
        export_gptq_lora(model, tok, results, tmp / "gptq_lora", getattr(torch, r.export.dtype), run.fmt)
    if "dense" in r.export.formats:
        model.to(getattr(torch, r.export.dtype)).save_pretrained(tmp / "dense", safe_serialization=True)
        tok.save_pretrained(tmp / "dense")
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


def stage_evaluate(run: Run, tmp: Path) -> dict:
    r = run.recipe
    tok = load_tokenizer(r.model.ref, r.model.trust_remote_code)  # each scored model is loaded where it is scored
    windows = eval_windows(r, tok)
    rows: dict[str, dict] = {}

    def score(label: str, model) -> None:
        """Score ``model`` on the run's device; GIFT-SW layers are merged into plain linears first (the
        same weights, without dequantizing them on every forward)."""
        merge_to_dense(model)
        model.to(run.device).eval()
        t0 = time.time()
        nll = window_nll(model, windows, r.eval.batch_size, desc=f"ppl {label}")
        rows[label] = {"ppl": math.exp(float(nll.mean())), "ppl_ci95": interval(nll), "ppl_windows": len(nll)}
        log.info("%s: perplexity %.3f (95%% interval %.3f-%.3f)", label, rows[label]["ppl"], *rows[label]["ppl_ci95"])
        if r.eval.tasks:
            summary, raw = zero_shot(model, tok, r.eval.tasks, r.eval.limit, r.eval.batch_size, r.eval.num_fewshot)
            rows[label]["tasks"] = summary
            (tmp / "lm_eval").mkdir(exist_ok=True)
            (tmp / "lm_eval" / f"{label.replace(' ', '_')}.json").write_text(json.dumps(raw, indent=2, default=str))
            log.info("%s: mean acc %.4f", label, summary["mean_acc"])
        rows[label]["eval_s"] = time.time() - t0
        model.to("cpu")

    if "fp" in r.eval.baselines:
        score("full precision", run.load_fp()[0])
    bits = f"W{r.quant.bits}" + ("" if r.quant.group_size == -1 else f" g{r.quant.group_size}")
    if "rtn" in r.eval.baselines:
        model, _ = run.load_fp()
        quantize_rtn_plain(model, r.saliency, r.quant)
        score(f"RTN {bits}", model)
    m = mode(r)
    if run.imported:
        score(m.quant_label(r, bits), run.load_imported()[0])
    if "gptq" in r.eval.baselines and r.quant.method == "gptq":
        if "lora" in stages(r) and run.is_done("lora", full=False) and not run.imported:  # quantized there already
            model = _lora_base(run)[0]
        else:
            model = run.load_fp()[0]
            _quantize(run, model, tok, sal=_plain(r.saliency))
        score(f"GPTQ {bits}", model)
    if "salient" in r.eval.baselines and m.quantizes:
        score(f"{m.quant_label(r, bits)} + salient columns", m.recovered(run, trained=False)[0])
    if r.train.enabled:
        score(m.label.format(bits=bits), m.recovered(run, trained=True)[0])
    if "lora" in stages(r):
        model, rank = _lora_model(run)
        score(f"{m.quant_label(r, bits)} + LoRA r={rank}", model)
    (tmp / "results.json").write_text(json.dumps(rows, indent=2))
    return {"variants": list(rows)}


def stage_report(run: Run, tmp: Path) -> dict:
    from .report import write_report

    path = write_report([run.dir], tmp)
    return {"report": path.name}


STAGE_FNS = {"quantize": stage_quantize, "train": stage_train, "lora": stage_lora, "export": stage_export,
             "evaluate": stage_evaluate, "report": stage_report}


def adopt_checkpoint(recipe: Recipe) -> Recipe:
    """For an imported GPTQ checkpoint: the recipe with ``quant.bits``, ``group_size`` and ``sym`` taken from the
    checkpoint's config (a different value set in the recipe is refused); other recipes unchanged."""
    if recipe.model.full_precision is not None and not is_imported(recipe):
        raise RecipeError(f"model.full_precision = {recipe.model.full_precision!r}: only for a GPTQ checkpoint in "
                          f"model.ref, and {recipe.model.ref!r} is not one (no quantization_config.quant_method: gptq); "
                          f"drop model.full_precision to quantize {recipe.model.ref!r} here")
    if not is_imported(recipe):
        return recipe
    ck = gptq_checkpoint.read_config(recipe.model.ref)
    found = {"bits": ck.bits, "group_size": ck.group_size, "sym": ck.sym, "method": "gptq"}
    for key, value in found.items():
        mine = getattr(recipe.quant, key)
        if key in recipe.quant.model_fields_set and mine != value:
            raise RecipeError(f"quant.{key} = {mine!r}, but the GPTQ checkpoint {recipe.model.ref!r} has {key} "
                              f"{value!r}; set quant.{key}: {value} or leave it out (an imported checkpoint keeps its own grid)")
    return recipe.model_copy(update={"quant": recipe.quant.model_copy(update=found)})


def check_import(recipe: Recipe) -> None:
    """What an imported GPTQ checkpoint allows, from its config and headers only: post-quantization training;
    without ``model.full_precision`` no metric that needs ``D``, no full-precision, RTN or GPTQ baseline and no
    distillation; targets equal to the quantized projections; a full-precision model of the same shapes."""
    from transformers import AutoConfig

    from .saliency import PRESETS

    ck = gptq_checkpoint.read_config(recipe.model.ref)
    if recipe.train.mode != "post":
        raise RecipeError(f"train.mode = {recipe.train.mode}: {recipe.model.ref!r} is already quantized; an imported "
                          f"GPTQ checkpoint trains after quantization, train.mode: post")
    quantized = sorted({n.rsplit(".", 1)[-1] for n in gptq_checkpoint.quantized_layers(ck.folder)})
    gptq_checkpoint.check_all_scales(ck)
    if sorted(recipe.saliency.targets) != quantized:
        raise RecipeError(f"saliency.targets = {recipe.saliency.targets}, but the GPTQ checkpoint quantizes {quantized}; "
                          f"set saliency.targets: {quantized}")
    fp = recipe.model.full_precision
    if fp is None:
        sal = recipe.saliency
        if sal.resolved_metric().tau is not None and any(float(v) > 0 for v in (sal.k, *sal.k_overrides.values())):
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
        return
    try:
        theirs = AutoConfig.from_pretrained(resolve_model(fp), trust_remote_code=recipe.model.trust_remote_code)
    except OSError as e:
        raise SourceError(unreachable("model.full_precision", fp, e)) from None
    ours = AutoConfig.from_pretrained(ck.folder, trust_remote_code=recipe.model.trust_remote_code)
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        if getattr(ours, key, None) != getattr(theirs, key, None):
            raise RecipeError(f"model.full_precision = {fp!r} has {key} {getattr(theirs, key, None)!r}, the GPTQ "
                              f"checkpoint {getattr(ours, key, None)!r}: name the model the checkpoint was quantized from")


def check_inputs(recipe: Recipe, trust_remote_code: bool = False) -> None:
    """Everything a run reads, checked before any weights load: remote code confirmed, the model
    reachable, an imported checkpoint's constraints, the targets and k against its shapes, every data
    file there and long enough for a window."""
    if recipe.model.trust_remote_code and not trust_remote_code:
        raise RecipeError("model.trust_remote_code = true runs code from the model's repository; confirm it "
                          "with --trust-remote-code on the command line")
    for field, ref in (("model.ref", recipe.model.ref), ("model.full_precision", recipe.model.full_precision)):
        if ref is not None:
            check_model_folder(field, ref)
    if is_imported(recipe):
        check_import(recipe)
    check_against_model(recipe)
    tok = load_tokenizer(recipe.model.ref, recipe.model.trust_remote_code)
    t, c, e = recipe.train, recipe.calibration, recipe.eval
    texts = [("calibration.data", c.data, c.seq_len + 1)]
    if recipe.train.enabled and t.data_format == "text":
        texts.append(("train.data", t.data, t.seq_len))
    texts.append(("eval.ppl_data", e.ppl_data, e.ppl_seq_len))
    for field, ref, need in texts:
        check_text(field, ref, tok, need)
    if recipe.train.enabled and t.data_format == "chat" and not read_records(t.data, "messages"):
        raise RecipeError(f"train.data = {t.data!r}: no conversations (records with 'messages') in it")


def recover(recipe: Recipe, from_stage: str | None = None, on_step: Callable | None = None,
            trust_remote_code: bool = False) -> Path:
    """Run every stage not yet done; return the report path."""
    recipe = adopt_checkpoint(recipe)
    check_inputs(recipe, trust_remote_code)
    run = Run(recipe)
    _check_plan(run)
    order = stages(recipe)
    if from_stage is not None and from_stage not in order:
        raise RecipeError(f"--from {from_stage}: train.mode={recipe.train.mode} has the stages {order}")
    # Under accelerate launch / torchrun every process runs this loop: the training stage runs on
    # all of them (DDP), every other stage on the main process while the others wait.
    from accelerate import PartialState

    state = PartialState(cpu=run.device.type == "cpu")
    with run.lock() if state.is_main_process else nullcontext():
        if state.is_main_process:
            _prepare(run, order, from_stage)
        for name in order:
            state.wait_for_everyone()
            if run.is_done(name, full=False):
                log.info("stage %s: done, skipped", name)
                continue
            if name in ("train", "lora") or state.is_main_process:
                _run_stage(run, name, state.is_main_process, **({"on_step": on_step} if name == "train" else {}))
    report = run.stage("report") / "report.md"
    log.info("report: %s", report)
    return report


def _prepare(run: Run, order: list[str], from_stage: str | None) -> None:
    """Under the lock: clear what ``--from`` redoes and what a killed run left, check every finished stage
    (recipe and files), and only then record the recipe."""
    _log_to_file(run.dir / "run.log")
    if from_stage is not None:
        for name in order[order.index(from_stage):]:
            shutil.rmtree(run.stage(name), ignore_errors=True)
        for stage in ("train", "lora"):
            if stage in order and order.index(from_stage) <= order.index(stage):
                shutil.rmtree(run.dir / f"{stage}.work", ignore_errors=True)
    rundir.remove_leftovers(run.dir)
    for name in order:
        run.is_done(name)
    for stage in ("train", "lora"):
        if stage in order and not run.is_done(stage, full=False):
            check_resumable(run.dir / f"{stage}.work", run.recipe.digest(*depends(run.recipe, stage)))
    tmp = run.dir / "recipe.json.tmp"
    tmp.write_text(json.dumps(run.recipe.model_dump(mode="json"), indent=2))
    tmp.replace(run.dir / "recipe.json")


def _check_plan(run: Run) -> None:
    """Log the memory plan and refuse, before anything loads, a run that does not fit its device."""
    from .plan import check_fits, format_plan, plan

    result = plan(run.recipe, run.device)
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
            extra = STAGE_FNS[name](run, tmp, **kwargs)
        extra = {**extra, "device": str(run.device), "peak_memory_bytes": used.peak}
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
    if not isinstance(mode(recipe), Post):
        raise RecipeError(f"train.mode={recipe.train.mode}: quantization comes after (pre) or without (fp) training; "
                          f"use gift-quant recover, or --set train.mode=post")
    recipe = adopt_checkpoint(recipe)
    check_inputs(recipe, trust_remote_code)
    run = Run(recipe)
    _check_plan(run)
    with run.lock():
        rundir.remove_leftovers(run.dir)
        if not run.is_done("quantize"):
            _run_stage(run, "quantize")
    model, tok = Post().recovered(run, trained=False)
    merge_to_dense(model)
    model.to(run.device)
    return {"run": str(run.dir), "perplexity": perplexity(model.eval(), eval_windows(recipe, tok), recipe.eval.batch_size)}
