"""Block-wise reconstruction: each decoder block trained against the full-precision block.

After quantization, block ``i`` with GIFT-SW layers on its codes is trained alone to reproduce what the
full-precision block gives on the calibration windows (EfficientQAT's Block-AP). What learns (``train``): the salient
columns, and optionally the grid's scales, the codes fixed (``columns``); or every weight (``weights``): each
quantized column a latent full-precision weight rounded onto the grid in the forward pass with straight-through
gradients (``grid.fake_quantize_ste``), the grid's scales and asymmetric zero points, the salient columns in full
precision as before. The latent weights start from the quantize stage's codes or from the full-precision weights
(``init``) and are frozen to codes when the block is done; bits, groups and salient indices never change. With
``norms`` the block's norm weights train too (a float32 copy cast to their dtype in the forward pass, so that a
bfloat16 weight takes steps smaller than its precision); the stage keeps them beside the layers:

    loss_i = mean( (block_i^q(x_i) - block_i(x_i^fp))^2 ),   x_i^fp the full-precision model's input to block i

``x_i`` is ``x_i^fp`` (``inputs: fp``) or the output of the reconstructed quantized blocks before it
(``inputs: quantized``): then block i also learns to undo what the blocks before it left, which is what it
meets at inference. The end-to-end train stage starts from the result. Why a separate stage: its loss
reaches every block directly, one block's forward and backward on the device at a time (the quantize
stage's footprint), on text the run already has.

A block's trained tensors and its loss before and after go to ``reconstruct.work/block-<i>.safetensors``
(``rundir.save_piece``: renamed into place, with the stage key) as soon as it is done; a rerun loads the
finished blocks, recomputes their outputs (one forward each) and trains from the first unfinished one, so
a kill redoes at most one block and the result equals an uninterrupted run's.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .calibrate import BlockInputs, block_inputs, block_output, inputs_fit, of_kind
from .checkpoint import CheckpointError
from .families import decoder_layers, layer_types
from .grid import QuantizedWeight
from .layers import learn_scales, learn_weights, merge_to_dense, param_groups, salient_layers, wrap_quantized
from .recipe import ReconstructSpec
from .rundir import load_piece, save_piece
from .train import SMALLEST_SCALE, trainable_state

log = logging.getLogger(__name__)


def block_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a block's output against the full-precision block's, in float32."""
    return F.mse_loss(out.float(), target.float())


def _outputs(block: nn.Module, batches: list, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's output for every batch, kept where ``inputs`` keeps them."""
    with torch.no_grad():
        return [inputs.keep(block_output(block(inputs.use(h), **kw))) for h, kw in batches]


def _mean_loss(block: nn.Module, batches: list, targets: list, inputs: BlockInputs) -> float:
    with torch.no_grad():
        losses = [block_loss(block_output(block(inputs.use(h), **kw)), inputs.use(t))
                  for (h, kw), t in zip(batches, targets)]
    return float(torch.stack(losses).mean())


class _Cast(nn.Module):
    """Parametrization of a norm weight that trains: the float32 copy, in the dtype the module computes in."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(self.dtype)


def norm_modules(module: nn.Module) -> dict[str, nn.Module]:
    """The normalization layers with a weight in ``module`` (every family's RMSNorm or LayerNorm), by name."""
    return {n: m for n, m in module.named_modules()
            if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), torch.Tensor)}


def learn_norms(block: nn.Module) -> None:
    """The block's norm weights made trainable: each a float32 parameter cast to the weight's dtype in the forward
    pass (``freeze_norms`` writes it back)."""
    for m in norm_modules(block).values():
        parametrize.register_parametrization(m, "weight", _Cast(m.weight.dtype), unsafe=True)
        m.parametrizations.weight.original = nn.Parameter(m.parametrizations.weight.original.detach().float())


def trained_norms(block: nn.Module) -> list[nn.Parameter]:
    return [m.parametrizations.weight.original for m in norm_modules(block).values()
            if parametrize.is_parametrized(m, "weight")]


def freeze_norms(block: nn.Module) -> None:
    for m in norm_modules(block).values():
        if parametrize.is_parametrized(m, "weight"):
            weight = m.weight.detach()  # in the module's dtype
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            m.weight = nn.Parameter(weight, requires_grad=False)


def block_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every decoder block's norm weights by their name in ``model``."""
    names = {m: n for n, m in model.named_modules()}
    return {f"{names[block]}.{n}.weight": m.weight.detach().cpu().contiguous()
            for block in decoder_layers(model) for n, m in norm_modules(block).items()}


def load_norms(model: nn.Module, path: Path) -> None:
    """The reconstruct stage's norm weights (``norms.safetensors``) into ``model``."""
    _load_into(model, load_file(path), path, "the model")


def _load_into(module: nn.Module, tensors: dict[str, torch.Tensor], path: Path, where: str) -> None:
    """What the stage saved in ``path`` into ``module``; a tensor ``module`` does not hold is refused by name."""
    unknown = module.load_state_dict(tensors, strict=False).unexpected_keys
    if unknown:
        raise CheckpointError(f"{path}: tensors {unknown[:3]} are not in {where}; rerun with --from reconstruct")


def train_block(block: nn.Module, batches: list, targets: list, spec: ReconstructSpec, inputs: BlockInputs,
                seed: int) -> None:
    """``spec.epochs`` passes over the batches in a seeded order; AdamW on what the block's layers train (salient
    columns; scales; latent weights and zero points) and its norms where they train, a learning rate a role, cosine
    to 0, no weight decay; scales kept positive as an fp16 export holds them. The noise draws are seeded by ``seed``
    without touching the run's random state."""
    roles = {**param_groups(block), "norms": trained_norms(block)}
    lrs = {"columns": spec.lr, "weights": spec.weights_lr, "scales": spec.scales_lr, "zeros": spec.scales_lr,
           "norms": spec.norms_lr}
    opt = torch.optim.AdamW([{"params": roles[r], "lr": lr} for r, lr in lrs.items() if roles[r]], weight_decay=0.0)
    steps = spec.epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    order = torch.Generator().manual_seed(seed)
    cuda = [inputs.device] if inputs.device.type == "cuda" else []
    block.train()
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for j in [j for _ in range(spec.epochs) for j in torch.randperm(len(batches), generator=order).tolist()]:
            h, kw = batches[j]
            block_loss(block_output(block(inputs.use(h), **kw)), inputs.use(targets[j])).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            with torch.no_grad():
                for s in roles["scales"]:
                    s.clamp_(min=SMALLEST_SCALE)
    block.eval()


def reconstruct_model(model: nn.Module, windows: torch.Tensor, results: dict[str, QuantizedWeight],
                      spec: ReconstructSpec, work: Path, key: str, seed: int,
                      device: torch.device | str | None = None) -> list[dict[str, float]]:
    """Reconstruct every decoder block of the full-precision ``model`` in turn (see the module docstring);
    ``results`` (the quantize stage's layers by module name) get the trained salient columns and scales. The
    model ends with the reconstructed blocks merged into dense linears, and their trained norms (``block_norms``).
    Returns each block's loss before and after."""
    work.mkdir(parents=True, exist_ok=True)
    layers = decoder_layers(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    blocks = {id(block) for block in layers}  # the blocks' names alone: a map of every module would keep each
    names = {m: n for n, m in model.named_modules() if id(m) in blocks}  # replaced linear (and its weight) alive
    captured = block_inputs(model, windows, spec.batch_size)
    n_bytes = sum(h.numel() * h.element_size() for h, _ in captured)
    block_bytes = sum(p.numel() * p.element_size() for p in layers[0].parameters())
    inputs = BlockInputs(device, inputs_fit(2 * n_bytes, device, block_bytes))  # 4 sets: fp and quantized, in and out
    fp = [(inputs.keep(h), send_to_device(kw, device)) for h, kw in captured]
    quant = fp
    del captured
    losses = []
    kinds = layer_types(model)
    for i, block in enumerate(tqdm(layers, desc="reconstruct", unit="block")):
        block.to(device)
        fp_i, quant_i = of_kind(fp, kinds[i]), of_kind(quant, kinds[i])
        targets = _outputs(block, fp_i, inputs)
        prefix = names[block] + "."
        mine = {n.removeprefix(prefix): qw for n, qw in results.items() if n.startswith(prefix)}
        fp_start = spec.train == "weights" and spec.init == "fp"
        start = {n: block.get_submodule(n).weight.detach() for n in mine} if fp_start else None
        wrap_quantized(block, mine, spec.noise, spec.noise_bits, device)
        block.eval()  # new layers are built in training mode: no noise outside train_block
        if spec.train == "weights":
            learn_weights(block, start)
        elif spec.learn_scales:
            learn_scales(block)
        if spec.norms:
            learn_norms(block)
        del start
        train_on = quant_i if spec.inputs == "quantized" else fp_i
        path = work / f"block-{i:03d}.safetensors"
        done = load_piece(path, key, "reconstruct")
        if done is None:
            before = _mean_loss(block, train_on, targets, inputs)
            train_block(block, train_on, targets, spec, inputs, seed * 1000003 + i)
            loss = {"before": before, "after": _mean_loss(block, train_on, targets, inputs)}
            save_piece(path, trainable_state(block), key, losses=json.dumps(loss))
        else:
            _load_into(block, done[0], path, f"block {i}")
            loss = json.loads(done[1]["losses"])
        losses.append(loss)
        log.info("block %d: reconstruction loss %.4g -> %.4g", i, loss["before"], loss["after"])
        for name, layer in salient_layers(block).items():
            layer.write_to(mine[name])
        freeze_norms(block)
        fp = [(t, kw) for t, (_, kw) in zip(targets, fp)]
        quant = [(o, kw) for o, (_, kw) in zip(_outputs(block, quant_i, inputs), quant)] if spec.inputs == "quantized" \
            else fp
        merge_to_dense(block)
        block.to(home)
    return losses
