"""The generalized sensitivity metric and salient-column selection (METHOD section 1).

    s_j = || D_j ||_tau * || X_j ||_rho ^ gamma,   D = W - Q(W)

``Q`` is symmetric per-row round-to-nearest (with the clipping search) at the metric's bits, over
all columns: the salient set is not known yet when the metric runs. Input norms come from streamed
statistics (``calibrate.InputStats``), so ``rho`` is one of 1, 2, inf.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .grid import Grid, fake_quantize, row_params

INF = math.inf


@dataclass(frozen=True)
class Metric:
    """``tau = None`` drops the weight term (activation-only metrics such as QUIK)."""

    rho: float
    tau: float | None
    gamma: float


PRESETS: dict[str, Metric] = {
    "gift": Metric(rho=INF, tau=INF, gamma=1.0),  # the paper's choice
    "owq": Metric(rho=2.0, tau=2.0, gamma=1.0),  # ranks as ||X_j||_2^2 ||D_j||_2^2
    "quik": Metric(rho=INF, tau=None, gamma=1.0),  # activations only (QUIK, SmoothQuant)
    "wanda": Metric(rho=2.0, tau=1.0, gamma=1.0),
}


def quantization_perturbation(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``D = W - Q(W)`` with ``Q`` per-row RTN on ``grid`` (the caller passes a symmetric per-row grid)."""
    w = w.float()
    scale, zero = row_params(w, grid)
    return w - fake_quantize(w, scale, zero, grid.bits)


def column_scores(d: torch.Tensor, x_norm: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Scores ``s_j`` from the perturbation ``d`` (out, in) and ``||X_j||_rho`` (in,)."""
    act = x_norm.float() ** metric.gamma
    if metric.tau is None:
        return act
    return torch.linalg.vector_norm(d.float(), ord=metric.tau, dim=0) * act


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, sorted ascending; ties go to the lower index."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    order = torch.argsort(-scores, stable=True)
    return torch.sort(order[:k]).values


def resolve_k(k: int | float, n_in: int) -> int:
    """``k`` as a count (int) or a fraction of the layer's inputs (float in (0, 1))."""
    n = round(k * n_in) if isinstance(k, float) else int(k)
    if not 0 <= n <= n_in:
        raise ValueError(f"salient k={k} gives {n} columns, outside 0..{n_in} inputs of the layer")
    return n
