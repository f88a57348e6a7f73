"""Apply saliency selection and quantization to a model, block by block.

``quantize_linear`` is the per-layer step (pure: weight and statistics in, ``QuantizedWeight``
out); ``quantize_model`` is the plumbing that streams calibration data through the decoder and
writes the effective weights back into the model.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .calibrate import InputStats, decoder_layers, run_blocks
from .gptq import gptq
from .quantize import QuantizedWeight, rtn
from .recipe import QuantSpec, SaliencySpec
from .saliency import column_scores, quantization_perturbation, resolve_k, top_k

log = logging.getLogger(__name__)


def select_salient(w: torch.Tensor, stats: InputStats, sal: SaliencySpec, quant: QuantSpec, name: str) -> torch.Tensor:
    """Indices of the salient input columns of one layer (sorted)."""
    k = resolve_k(sal.k_for(name), w.shape[1])
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    metric = sal.resolved_metric()
    d = None
    if metric.tau is not None:
        d = quantization_perturbation(w, sal.bits or quant.bits, quant.clip_min, quant.clip_steps)
    scores = column_scores(d if d is not None else w, stats.norm(metric.rho), metric)
    return top_k(scores, k)


def quantize_linear(w: torch.Tensor, stats: InputStats, sal: SaliencySpec, quant: QuantSpec, name: str) -> QuantizedWeight:
    """Salient columns by the metric, then GPTQ or RTN of the rest."""
    w = w.detach().float().cpu()
    idx = select_salient(w, stats, sal, quant, name)
    common = dict(bits=quant.bits, group_size=quant.group_size, sym=quant.sym, salient_idx=idx,
                  clip_min=quant.clip_min, clip_steps=quant.clip_steps)
    if quant.method == "gptq":
        return gptq(w, stats.mean_hessian(), damp=quant.damp, block_size=quant.block_size,
                    act_order=quant.act_order, **common)
    return rtn(w, **common)


def quantize_model(
    model: nn.Module,
    windows: torch.Tensor,
    sal: SaliencySpec,
    quant: QuantSpec,
    batch_size: int = 8,
    sequential: bool = True,
) -> dict[str, QuantizedWeight]:
    """Quantize every targeted linear in place (dense effective weights); return the results by module name."""
    layers = decoder_layers(model)
    prefix = {id(b): n for n, b in model.named_modules() if any(b is l for l in layers)}
    results: dict[str, QuantizedWeight] = {}

    def on_block(i: int, linears: dict[str, nn.Linear], stats: dict[str, InputStats]) -> None:
        block_name = prefix[id(layers[i])]
        for name, lin in linears.items():
            short = name.rsplit(".", 1)[-1]
            qw = quantize_linear(lin.weight, stats[name], sal, quant, short)
            lin.weight.data.copy_(qw.effective_weight().to(lin.weight.dtype))
            results[f"{block_name}.{name}"] = qw

    run_blocks(model, windows, sal.targets, on_block, batch_size=batch_size, sequential=sequential)
    return results
