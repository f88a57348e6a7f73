"""The recipe: one validated config model for a whole run.

A recipe is YAML data (read by ``recipe_file``). Everything is checked before any model is loaded: unknown
keys, wrong types and impossible values fail with the field path, the bad value and what is accepted; rules
across sections are the ``Recipe``'s validators, each naming the fields and the fix.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import string
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .evaluate import PAPER_TASKS
from .grid import Grid
from .saliency import PRESETS
from .sources import C4, WIKI

from .families import LLAMA_PROJECTIONS, PROJECTIONS

ALL_PROJECTIONS = list(LLAMA_PROJECTIONS)  # the default targets: every projection of a Llama-shaped block


class RecipeError(ValueError):
    """A recipe that cannot run, with one line per problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's ``true`` is not the number 1: a bool is refused wherever a number is expected."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and bool not in (annotation, *typing.get_args(annotation)):
            raise ValueError(f"a boolean where {_kind(annotation)} is expected; write {_kind(annotation)}")
        return value

    def unread(self) -> set[str]:
        """Fields that this section's other settings leave unread: the stage keys hash them at their defaults, so
        changing one reruns nothing."""
        return set()


def _kind(annotation: Any) -> str:
    """What a field holds, in a user's words (no Python type names in an error line)."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return "a list"
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    args = set(typing.get_args(annotation)) - {type(None)} if origin is not None else {annotation}
    if len(args) == 1 and origin is not None:
        return _kind(args.pop())
    if args <= {int}:
        return "a whole number"
    if args <= {int, float}:
        return "a number"
    if args <= {str}:
        return "text"
    return "a value of the schema (gift_quant/recipe.py)"


class ModelSpec(_Section):
    ref: str = Field(description="hub id, local folder, .gguf file or pkg://package/path; a GPTQ checkpoint "
                     "(quant_method gptq) is imported as it is instead of being quantized")
    full_precision: str | None = Field(None, description="with a GPTQ checkpoint as ref: the model it was quantized "
                                       "from; its weights start the salient columns and give the metric D = W - deq(Q)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


class CalibrationSpec(_Section):
    data: str = C4
    n_samples: int = Field(128, ge=1)
    seq_len: int = Field(2048, ge=8)
    batch_size: int = Field(8, ge=1)
    sequential: bool = Field(True, description="block i+1 sees the outputs of quantized block i (GPTQ)")
    true_sequential: bool = Field(True, description="within a block, later layers see quantized earlier ones")


class SaliencySpec(_Section):
    metric: Literal["gift", "owq", "quik", "wanda", "custom"] = "gift"
    rho: float | None = Field(None, description="activation norm order: 1, 2 or inf (custom metric)")
    tau: float | None = Field(None, description="weight-perturbation norm order, >= 1 or inf (custom metric)")
    gamma: float | None = Field(None, description="exponent of the activation norm (custom metric)")
    k: int | float = Field(128, description="salient columns per layer: a count, or a fraction in (0, 1)")
    k_overrides: dict[str, int | float] = Field(default_factory=dict, description="per projection name")
    bits: Literal[2, 3, 4, 8] | None = Field(None, description="bits of Q inside the metric; default: quant bits")
    targets: list[str] = Field(default_factory=lambda: list(ALL_PROJECTIONS))

    @field_validator("k")
    @classmethod
    def _k(cls, v: int | float) -> int | float:
        if isinstance(v, float) and not 0 < v < 1:
            raise ValueError(f"got {v}; use a column count (int >= 0) or a fraction in (0, 1)")
        if isinstance(v, int) and v < 0:
            raise ValueError(f"got {v}; a column count must be >= 0")
        return v

    @field_validator("rho")
    @classmethod
    def _rho(cls, v: float | None) -> float | None:
        if v is not None and v not in (1, 2, math.inf):
            raise ValueError(f"got {v}; accepted: 1, 2 or .inf (streamed activation statistics)")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("empty; name at least one projection, e.g. " + ", ".join(ALL_PROJECTIONS))
        unknown = [t for t in v if t not in PROJECTIONS]
        if unknown:
            raise ValueError(f"{unknown} is no projection of a known family (gift_quant/families.py); the names are "
                             + ", ".join(PROJECTIONS))
        return v

    @model_validator(mode="after")
    def _custom(self) -> "SaliencySpec":
        given = {n: getattr(self, n) for n in ("rho", "tau", "gamma") if getattr(self, n) is not None}
        if self.metric == "custom" and ("rho" not in given or "gamma" not in given):
            raise ValueError("metric 'custom' needs rho and gamma (tau optional: none means activations only)")
        if self.metric != "custom" and given:
            raise ValueError(f"{sorted(given)} given with preset '{self.metric}'; set metric: custom to use them")
        unknown = set(self.k_overrides) - set(self.targets)
        if unknown:
            raise ValueError(f"k_overrides names {sorted(unknown)}, not in targets {self.targets}")
        return self

    def resolved_metric(self):
        from .saliency import Metric

        if self.metric == "custom":
            return Metric(rho=self.rho, tau=self.tau, gamma=self.gamma)
        return PRESETS[self.metric]

    def k_for(self, module_name: str) -> int | float:
        return self.k_overrides.get(module_name, self.k)

    def keeps_columns(self) -> bool:
        """Whether any target keeps salient columns (k = 0 everywhere is plain quantization: the report says so)."""
        return any(self.k_for(t) for t in self.targets)

    def plain(self) -> "SaliencySpec":
        """The same targets without salient columns (the plain GPTQ / RTN baselines)."""
        return self.model_copy(update={"k": 0, "k_overrides": {}})


class QuantSpec(_Section):
    method: Literal["gptq", "rtn"] = "gptq"
    bits: Literal[2, 3, 4, 8] = 3
    group_size: int = Field(-1, description="-1 for per-row, else a positive group of input columns")
    sym: bool = True
    sym_step: Literal["paper", "gptq"] = Field(
        "paper", description="symmetric step: alpha/(2^(b-1)-1) (paper) or 2 alpha/(2^b-1) (GPTQ tools)")
    act_order: bool = False
    dynamic_groups: bool = Field(
        True, description="with groups: fit each group's grid when GPTQ reaches it, on the already updated "
        "weights (the GPTQ tools' default), instead of on the original weights")
    damp: float = Field(0.01, gt=0, lt=1)
    block_size: int = Field(128, ge=1)
    clip_min: float = Field(0.2, gt=0, le=1, description="smallest clipping ratio of the grid search")
    clip_steps: int = Field(81, ge=1, description="ratios from 1.0 down to clip_min; 1 disables the search")

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"got {v}; use -1 (per row) or a positive number of columns such as 128")
        return v

    @model_validator(mode="after")
    def _order(self) -> "QuantSpec":
        if self.act_order and self.dynamic_groups and self.group_size != -1 and self.method == "gptq":
            raise ValueError("quant.act_order=true with quant.dynamic_groups=true: dynamic groups need the natural "
                             "column order; set quant.dynamic_groups=false (static groups) to use act_order")
        return self

    def grid(self) -> Grid:
        return Grid(self.bits, self.group_size, self.sym, self.sym_step, self.clip_min, self.clip_steps)


class ReconstructSpec(_Section):
    """Block-wise reconstruction after quantization (EfficientQAT's Block-AP, on the salient columns): each decoder
    block's salient columns (and with ``learn_scales`` its grid scales) trained so that the quantized block's
    output matches the full-precision block's on the calibration windows (mean squared error)."""

    enabled: bool = False
    inputs: Literal["quantized", "fp"] = Field(
        "quantized", description="what block i reads while it is trained: the outputs of the reconstructed quantized "
        "blocks before it (the errors it must undo at inference) or of the full-precision ones")
    epochs: int = Field(2, ge=1, description="passes over the calibration windows per block")
    batch_size: int = Field(4, ge=1, description="calibration windows per step")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the salient columns (cosine to 0 per block)")
    train: Literal["columns", "weights"] = Field(
        "columns", description="what trains: the salient columns (codes fixed), or every weight: "
        "each quantized column a latent full-precision weight rounded onto the grid in the forward pass (straight-"
        "through gradients) with the grid's scales and asymmetric zero points, the codes re-derived once the block "
        "is done (EfficientQAT's Block-AP, with the salient columns in full precision)")
    init: Literal["fp", "quantized"] = Field(
        "fp", description="train: weights: where the latent weights start: the full-precision weights (rounded onto "
        "the quantize stage's grid) or its result (GPTQ's or RTN's codes). fp by measurement at 3 bits: a latent "
        "weight on its grid point must travel half a step to change its code, and few steps a block leave GPTQ's "
        "codes as they are; at 2 bits, where round-to-nearest from fp starts far behind GPTQ, quantized measured "
        "better (benchmarks/RESULTS.md, issue 43)")
    weights_lr: float = Field(1e-5, gt=0, description="learning rate of the latent weights (train: weights)")
    learn_scales: bool = Field(False, description="also train the grid's per-row / per-group scales (train: columns; "
                                                   "train: weights always trains them)")
    scales_lr: float = Field(1e-5, gt=0, description="learning rate of the grid: scales, and zero points of an "
                                                      "asymmetric grid under train: weights")
    noise: Literal["gaussian", "uniform", "none"] = Field("none", description="noise on the frozen quantized weights "
                                                         "while a block trains (GIFT-SW's, on the train noise grid)")
    noise_bits: Literal[2, 3, 4, 8] = Field(4, description="grid whose step sets the noise")
    norms: bool = Field(False, description="also train the block's norm weights (through a float32 copy); they are "
                        "kept in reconstruct/norms.safetensors and go into every model built from the reconstruction")
    norms_lr: float = Field(1e-5, gt=0, description="learning rate of the norms (norms: true)")

    def unread(self) -> set[str]:
        unread = {"init", "weights_lr"} if self.train == "columns" else {"learn_scales"}
        if self.train == "columns" and not self.learn_scales:
            unread.add("scales_lr")
        unread |= set() if self.norms else {"norms_lr"}
        return unread | ({"noise_bits"} if self.noise == "none" else set())


GENERATED = "generated"  # train.data: text sampled from the full-precision model


class GenerateSpec(_Section):
    """Training text sampled from the full-precision model (``train.data: generated``; LLM-QAT)."""

    tokens: int = Field(300_000, ge=1, description="tokens to sample, in sequences of seq_len")
    seq_len: int = Field(2048, ge=8, description="tokens a sequence; training cuts each into train.seq_len windows")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (1: the model's own distribution)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (1: off)")
    batch_size: int = Field(16, ge=1, description="sequences sampled at once")


class TrainSpec(_Section):
    """GIFT-SW fine-tuning of the salient columns (METHOD sections 3 and 4)."""

    enabled: bool = True
    mode: Literal["post", "pre", "fp"] = Field(
        "post", description="post: quantize, then train the salient columns with noise on the frozen quantized "
        "weights; pre: train them with noise on the full-precision weights (set noise_bits to quant.bits, as the "
        "paper does), then quantize with those columns kept; fp: full-precision GIFT-SW, nothing quantized")
    noise: Literal["gaussian", "uniform", "none"] = "gaussian"
    noise_bits: Literal[2, 3, 4, 8] = Field(4, description="grid whose step sets the noise (paper: 4 after quantization)")
    noise_schedule: Literal["constant", "linear"] = Field("constant", description="linear: anneal the noise to 0")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    steps: int = Field(500, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(2048, ge=8)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    data: str = Field(C4, description="training text (a file, package path or hub data set), or generated: "
                      "sampled from the full-precision model (the generate section)")
    data_format: Literal["text", "chat"] = Field("text", description="text: packed windows; chat: "
                                                 "jsonl of {messages: [...]}, loss on assistant turns")
    distill: float = Field(0.0, ge=0, description="weight of KL(teacher || student) added to the label loss")
    distill_temperature: float = Field(1.0, gt=0)
    distill_topk: int | None = Field(None, ge=1, description="cache the teacher's k most likely tokens of every "
                                     "position once (the teacher stage) instead of running it beside every step; "
                                     "null: the full teacher")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 where the GPU supports it")
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global gradient norm to this; null: no clipping")
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(1, ge=1)
    learn_scales: bool = Field(False, description="also train the frozen grid's per-row / per-group scales (codes "
                               "unchanged: EfficientQAT's E2E-QP); every export writes the trained scales")
    scales_lr: float = Field(1e-5, gt=0, description="learning rate of the scales (EfficientQAT's E2E-QP: 1e-5 to "
                             "2e-5 at 7B); the salient columns keep lr")

    def unread(self) -> set[str]:
        unread = {"noise_bits", "noise_schedule"} if self.noise == "none" else set()
        if not self.learn_scales:
            unread.add("scales_lr")
        return unread | ({"distill_temperature"} if self.distill == 0 else set())


class ExportSpec(_Section):
    formats: list[str] = Field(default_factory=lambda: ["dense", "gift", "gptq_lora"],
                               description="the export formats (gift_quant.formats: dense, gift, gptq_lora, gptq4_lora)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float16"

    @field_validator("formats")
    @classmethod
    def _known(cls, formats: list[str]) -> list[str]:
        from .formats import FORMATS

        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"unknown format {unknown[0]!r}; the formats are "
                             + "; ".join(f"{f.name} ({f.summary})" for f in FORMATS.values()))
        return formats


class EvalSpec(_Section):
    ppl_data: str = WIKI
    ppl_seq_len: int = Field(2048, ge=8)
    ppl_max_windows: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    tasks: list[str] = Field(
        default_factory=lambda: list(PAPER_TASKS),
        description="lm-eval tasks (offline mirrors gq_*, or lm-eval's own names with hub access); [] for perplexity only")
    limit: int | None = Field(None, ge=1, description="items per task (None: the whole split)")
    num_fewshot: int | None = Field(None, ge=0)
    baselines: list[Literal["fp", "rtn", "gptq", "salient", "lora"]] = Field(
        default_factory=lambda: ["fp", "rtn", "gptq", "salient"],
        description="compared in the report: full precision, plain RTN, plain GPTQ, GPTQ + salient columns untrained, "
                    "and lora: a PEFT LoRA of the salient columns' size on the plain quantized model, trained like GIFT-SW")


class Recipe(_Section):
    name: str = "run"
    model: ModelSpec
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    saliency: SaliencySpec = Field(default_factory=SaliencySpec)
    quant: QuantSpec = Field(default_factory=QuantSpec)
    reconstruct: ReconstructSpec = Field(default_factory=ReconstructSpec)
    generate: GenerateSpec = Field(default_factory=GenerateSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    output_dir: str = "runs/{name}"
    seed: int = 0
    device: str = Field("auto", description="where every stage computes: auto (the GPU when there is one), cpu, "
                        "cuda or cuda:N; the model itself stays on the CPU while it is quantized, block by block")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v) or v.endswith("."):
            raise ValueError(f"got {v!r}; a run name is one folder name: letters, digits, '.', '_' and '-', "
                             f"starting with a letter or digit (no '/' or '..')")
        return v

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v: str) -> str:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as e:
            raise ValueError(f"got {v!r}: {e}; write braces only around {{name}}") from None
        unknown = fields - {"name"}
        if unknown:
            raise ValueError(f"got {v!r}: unknown placeholder {{{sorted(unknown)[0]}}}; the only one is {{name}}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"got {v!r}; use auto, cpu, cuda or cuda:N (N the GPU index)")

    @model_validator(mode="after")
    def _lora_baseline(self) -> "Recipe":
        if "lora" in self.eval.baselines and (self.train.mode != "post" or not self.train.enabled):
            raise ValueError(f"eval.baselines names lora, which trains beside post-quantization GIFT-SW; it needs "
                             f"train.mode: post and train.enabled: true (got {self.train.mode}, {self.train.enabled})")
        return self

    @model_validator(mode="after")
    def _something_to_score(self) -> "Recipe":
        if self.train.mode == "fp" and not self.train.enabled and not self.eval.baselines:
            raise ValueError("train.enabled = false with train.mode = fp and no eval.baselines: the run neither trains "
                             "nor quantizes and its report would score nothing; set train.enabled: true, train.mode: "
                             "post (to quantize), or name eval.baselines")
        return self

    @model_validator(mode="after")
    def _learned_scales(self) -> "Recipe":
        if self.train.learn_scales and self.train.mode != "post":
            raise ValueError(f"train.learn_scales = true, but train.mode = {self.train.mode} trains on the "
                             f"full-precision weights, which have no grid scales to learn; use train.mode: post or "
                             f"set train.learn_scales: false")
        return self

    @model_validator(mode="after")
    def _reconstruct(self) -> "Recipe":
        if self.reconstruct.enabled and self.train.mode != "post":
            raise ValueError(f"reconstruct.enabled = true, but train.mode = {self.train.mode} has no quantized model "
                             f"before training to reconstruct; use train.mode: post or set reconstruct.enabled: false")
        return self

    @model_validator(mode="after")
    def _topk_teacher(self) -> "Recipe":
        if self.train.distill_topk is not None and self.train.distill == 0:
            raise ValueError(f"train.distill_topk = {self.train.distill_topk} caches a teacher, but train.distill = 0 "
                             f"uses none; set train.distill (e.g. 1.0) or drop train.distill_topk")
        return self

    @model_validator(mode="after")
    def _generated(self) -> "Recipe":
        t = self.train
        if t.data == GENERATED and t.data_format != "text":
            raise ValueError(f"train.data = generated samples plain text, but train.data_format = {t.data_format}; "
                             f"set train.data_format: text")
        if t.data == GENERATED and t.seq_len > self.generate.seq_len:
            raise ValueError(f"train.seq_len = {t.seq_len} is longer than a generated sequence (generate.seq_len = "
                             f"{self.generate.seq_len}); set generate.seq_len: {t.seq_len} or a shorter train.seq_len")
        changed = [k for k, v in self.generate if v != GenerateSpec.model_fields[k].default]  # a dump parses back
        if t.data != GENERATED and changed:
            raise ValueError(f"generate.{changed[0]} is set, but train.data = {t.data!r} reads a text; set "
                             f"train.data: generated or drop the generate section")
        return self

    @model_validator(mode="after")
    def _exports(self) -> "Recipe":
        """Each format's own check of the recipe (``Format.check``), and a full-precision run writes no packing."""
        from .formats import FORMATS

        packed = [f for f in self.export.formats if FORMATS[f].holds_quantized]
        if self.train.mode == "fp" and packed:
            raise ValueError(f"train.mode=fp keeps every weight in full precision, so export.formats {packed} have "
                             f"nothing quantized to pack; use export.formats: [dense]")
        for f in self.export.formats:
            problem = FORMATS[f].check(self)
            if problem:
                raise ValueError(problem)
        return self

    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    def digest(self, *sections: str) -> str:
        """Hash of the whole recipe, or of the named sections only (what a pipeline stage depends on); a field its
        section leaves unread (``unread``) counts at its default."""
        data = self.model_dump(mode="json")
        for name, section in self:
            if isinstance(section, _Section) and section.unread():
                fields = type(section).model_fields
                defaults = {f: fields[f].get_default(call_default_factory=True) for f in section.unread()}
                data[name] = section.model_copy(update=defaults).model_dump(mode="json")
        if sections:
            data = {k: data[k] for k in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
