"""The paper's training settings (``train.mode``) and the models each builds.

A mode says which model its training starts from, which model it quantizes, and which model it
evaluates and exports (the order of its stages is ``stages.ORDER``); the stages ask the run's mode (chosen once, in
``pipeline``) and never dispatch on the recipe themselves. Every builder returns ``(model, tokenizer)``
and writes nothing: the stage that calls it saves what belongs to it.
"""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from . import gptq_checkpoint
from .checkpoint import load_quantized
from .data import calibration_windows
from .distill import TopKTeacher, read_cache
from .gptq import compensate
from .gptq_checkpoint import GPTQCheckpoint
from .grid import QuantizedWeight
from .layers import learn_scales, merge_to_dense, wrap_full_precision, wrap_quantized
from .quantize import collect_stats, quantize_model, select_salient
from .recipe import Recipe, SaliencySpec
from .reconstruct import load_norms
from .rundir import Run


def quantize_with(run: Run, model, tok, sal: SaliencySpec | None = None,
                  salient: dict[str, torch.Tensor] | None = None) -> dict[str, QuantizedWeight]:
    """``quantize_model`` with the recipe's calibration data and grid (``sal`` overrides its saliency,
    ``salient`` fixes the columns)."""
    r = run.recipe
    c = r.calibration
    return quantize_model(model, calibration_windows(r, tok), sal or r.saliency, r.quant, c.batch_size, c.sequential,
                          c.true_sequential, salient, run.device)


def trained_columns(run: Run) -> dict[str, torch.Tensor]:
    """The salient column indices the train stage trained (pre / fp pick them there)."""
    return load_file(run.stage("train") / "salient_idx.safetensors")


def load_trained(model, run: Run) -> None:
    """What the train stage trained (salient columns; with ``train.learn_scales`` the grid scales, buffers of a
    model built for inference) copied into ``model``'s GIFT-SW layers."""
    state = load_file(run.stage("train") / "trainable.safetensors")
    tensors = model.state_dict()  # parameters and buffers, sharing their storage
    with torch.no_grad():
        for n, v in state.items():
            tensors[n].copy_(v)


def _from_reconstruct(run: Run, reconstructed: bool) -> bool:
    return reconstructed and "reconstruct" in run.order


def quantized_layers(run: Run, reconstructed: bool = True) -> dict[str, QuantizedWeight]:
    """The quantized layers the train stage starts from: the reconstruct stage's where it ran (unless
    ``reconstructed`` is False), else the quantize stage's."""
    stage = "reconstruct" if _from_reconstruct(run, reconstructed) else "quantize"
    return load_quantized(run.stage(stage) / "quantized.safetensors")


def reconstructed_norms(model, run: Run, reconstructed: bool = True) -> None:
    """The norm weights the reconstruct stage trained (``reconstruct.norms``) into ``model``, where it ran (unless
    ``reconstructed`` is False)."""
    path = run.stage("reconstruct") / "norms.safetensors"
    if _from_reconstruct(run, reconstructed) and path.exists():
        load_norms(model, path)


def teacher(run: Run, n_windows: int) -> torch.nn.Module | TopKTeacher | None:
    """What distillation compares with (``train.distill``): the teacher stage's top-k cache where it ran, else the
    full-precision model; None without distillation."""
    t = run.recipe.train
    if t.distill == 0:
        return None
    if "teacher" in run.order:
        return TopKTeacher(read_cache(run.stage("teacher") / "teacher.safetensors"), n_windows, t.distill_temperature)
    return run.load_fp()[0]


def noise_device(run: Run, noise: str) -> torch.device | None:
    """Where GIFT-SW layers are built: on the run's device when there is a noise grid to search (minutes
    a 7B model on a CPU), else where the weights are."""
    return run.device if noise != "none" else None


def full_precision_salient(run: Run, noise: str, trained: bool):
    """pre / fp: the full-precision model with GIFT-SW layers on the train stage's columns."""
    model, tok = run.load_fp()
    wrap_full_precision(model, trained_columns(run), noise, run.recipe.train.noise_bits, noise_device(run, noise))
    if trained:
        load_trained(model, run)
    return model, tok


def plain_quantized(run: Run):
    """``(model, tokenizer, layers)``: the full-precision model with the plain stage's quantization (no salient
    columns) in its linears."""
    model, tok = run.load_fp()
    layers = load_quantized(run.stage("plain") / "base.safetensors")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, qw in layers.items():
            modules[name].weight.copy_(qw.effective_weight())
    return model, tok, layers


def score_columns(run: Run, model, tok) -> dict[str, torch.Tensor]:
    """pre / fp: salient columns scored from the full-precision model's own statistics (no quantization error)."""
    r = run.recipe
    stats = collect_stats(model, calibration_windows(r, tok), r.saliency.targets, r.calibration.batch_size, run.device)
    modules = dict(model.named_modules())
    return {n: select_salient(modules[n].weight.detach().float(), st, r.saliency, r.quant, n.rsplit(".", 1)[-1])
            for n, st in stats.items()}


class Mode:
    """One of the paper's training settings: the model its training starts from, the model it quantizes, the model
    it evaluates and exports, and its name in the report (its stages and their order: ``stages.ORDER``).

    ``recovered(run, trained, noise, reconstructed)`` is the model with GIFT-SW layers, salient columns trained
    or not; ``noise`` sets up the recipe's training noise (its grid search costs time, so export and evaluation
    skip it); ``reconstructed=False``: untrained, the quantize stage's layers even where a reconstruct stage
    followed it (the report's untrained row)."""

    label = ""  # the trained model's row in the report ({bits}: e.g. W3 g128)
    quantizes = True  # False: nothing is quantized (no untrained-salient baseline, nothing to pack)

    def needs_plain(self, recipe: Recipe) -> bool:
        """Whether a baseline reads the plain quantization: the GPTQ row, or the LoRA baseline's base."""
        return ("gptq" in recipe.eval.baselines and recipe.quant.method == "gptq") or "lora" in recipe.eval.baselines

    def to_train(self, run: Run) -> tuple:
        """``(model, tokenizer, columns)``: the model the train stage trains; ``columns``, the salient indices
        the train stage picked and saves (None where the quantize stage picked them)."""
        raise NotImplementedError

    def quantize(self, run: Run) -> dict[str, QuantizedWeight]:
        """The quantize stage's layers: codes, grid and salient columns."""
        raise NotImplementedError

    def quant_label(self, recipe: Recipe, bits: str) -> str:
        """The plain quantization's name in the report (``bits``: e.g. W3 g128)."""
        return f"{recipe.quant.method.upper()} {bits}"

    def recovered(self, run: Run, trained: bool, noise: bool = False, reconstructed: bool = True):
        raise NotImplementedError


class Post(Mode):
    """Quantize (salient columns scored on the full-precision model), then train the salient columns with noise
    on the frozen quantized weights; with ``lora`` in ``eval.baselines`` the LoRA baseline trains beside it."""

    label = "GIFT-SW {bits}"

    def quantize(self, run: Run) -> dict[str, QuantizedWeight]:
        return quantize_with(run, *run.load_fp())

    def plain(self, run: Run):
        """``(model, tokenizer, layers)``: the plain quantization (no salient columns) that the LoRA baseline
        trains on, its dense weights in the model."""
        return plain_quantized(run)

    def to_train(self, run: Run) -> tuple:
        model, tok = self.recovered(run, trained=False, noise=True)
        if run.recipe.train.learn_scales:
            learn_scales(model)
        return model, tok, None

    def recovered(self, run: Run, trained: bool, noise: bool = False, reconstructed: bool = True):
        t = run.recipe.train
        kind = t.noise if noise else "none"
        model, tok = run.load_fp()
        results = quantized_layers(run, reconstructed)
        reconstructed_norms(model, run, reconstructed)
        wrap_quantized(model, results, kind, t.noise_bits, noise_device(run, kind))
        if trained:
            load_trained(model, run)
        return model, tok


class Pre(Mode):
    """Train the salient columns with noise on the full-precision weights, then quantize with exactly those
    columns kept (their trained values are what GPTQ keeps)."""

    label = "Pre-GIFT-SW {bits}"

    def to_train(self, run: Run) -> tuple:
        return _full_precision_to_train(run)

    def quantize(self, run: Run) -> dict[str, QuantizedWeight]:
        model, tok = full_precision_salient(run, "none", trained=True)
        merge_to_dense(model)  # the full-precision model with its trained columns
        return quantize_with(run, model, tok, salient=trained_columns(run))

    def recovered(self, run: Run, trained: bool, noise: bool = False, reconstructed: bool = True):
        """Trained: the quantize stage's result (it quantized the trained model); untrained: the
        full-precision model quantized with the same columns."""
        t = run.recipe.train
        kind = t.noise if noise else "none"
        model, tok = run.load_fp()
        results = (load_quantized(run.stage("quantize") / "quantized.safetensors") if trained
                   else quantize_with(run, model, tok, salient=trained_columns(run)))
        wrap_quantized(model, results, kind, t.noise_bits, noise_device(run, kind))
        return model, tok


class FullPrecision(Mode):
    """Full-precision GIFT-SW: nothing is quantized; the salient columns train with noise on the dense weights."""

    label = "GIFT-SW full precision"
    quantizes = False

    def to_train(self, run: Run) -> tuple:
        return _full_precision_to_train(run)

    def recovered(self, run: Run, trained: bool, noise: bool = False, reconstructed: bool = True):
        return full_precision_salient(run, run.recipe.train.noise if noise else "none", trained)


def _full_precision_to_train(run: Run) -> tuple:
    """pre / fp: the full-precision model with GIFT-SW layers on columns scored from its own statistics."""
    t = run.recipe.train
    model, tok = run.load_fp()
    columns = score_columns(run, model, tok)
    wrap_full_precision(model, columns, t.noise, t.noise_bits, noise_device(run, t.noise))
    return model, tok, columns


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

    def needs_plain(self, recipe: Recipe) -> bool:
        """The LoRA baseline trains on the imported checkpoint itself; only a GPTQ row quantizes plainly."""
        return "gptq" in recipe.eval.baselines and recipe.quant.method == "gptq"

    def plain(self, run: Run):
        return run.load_imported()

    def quant_label(self, recipe: Recipe, bits: str) -> str:
        return f"GPTQ {bits} (imported)"


MODES: dict[str, type[Mode]] = {"post": Post, "pre": Pre, "fp": FullPrecision}


def mode_for(recipe: Recipe, imported: GPTQCheckpoint | None) -> Mode:
    """The recipe's training setting; post-quantization on an imported checkpoint is ``Imported``."""
    if recipe.train.mode == "post" and imported is not None:
        return Imported()
    return MODES[recipe.train.mode]()
