"""Apply saliency selection and quantization to a model, block by block.

``quantize_linear`` is the per-layer step (pure: weight and statistics in, ``QuantizedWeight``
out); ``quantize_model`` is the plumbing that streams calibration data through the decoder and
writes the effective weights back into the model.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from .calibrate import InputStats, run_blocks
from .gptq import gptq
from .grid import Grid, QuantizedWeight, rtn
from .recipe import ALL_PROJECTIONS, QuantSpec, SaliencySpec
from .saliency import column_scores, quantization_perturbation, resolve_k, top_k

log = logging.getLogger(__name__)


def select_salient(w: torch.Tensor, stats: InputStats | None, sal: SaliencySpec, quant: QuantSpec, name: str,
                   d: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the salient input columns of one layer (sorted). ``d``: the quantization perturbation
    ``W - deq(Q)`` where the quantization is given (an imported checkpoint); by default METHOD's per-row RTN."""
    k = resolve_k(sal.k_for(name), w.shape[1])
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=w.device)
    metric = sal.resolved_metric()
    if metric.tau is not None and d is None:
        # METHOD section 1: Q inside the metric is symmetric per-row, at the metric's bits
        grid = replace(quant.grid(), bits=sal.bits or quant.bits, group_size=-1, sym=True)
        d = quantization_perturbation(w, grid)
    scores = column_scores(d if d is not None else w, stats.norm(metric.rho), metric)
    return top_k(scores, k)


def quantize_linear(w: torch.Tensor, stats: InputStats | None, sal: SaliencySpec, quant: QuantSpec, name: str,
                    idx: torch.Tensor | None = None) -> QuantizedWeight:
    """Salient columns by the metric (or ``idx`` when they are already chosen), then GPTQ or RTN of the
    rest (``stats`` may be None for plain RTN)."""
    w = w.detach().float()
    idx = select_salient(w, stats, sal, quant, name) if idx is None else idx
    if quant.method == "gptq":
        return gptq(w, stats.hessian, quant.grid(), idx, quant.damp, quant.block_size, quant.act_order,
                    quant.dynamic_groups, h_scale=stats.gptq_scale())
    return rtn(w, quant.grid(), idx)


def _quantize_into(lin: nn.Linear, name: str, stats: InputStats | None, sal: SaliencySpec, quant: QuantSpec,
                   idx: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize one module where its weight is and write its dense effective weight back; the result
    goes to the CPU (a whole model's codes would not stay on an accelerator)."""
    device = lin.weight.device if stats is None else stats.hessian.device
    idx = None if idx is None else idx.to(device)
    qw = quantize_linear(lin.weight.to(device), stats, sal, quant, name.rsplit(".", 1)[-1], idx)
    lin.weight.data.copy_(qw.effective_weight().to(lin.weight.dtype))
    return qw.to("cpu")


def _names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def quantize_model(
    model: nn.Module,
    windows: torch.Tensor,
    sal: SaliencySpec,
    quant: QuantSpec,
    batch_size: int = 8,
    sequential: bool = True,
    true_sequential: bool = True,
    salient: dict[str, torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    resident: bool | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize every targeted linear in place (dense effective weights); return the results by module name.

    ``salient`` (module name -> column indices) fixes the salient columns instead of scoring them,
    as pre-quantization GIFT-SW needs: the columns it trained are the ones kept. ``device``: where the
    blocks are calibrated and quantized, one at a time (default: where the model is); ``resident``: keep
    the block inputs there (default: when they fit)."""
    names = _names(model)
    results: dict[str, QuantizedWeight] = {}

    def on_block(_i: int, linears: dict[str, nn.Linear], stats: dict[str, InputStats]) -> None:
        for name, lin in linears.items():
            idx = None if salient is None else salient[names[lin]].long()
            results[names[lin]] = _quantize_into(lin, names[lin], stats[name], sal, quant, idx)

    run_blocks(model, windows, sal.targets, on_block, batch_size, sequential, true_sequential, device, resident)
    return results


def collect_stats(model: nn.Module, windows: torch.Tensor, targets: list[str], batch_size: int = 8,
                  device: torch.device | str | None = None) -> dict[str, InputStats]:
    """Input statistics of every targeted linear of the unmodified model (non-sequential), by module name,
    accumulated on ``device`` (default: the model's).

    Lets many quantization settings share one calibration pass (benchmarks, ablations).
    """
    names = _names(model)
    out: dict[str, InputStats] = {}

    def on_block(_i: int, linears: dict[str, nn.Linear], stats: dict[str, InputStats]) -> None:
        out.update({names[lin]: stats[name].move("cpu") for name, lin in linears.items()})

    run_blocks(model, windows, targets, on_block, batch_size=batch_size, sequential=False, device=device)
    return out


def quantize_with_stats(
    model: nn.Module, stats: dict[str, InputStats | None], sal: SaliencySpec, quant: QuantSpec
) -> dict[str, QuantizedWeight]:
    """Quantize in place from precomputed statistics (see ``collect_stats``); plain RTN needs none."""
    modules = dict(model.named_modules())
    return {name: _quantize_into(modules[name], name, st, sal, quant) for name, st in stats.items()}


def quantize_rtn_plain(model: nn.Module, sal: SaliencySpec, quant: QuantSpec) -> dict[str, QuantizedWeight]:
    """Round-to-nearest of every targeted linear, no salient columns: needs no calibration data."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in sal.targets]
    return quantize_with_stats(model, dict.fromkeys(names), sal.plain(),
                               quant.model_copy(update={"method": "rtn"}))


def rtn_with_columns(model: nn.Module, grid: Grid, columns: Callable[[int, nn.Linear], torch.Tensor],
                     targets: list[str] = ALL_PROJECTIONS) -> dict[str, QuantizedWeight]:
    """Every targeted linear RTN on ``grid``, its salient columns ``columns(i, linear)`` (``i``: the layer's
    position among the targets), without calibration: a GIFT-SW model whose cost or format is what matters
    (tests, benchmarks, the GPU check), not which columns it keeps."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    return {n: rtn(m.weight.detach(), grid, columns(i, m).to(m.weight.device)) for i, (n, m) in enumerate(linears)}


def seeded_columns(k: int) -> Callable[[int, nn.Linear], torch.Tensor]:
    """``k`` random columns of each layer, seeded by its position (the same model gets the same columns)."""
    return lambda i, m: torch.randperm(m.in_features, generator=torch.Generator().manual_seed(i))[:k].sort().values
