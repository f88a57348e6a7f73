"""Generalized sensitivity metric against hand-computed scores."""
import math

import pytest
import torch

from gift_quant.calibrate import InputStats
from gift_quant.grid import Grid
from gift_quant.saliency import PRESETS, Metric, column_scores, quantization_perturbation, resolve_k, top_k

D = torch.tensor([[0.1, -0.4, 0.0], [-0.3, 0.2, 0.5]])
X = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 1.0, 0.5], [2.0, 0.0, -0.5]])  # tokens x features


def norms(rho):
    s = InputStats(3)
    s.update(X)
    return s.norm(rho)


def test_stats_norms_hand_computed():
    assert norms(math.inf).tolist() == [3.0, 2.0, 0.5]
    torch.testing.assert_close(norms(2), torch.tensor([math.sqrt(14), math.sqrt(5), math.sqrt(0.75)]))
    torch.testing.assert_close(norms(1), torch.tensor([6.0, 3.0, 1.5]))


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("gift", [0.3 * 3.0, 0.4 * 2.0, 0.5 * 0.5]),  # max|D_j| * max|X_j|
        ("owq", [math.sqrt(0.1) * math.sqrt(14), math.sqrt(0.2) * math.sqrt(5), 0.5 * math.sqrt(0.75)]),
        ("quik", [3.0, 2.0, 0.5]),
        ("wanda", [0.4 * math.sqrt(14), 0.6 * math.sqrt(5), 0.5 * math.sqrt(0.75)]),
    ],
)
def test_presets_hand_computed(preset, expected):
    m = PRESETS[preset]
    torch.testing.assert_close(column_scores(D, norms(m.rho), m), torch.tensor(expected))


def test_gamma_exponent():
    m = Metric(rho=math.inf, tau=math.inf, gamma=2.0)
    torch.testing.assert_close(column_scores(D, norms(math.inf), m), torch.tensor([0.3 * 9, 0.4 * 4, 0.5 * 0.25]))


def test_top_k_picks_planted_columns_and_breaks_ties_by_index():
    torch.manual_seed(0)
    w = torch.randn(64, 100) * 0.02
    x = torch.randn(500, 100)
    planted = [7, 42, 93]
    x[:, planted] *= 50
    s = InputStats(100)
    s.update(x)
    d = quantization_perturbation(w, Grid(3))
    for name, m in PRESETS.items():
        assert top_k(column_scores(d, s.norm(m.rho), m), 3).tolist() == planted, name
    assert top_k(torch.tensor([1.0, 5.0, 5.0, 5.0, 0.0]), 2).tolist() == [1, 2]


def test_perturbation_is_symmetric_per_row_rtn():
    w = torch.tensor([[3.0, 1.2, -0.4]])  # 3 bits: Delta = 1, levels -4..3
    torch.testing.assert_close(quantization_perturbation(w, Grid(3)), torch.tensor([[0.0, 0.2, -0.4]]))


def test_resolve_k():
    assert resolve_k(16, 576) == 16
    assert resolve_k(0.03, 576) == 17
    with pytest.raises(ValueError, match="outside 0..576"):
        resolve_k(600, 576)
