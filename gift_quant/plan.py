"""The memory plan: each stage's expected peak memory, from the model's config alone, before anything loads.

A 7B model that does not fit should be refused in the first second with the arithmetic, not an hour
in with a CUDA out-of-memory. The model is built on the meta device from its config (no weights),
which gives the shapes; the formulas below turn them into bytes. They count tensors, as
``torch.cuda.max_memory_allocated`` does; the CUDA context and allocator slack are the ``reserve``
kept free on a GPU.

Notation: ``L`` blocks, hidden ``h``, key/value width ``kv``, MLP width ``i``, vocabulary ``V``;
``b x s`` tokens a forward; ``c`` bytes of the compute dtype, ``p`` of the model's stored dtype.

* quantize (one block on the device at a time): the block's weights ``p * params(block)``; the block
  inputs and outputs of all calibration windows ``2 * n * s * h * p`` when they fit (else one batch
  of them, the rest waits in pinned CPU memory); the float32 input statistics of the largest layer
  ``4 * in^2`` (true-sequential measures one input group at a time); then the larger of what quantizing the
  largest layer takes (the grid's clipping search, a chunk of rows at a time, beside the weight's float32 copies;
  GPTQ's column loop, one dampened, permuted copy of the Hessian factored in place beside the updated weight, the
  codes and the updates, ``4 * in^2 + 11 * out * in``; the dense weight rebuilt from the codes: ``gptq_bytes``)
  and one batch's forward ``b * s * (4h + 2kv + 3i) * c``; and the outputs of the
  block's finished layers served to its later passes, ``n * s * p * sum(out)`` over every layer but the last,
  as far as the budget of ``calibrate.served_budget`` goes (what the block inputs leave of half the memory).
* train: integer codes, one byte a weight; grid parameters ``8 * out * groups``; every salient weight
  16 bytes (float32 weight, gradient and AdamW's two moments); the other parameters (embeddings,
  norms, lm_head) ``p`` each; a distillation teacher ``2 * params`` in bf16 (its own dtype on the CPU), or the
  top-k cache's batch. Activations kept: ``b * s * ((3h + 2kv + 3i) * c + 8h)`` a block (GIFT-SW layers keep
  only their inputs' salient columns, the fused attention no probabilities (eager attention adds them), the norms
  their float32 input; learned
  scales add each linear's whole input) for all ``L`` blocks, or with gradient checkpointing only the block inputs
  ``L * b * s * h * p`` (the residual stream stays in the model's dtype under autocast). Beside them the larger of
  two phases that are not alive at once: the loss's logits ``b * s * V * 13`` (the float32 log-softmax, its
  gradient and the shifted copy; ``LOGIT_BYTES``), plus ``b * s * V * 20`` for a full teacher or ``4`` for the
  top-k cache; and the backward's, a block's gradients or the largest frozen weight rebuilt (``out * in * c``
  dequantized, twice that with its noise; with learned scales ``8 * out * in``, the weight's float32 gradient and
  float codes), or with checkpointing the recomputed block beside that weight or 1.6 blocks (the recomputed block
  and its gradients). Measured against the stage at hidden 128 to 768 by ``benchmarks/bench_plan.py``.
* evaluate: the merged model ``p * params``, one batch's forward and its logits ``b * s * V * p`` (``b`` capped
  as ``perplexity`` caps it), and one window's float32 log-softmax ``s * V * 4``, beside its float32 copy where the
  logits are narrower (``s * V * 8`` then).
* reconstruct, generate and teacher: see their functions.
* On the CPU the block-by-block stages (quantize, reconstruct) hold the whole model beside their block. There a
  checkpoint stored in the run's dtype is memory-mapped: what the stages read of it in place (the model, or its
  embeddings, norms and head beside the quantized weights) is page cache, not counted (``_loaded``); the weights
  quantize and reconstruct write back into its blocks are (``_model_on_cpu``), and so is every layer's result,
  which they keep on the CPU (``_results_on_cpu``). Every stage there also holds its tokenizer
  (``TOKENIZER_BYTES`` a vocabulary entry); on a GPU both are the host's, not counted.
* Where the model computes attention eagerly (no fused kernel: Gemma 2's softcapping), attention probabilities
  ``b * heads * s^2 * c`` a block are added to every forward, and kept for the backward (``_attention``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .calibrate import inputs_fit, served_budget
from .devices import GiB, capacity
from .grid import search_bytes
from .recipe import Recipe, RecipeError
from .saliency import resolve_k

if TYPE_CHECKING:
    from .rundir import Stage

OTHER = "other parameters (embeddings, norms, head)"
CUDA_RESERVE = GiB  # CUDA context, kernels and allocator slack, kept free on a GPU
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Host memory a loaded fast tokenizer holds a vocabulary entry (its Rust vocabulary, merges and caches), counted where
# a stage runs on the CPU: measured 290-400 once loaded (``benchmarks/bench_plan.py --tables tokenizer``), SmolLM2's
# 350 in the quantize stage once it has tokenized the calibration text (RESULTS.md).
TOKENIZER_BYTES = 400


@dataclass(frozen=True)
class Linear:
    name: str  # projection name, e.g. q_proj
    n_in: int
    n_out: int
    k: int  # salient columns

    @property
    def weights(self) -> int:
        return self.n_in * self.n_out


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a model: one block's targeted linears and the sizes around them."""

    blocks: int
    hidden: int
    kv: int
    intermediate: int
    heads: int
    vocab: int
    block_params: int
    other_params: int  # embeddings, norms, lm_head (once when tied)
    linears: tuple[Linear, ...]
    stored: str | None = None  # the checkpoint's dtype as its config says (None: it does not say)
    attention: str = "sdpa"  # how the model computes attention (transformers' ``_attn_implementation``)

    @property
    def params(self) -> int:
        return self.blocks * self.block_params + self.other_params

    @property
    def targeted(self) -> int:
        """Weights of one block's targeted linears."""
        return sum(lin.weights for lin in self.linears)

    @property
    def salient(self) -> int:
        """Salient weights (full-precision columns) of one block's targeted linears."""
        return sum(lin.k * lin.n_out for lin in self.linears)


def shipped_configs() -> dict[str, Path]:
    """Hub id -> config JSON shipped with the package (``gift_quant/configs``), so a plan works offline."""
    folder = resources.files("gift_quant") / "configs"
    out = {}
    for f in folder.iterdir():
        if f.name.endswith(".json"):
            out[json.loads(f.read_text())["_hub_id"]] = Path(str(f))
    return out


def model_config(recipe: Recipe):
    """The recipe model's config: from its folder or file when local, else the shipped copy of a hub id,
    else the hub (or its cache)."""
    from transformers import AutoConfig, PretrainedConfig

    from .sources import local_or_package, resolve_model

    ref = recipe.model.ref
    shipped = shipped_configs()
    if local_or_package(ref) is None and ref in shipped:
        data = {k: v for k, v in json.loads(shipped[ref].read_text()).items() if not k.startswith("_")}
        cls = type(AutoConfig.for_model(data["model_type"]))
        return cls.from_dict(data) if cls is not PretrainedConfig else PretrainedConfig.from_dict(data)
    return AutoConfig.from_pretrained(resolve_model(ref), trust_remote_code=recipe.model.trust_remote_code)


def meta_model(config, trust_remote_code: bool = False):
    """The model of ``config`` built on the meta device: every shape, no weights (the input checks and the
    plan measure this one copy)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # not done on the meta device; tied embeddings are one tensor
    return model


def shape_of(model, recipe: Recipe) -> Shape:
    """A model built by ``meta_model``, measured (its targets and k checked already: ``checks.check_targets``)."""
    from .calibrate import target_linears
    from .families import decoder_layers

    blocks = decoder_layers(model)
    block = blocks[0]
    linears = []
    for name, m in target_linears(block, recipe.saliency.targets).items():
        short = name.rsplit(".", 1)[-1]
        k = resolve_k(recipe.saliency.k_for(short), m.in_features)
        linears.append(Linear(short, m.in_features, m.out_features, k))
    by = {lin.name: lin for lin in linears}
    block_params = sum(p.numel() for p in block.parameters())
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once
    text = getattr(model.config, "text_config", model.config)
    hidden = text.hidden_size
    return Shape(
        blocks=len(blocks), hidden=hidden, kv=by["k_proj"].n_out if "k_proj" in by else hidden,
        intermediate=getattr(text, "intermediate_size", 4 * hidden), heads=text.num_attention_heads,
        vocab=model.get_output_embeddings().out_features, block_params=block_params,
        other_params=total - len(blocks) * block_params, linears=tuple(linears), stored=_stored(model.config),
        attention=getattr(model.config, "_attn_implementation", None) or "eager")


def _stored(config) -> str | None:
    dtype = getattr(config, "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def _compute_bytes(recipe: Recipe, device: torch.device) -> int:
    """Bytes of the training compute dtype: bf16 on a GPU unless fp32 is asked for."""
    p = recipe.train.precision
    if p == "bf16" or (p == "auto" and device.type == "cuda"):
        return 2
    return _BYTES[recipe.model.dtype]


def _attention(shape: Shape, b: int, s: int, c: int) -> int:
    """Attention probabilities, ``b * heads * s^2 * c`` a block, where the model computes attention eagerly (Gemma
    2's softcapping); torch's fused kernels (``sdpa``, on a GPU and on the CPU alike) keep none
    (``benchmarks/bench_plan.py --tables reconstruct``: a Llama block's step holds no term in ``s^2`` on the CPU)."""
    return b * shape.heads * s * s * c if shape.attention == "eager" else 0


# Each stage's plan, ``plan_<stage>(shape, recipe, device, memory) -> {part: bytes}``, is its ``Stage.plan``;
# ``memory`` is the device's capacity, which decides where block inputs wait (the others do not need it).


def _forward(shape: Shape, b: int, s: int, c: int) -> int:
    """One batch's forward through one block without gradients: ``b * s * (4h + 2kv + 3i) * c`` and attention."""
    return b * s * (4 * shape.hidden + 2 * shape.kv + 3 * shape.intermediate) * c + _attention(shape, b, s, c)


def plan_quantize(shape: Shape, recipe: Recipe, device: torch.device, memory: int | None = None) -> dict[str, int]:
    """``memory``: the device's capacity in bytes (default: measured), which decides where block inputs wait. On
    the CPU the whole model waits in the same memory."""
    cal, p = recipe.calibration, _BYTES[recipe.model.dtype]
    b, s, h = cal.batch_size, cal.seq_len, shape.hidden
    inputs = 2 * cal.n_samples * s * h * p
    batch = 2 * b * s * h * p
    memory = capacity(device) if memory is None else memory
    fits = inputs_fit(inputs // 2, device, shape.block_params * p, memory)
    # the outputs of every layer but the last (the last group's serve no later pass), as far as the budget goes;
    # on the CPU the run measures its budget with the model already loaded
    left = memory - (shape.params * p if device.type == "cpu" else 0)
    served = min(cal.n_samples * s * p * sum(lin.n_out for lin in shape.linears[:-1]),
                 served_budget(inputs // 2, device, shape.block_params * p, left)) if fits else 0
    biggest_in = max(lin.n_in for lin in shape.linears)
    gptq = max(gptq_bytes(lin, recipe) for lin in shape.linears)
    forward = _forward(shape, b, s, p)
    return {**_loaded(shape, recipe, device, "block weights", shape.block_params),
            "block inputs and outputs" + ("" if fits else " (one batch; the rest in pinned CPU memory)"):
                inputs if fits else batch,
            "input statistics (float32)": 4 * biggest_in**2 + 16 * biggest_in,
            "GPTQ or one batch forward, the larger": max(gptq, forward),
            "final layers' outputs served to later passes": served,
            # at the last block's last layer, every weight before it written back
            **_model_on_cpu(shape, recipe, device, shape.targeted * shape.blocks - shape.linears[-1].weights),
            **_results_on_cpu(shape, recipe, device)}


def gptq_bytes(lin: Linear, recipe: Recipe) -> int:
    """What quantizing one linear takes (``quantize._quantize_into``), the largest of its three phases: first the
    grid's clipping search over every row and group (``grid.search_bytes``) beside the weight's float32 copies (the
    weight and its masked copy, 8 bytes a weight; in groups 14: padded into groups, masked, and the mask); then
    GPTQ's column loop: one dampened, permuted copy of the Hessian, factored in place, beside the weight in its
    processing order, its codes and a float32 temporary of its size (the first lazy block's update of the later
    columns; at the end, in groups, the grid expanded to every column, and the codes put back in order), ``4 *
    in^2`` and 10 bytes a weight, 11 in groups (measured 9.0 and 10.2); last the dense weight rebuilt from the codes
    to be written back (``QuantizedWeight.effective_weight``: the codes as floats, the grid expanded to every
    column in groups, their difference and product, 22 bytes a weight, 14 per row; measured 21.2 and 13.0). A
    weight stored narrower than float32 adds its float32 copy to the first two (``benchmarks/bench_plan.py --tables
    gptq``)."""
    q = recipe.quant
    g = lin.n_in if q.group_size == -1 else min(q.group_size, lin.n_in)
    rows = lin.n_out * math.ceil(lin.n_in / g)
    weight = lin.weights
    per_row = rows == lin.n_out
    loop = 4 * lin.n_in**2 + (10 if per_row else 11) * weight
    search = (8 if per_row else 14) * weight + search_bytes(rows, g, q.grid())
    rebuilt = (14 if per_row else 22) * weight
    copy = 4 * weight if _BYTES[recipe.model.dtype] < 4 else 0  # ``quantize_linear``'s, freed when GPTQ returns
    return max(loop + copy, search + copy, rebuilt)


def _loaded(shape: Shape, recipe: Recipe, device: torch.device, part: str, n_params: int) -> dict[str, int]:
    """``part``, ``n_params`` parameters as loaded from the checkpoint, unless transformers maps the file into
    memory (a checkpoint stored in the run's dtype, on the CPU): then what a stage reads of them are the page
    cache's pages, which the kernel drops and reads again as memory runs short: nothing allocated
    (``benchmarks/bench_plan.py --tables stages``, its allocated column). A config that names no dtype counts."""
    if device.type == "cpu" and shape.stored == recipe.model.dtype:
        return {}
    return {part: n_params * _BYTES[recipe.model.dtype]}


def _model_on_cpu(shape: Shape, recipe: Recipe, device: torch.device, written: int) -> dict[str, int]:
    """A block-by-block stage's whole model, where it waits on the device itself (the CPU). From a memory-mapped
    checkpoint only the targeted linears' weights that the stage has written back at its peak, ``written`` of them
    (quantize its dequantized codes, reconstruct the merged blocks), each page copied on write."""
    if device.type != "cpu":
        return {}
    return _loaded(shape, recipe, device, "model on the CPU", shape.params) or {
        "the blocks' weights written back (copied from the mapped checkpoint)": written * _BYTES[recipe.model.dtype]}


def plan_reconstruct(shape: Shape, recipe: Recipe, device: torch.device, memory: int | None = None) -> dict[str, int]:
    """One block with GIFT-SW layers, the block inputs, targets and quantized inputs (where they fit), the salient
    columns' AdamW state, and the largest of three phases not alive at once: one batch's forward and backward, the
    largest frozen weight rebuilt with its noise, and after the block's training the quantized blocks' next inputs
    (its outputs, one more set) beside one batch's forward. What the forward keeps for the backward, a token:
    ``(4h + 2kv + 6i) * p``, the loss's float32 copies where ``p`` is narrower (``(4 - p) * h``), and with ``train:
    weights`` each linear's whole input (``2h * p``) (``benchmarks/bench_plan.py --tables reconstruct``)."""
    cal, rec, p = recipe.calibration, recipe.reconstruct, _BYTES[recipe.model.dtype]
    b, s, h = rec.batch_size, cal.seq_len, shape.hidden
    one = cal.n_samples * s * h * p  # a set of block inputs: where they wait is decided for four (the stage's rule)
    fits = inputs_fit(2 * one, device, shape.block_params * p, capacity(device) if memory is None else memory)
    # alive at the step: fp inputs and targets, and the quantized blocks' inputs (their outputs come after it)
    sets = 3 if rec.inputs == "quantized" else 2
    token = (4 * h + 2 * shape.kv + 6 * shape.intermediate + (2 * h if rec.train == "weights" else 0)) * p + (4 - p) * h
    step = b * s * token + _attention(shape, b, s, p)
    rebuilt = 7 * max(lin.weights for lin in shape.linears) * p
    on_device = one if fits else b * s * h * p  # a set, or one batch of it
    after = on_device + _forward(shape, b, s, p) if sets == 3 else 0
    return {**_loaded(shape, recipe, device, "block weights (full precision)", shape.block_params),
            # on the CPU every layer's codes wait beside the block (``_results_on_cpu``)
            **({} if device.type == "cpu" else {"block codes (uint8)": shape.block_params}),
            "block inputs, targets" + (" and quantized inputs" if sets == 3 else "")
            + ("" if fits else " (one batch; the rest in pinned CPU memory)"): sets * on_device,
            "the larger phase: a batch's step, a weight rebuilt, or the next quantized inputs":
                max(step, rebuilt, after),
            "salient weights, gradients, AdamW moments (float32)": 16 * shape.salient, **_latent_weights(shape, recipe),
            # at the last block's step, every block before it merged
            **_model_on_cpu(shape, recipe, device, shape.targeted * (shape.blocks - 1)),
            **_results_on_cpu(shape, recipe, device)}


def _latent_weights(shape: Shape, recipe: Recipe) -> dict[str, int]:
    """``reconstruct.train: weights``: every linear of the block a float32 latent weight with its gradient and AdamW's
    two moments (16 bytes an entry, the grid's parameters alike), and what the backward keeps of the fake-quantized
    weights (``grid.fake_quantize_ste``): 3 float32 tensors a weight entry (``benchmarks/bench_plan.py --tables
    reconstruct``: a batch's step less its tokens' part and the latent weights' gradient)."""
    if recipe.reconstruct.train != "weights":
        return {}
    g = recipe.quant.group_size
    weights = shape.targeted
    grid = sum(lin.n_out * (1 if g == -1 else math.ceil(lin.n_in / g)) for lin in shape.linears)
    return {"latent weights, grid, gradients, AdamW moments (float32)": 16 * (weights + 2 * grid),
            "fake-quantized weights kept for backward (float32)": 3 * 4 * weights}


def _weights_quantized(shape: Shape, recipe: Recipe) -> dict[str, int]:
    g = recipe.quant.group_size
    codes = shape.targeted * shape.blocks
    groups = sum(lin.n_out * (1 if g == -1 else math.ceil(lin.n_in / g)) for lin in shape.linears)
    extra = sum(lin.n_out * 4 + lin.k * 8 for lin in shape.linears)  # noise step, indices
    return {"codes (uint8)": codes, "grid scales and zeros": shape.blocks * (8 * groups + extra)}


def _results_on_cpu(shape: Shape, recipe: Recipe, device: torch.device) -> dict[str, int]:
    """Every layer's result (``QuantizedWeight``), which the block-by-block stages keep on the CPU: counted where the
    stage runs there. Codes and grid as ``_weights_quantized``, and the salient columns in float32."""
    if device.type != "cpu":
        return {}
    salient = shape.salient * shape.blocks
    return {**_weights_quantized(shape, recipe), "salient columns (float32)": 4 * salient}


# Bytes a training step holds per logit element (micro-batch x sequence x vocabulary), whatever the compute dtype:
# the loss's, and what each kind of distillation adds to it. Measured by benchmarks/bench_plan.py (RESULTS.md, "memory
# plan"), each set at most 10% above the measurement: the loss's 12.0-12.1 measured, planned at 13 because the
# logits' phase is often the step's peak, and what the allocator keeps beside the tensors varies by machine.
LOGIT_BYTES = {"loss": 13, "top-k": 4, "full teacher": 20}


def plan_train(shape: Shape, recipe: Recipe, device: torch.device, memory: int | None = None) -> dict[str, int]:
    """Nothing where ``train.enabled`` is false (the stage only saves the untrained columns)."""
    t, p = recipe.train, _BYTES[recipe.model.dtype]
    if not t.enabled:
        return {}
    c = _compute_bytes(recipe, device)
    if t.mode == "post":
        weights = _weights_quantized(shape, recipe)
    else:  # pre / fp: the dense frozen weights
        weights = {"frozen dense weights": shape.targeted * shape.blocks * p}
    salient = shape.salient * shape.blocks
    per_block = _block_kept(shape, recipe, c)
    if t.learn_scales:  # the scales' gradient needs each linear's whole input
        per_block += t.micro_batch_size * t.seq_len * (3 * shape.hidden + shape.intermediate) * c
    # the largest frozen weight rebuilt in a forward or backward: the dequantized weight and its noise in the compute
    # dtype, or with learned scales the weight's float32 gradient and the float codes it is summed against
    largest = max(lin.weights for lin in shape.linears)
    rebuilt = largest * max(c * (2 if t.noise != "none" else 1), 8 if t.learn_scales else 0)
    logits, teacher = _logits(shape, recipe, c, p)
    return {**weights, **_loaded(shape, recipe, device, OTHER, shape.other_params),
            "salient weights, gradients, AdamW moments (float32)": 16 * salient, **teacher,
            **_step(shape, recipe, per_block, rebuilt, logits)}


def _block_kept(shape: Shape, recipe: Recipe, c: int) -> int:
    """What autograd keeps of a block: GIFT-SW layers keep only their inputs' salient columns, the fused attention
    kernel no probabilities (eager attention its probabilities), the norms their input in float32
    (``benchmarks/bench_plan.py``)."""
    b, s, h = recipe.train.micro_batch_size, recipe.train.seq_len, shape.hidden
    return b * s * ((3 * h + 2 * shape.kv + 3 * shape.intermediate) * c + 8 * h) + _attention(shape, b, s, c)


def _logits(shape: Shape, recipe: Recipe, c: int, p: int) -> tuple[int, dict[str, int]]:
    """The loss's logits (with the teacher's where one distills) and the teacher's own part: the top-k cache's
    batch (the cache itself stays on the CPU), or the full-precision model."""
    t = recipe.train
    tokens = t.micro_batch_size * t.seq_len
    logits = int(tokens * shape.vocab * LOGIT_BYTES["loss"])
    if t.distill > 0 and t.distill_topk is not None:
        return (logits + tokens * shape.vocab * LOGIT_BYTES["top-k"],
                {"distillation teacher (top-k cache, one batch)": tokens * t.distill_topk * 8})
    if t.distill > 0:
        return (logits + tokens * shape.vocab * LOGIT_BYTES["full teacher"],
                {"distillation teacher": shape.params * (2 if c == 2 else p)})
    return logits, {}


def _step(shape: Shape, recipe: Recipe, per_block: int, rebuilt: int, logits: int) -> dict[str, int]:
    """A step's activations, in two phases that are not alive at once (``benchmarks/bench_plan.py``). Kept through
    the step: every block's ``per_block``, or with gradient checkpointing only the block inputs (the residual stream,
    in the model's dtype: autocast casts only products). Beside it the larger of the loss's phase, ``logits``, and
    the backward's: a block's gradients or a ``rebuilt`` weight, whichever is larger, or with checkpointing the
    recomputed block beside the rebuilt weight or the recomputed block and its gradients, 1.6 blocks (1.46-1.53
    measured at hidden 128 to 768, ``bench_plan.py --tables fixed``)."""
    t, p = recipe.train, _BYTES[recipe.model.dtype]
    if t.gradient_checkpointing:
        inputs = shape.blocks * t.micro_batch_size * t.seq_len * shape.hidden * p
        kept, backward = {"activations (gradient checkpointing)": inputs}, max(8 * per_block // 5, per_block + rebuilt)
    else:
        kept, backward = {"activations": shape.blocks * per_block}, max(per_block, rebuilt)
    phase = "logits and loss" if logits >= backward else "one block's backward"
    return {**kept, f"{phase} (the larger of the two phases)": max(logits, backward)}


def plan_lora(shape: Shape, recipe: Recipe, device: torch.device, memory: int | None = None) -> dict[str, int]:
    """The LoRA baseline (``lora``): ``plan_train``'s step on the plain quantized model held dense (``p`` bytes a
    weight where the codes and grid were, nothing rebuilt), an adapter of the salient columns' trainable size in
    their place (``lora.lora_rank``, rounded as the stage rounds it), and in each block the inputs of the adapted
    linears, which autograd keeps for the adapter's gradient: in a Llama block the normed inputs of attention and of
    the MLP and down_proj's input (o_proj's is the attention's output, which its kernel keeps anyway), or under
    autocast from a wider model dtype each linear's own cast copy of its input, and each frozen weight's cast copy
    (the backward to the input needs it) (``benchmarks/bench_plan.py``)."""
    from .lora import lora_rank

    if not recipe.train.enabled:
        return {}
    c, p = _compute_bytes(recipe, device), _BYTES[recipe.model.dtype]
    b, s, h = recipe.train.micro_batch_size, recipe.train.seq_len, shape.hidden
    shapes = [(lin.n_in, lin.n_out) for lin in shape.linears]  # of a block
    rank = lora_rank(shape.salient, shapes)
    adapter = 16 * rank * sum(i + o for i, o in shapes) * shape.blocks
    weights = sum(i * o for i, o in shapes)
    inputs = sum(i for i, _ in shapes) if c < p else 2 * h + shape.intermediate
    kept = b * s * inputs * c + (weights * c if c < p else 0)
    logits, teacher = _logits(shape, recipe, c, p)
    return {"dense quantized weights": weights * shape.blocks * p,
            "LoRA adapter, gradients, AdamW moments (float32)": adapter,
            **_loaded(shape, recipe, device, OTHER, shape.other_params), **teacher,
            **_step(shape, recipe, _block_kept(shape, recipe, c) + kept, 0, logits)}


def plan_generate(shape: Shape, recipe: Recipe, device: torch.device, memory: int | None = None) -> dict[str, int]:
    g, p = recipe.generate, _BYTES[recipe.model.dtype]
    return {**_loaded(shape, recipe, device, "model", shape.params),
            "key-value cache": 2 * g.batch_size * g.seq_len * shape.kv * shape.blocks * p,
            "one step's forward and logits": _forward(shape, g.batch_size, 1, p) + g.batch_size * shape.vocab * 8}


def plan_teacher(shape: Shape, recipe: Recipe, device: torch.device, memory: int | None = None) -> dict[str, int]:
    t, p = recipe.train, _BYTES[recipe.model.dtype]
    b, s = t.micro_batch_size, t.seq_len
    return {**_loaded(shape, recipe, device, "model", shape.params),
            "one batch forward": _forward(shape, b, s, p),
            "logits and their log-softmax (float32)": b * s * shape.vocab * (p + 8)}


def plan_evaluate(shape: Shape, recipe: Recipe, device: torch.device, memory: int | None = None) -> dict[str, int]:
    e, p = recipe.eval, _BYTES[recipe.model.dtype]
    s = e.ppl_seq_len
    b = max(1, min(e.batch_size, 2**28 // (s * shape.vocab)))
    forward = _forward(shape, b, s, p)
    window = s * shape.vocab * (4 if p == 4 else 8)  # float32 logits are not copied (``evaluate.window_nll``)
    return {"model (merged to plain linears)": shape.params * p, "one batch forward": forward,
            "logits, and one window's float32 copy and log-softmax": b * s * shape.vocab * p + window}


def plan(recipe: Recipe, device: torch.device, stages: list[Stage], shape: Shape | None = None,
         memory: int | None = None) -> dict:
    """Expected peak bytes of each of ``stages`` that has a plan on ``device`` (with their parts) and whether each
    fits in ``memory`` bytes (default: the device's own capacity; given, the device need not be on this machine,
    as ``accelerate estimate-memory`` plans without the hardware)."""
    shape = shape or shape_of(meta_model(model_config(recipe), recipe.model.trust_remote_code), recipe)
    cap = capacity(device) if memory is None else memory
    usable = cap - (CUDA_RESERVE if device.type == "cuda" else 0)
    planned = {}
    for stage in stages:
        parts = stage.plan(shape, recipe, device, cap) if stage.plan is not None else {}
        if parts and device.type == "cpu":  # each stage loads the tokenizer into the memory it computes in
            parts = {**parts, "tokenizer": TOKENIZER_BYTES * shape.vocab}
        if parts:  # a stage with nothing to hold (train with train.enabled: false) is not listed
            total = sum(parts.values())
            planned[stage.name] = {"bytes": total, "fits": total <= usable, "parts": parts, "knob": stage.knob}
    return {"device": str(device), "capacity_bytes": cap, "usable_bytes": usable, "params": shape.params,
            "stages": planned}


def format_plan(result: dict) -> str:
    lines = [f"memory plan on {result['device']} ({result['capacity_bytes'] / GiB:.1f} GiB, "
             f"{result['usable_bytes'] / GiB:.1f} GiB usable); model of {result['params'] / 1e9:.2f}B parameters"]
    for name, st in result["stages"].items():
        lines.append(f"  {name:<9} {st['bytes'] / GiB:8.2f} GiB  {'fits' if st['fits'] else 'DOES NOT FIT'}")
        for part, n in st["parts"].items():
            lines.append(f"      {n / GiB:8.2f} GiB  {part}")
    return "\n".join(lines)


def check_fits(result: dict) -> None:
    """Refuse a run whose plan does not fit, with the numbers and the knob to turn."""
    bad = {n: st for n, st in result["stages"].items() if not st["fits"]}
    if bad:
        lines = [f"stage {n} needs about {st['bytes'] / GiB:.1f} GiB on {result['device']}, "
                 f"{result['usable_bytes'] / GiB:.1f} GiB usable; lower it with {st['knob']} "
                 f"(or pick another device: --device)" for n, st in bad.items()]
        raise RecipeError("the run does not fit (gift-quant plan RECIPE shows the arithmetic):\n  " + "\n  ".join(lines)
                          + "\n" + format_plan(result))
