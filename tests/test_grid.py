"""Quantization grid against hand-computed cases and known bounds."""
import pytest
import torch

from gift_quant.grid import (
    Grid,
    _params_from_range,
    clip_errors,
    dequantize,
    expand_groups,
    fake_quantize,
    fake_quantize_ste,
    grid_params,
    maxq,
    quantize,
    row_params,
    rtn,
    search_rows,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_codes_in_range_and_error_at_most_half_step(bits, sym):
    torch.manual_seed(bits)
    w = torch.randn(16, 64) * torch.rand(16, 1) * 3
    scale, zero = row_params(w, Grid(bits, sym=sym))
    codes = quantize(w, scale, zero, bits)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert torch.equal(codes, codes.round())
    err = (dequantize(codes, scale, zero) - w).abs()
    if sym:  # the positive extreme is clipped to (2^(b-1)-1) * Delta = alpha exactly: no clipping error
        assert (err <= scale / 2 + 1e-6).all()
    else:  # the zero point is rounded, which can shift the grid by up to half a step at the edge
        assert (err <= scale + 1e-6).all()
        inner = (w > w.min(1, keepdim=True).values + scale) & (w < w.max(1, keepdim=True).values - scale)
        assert (err[inner] <= (scale / 2 + 1e-6).expand_as(w)[inner]).all()


def test_symmetric_levels_match_method():
    # 3 bits: Delta = alpha / 3, signed levels -4..3 (METHOD section 2)
    w = torch.tensor([[-3.0, -1.0, 0.0, 0.4, 1.6, 3.0]])
    scale, zero = row_params(w, Grid(3))
    assert scale.item() == pytest.approx(1.0) and zero.item() == 4
    levels = dequantize(quantize(w, scale, zero, 3), scale, zero)
    assert levels.tolist() == [[-3.0, -1.0, 0.0, 0.0, 2.0, 3.0]]
    # the most negative level is -4 * Delta: a value below -alpha rounds to it
    assert fake_quantize(torch.tensor([[-9.0]]), scale, zero, 3).item() == -4.0


def test_asymmetric_hand_case():
    w = torch.tensor([[0.0, 1.2, 2.0, 2.8, 6.0]])  # min 0, max 6, 2 bits: step 2, zero 0
    scale, zero = row_params(w, Grid(2, sym=False))
    assert scale.item() == pytest.approx(2.0) and zero.item() == 0
    assert fake_quantize(w, scale, zero, 2).tolist() == [[0.0, 2.0, 2.0, 2.0, 6.0]]


@pytest.mark.parametrize("sym", [True, False])
def test_clipping_search_never_worse(sym):
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    w[:, 5] *= 12  # outliers make clipping worthwhile
    s0, z0 = row_params(w, Grid(3, sym=sym))
    s1, z1 = row_params(w, Grid(3, sym=sym, clip_min=0.2, clip_steps=81))
    e0 = ((fake_quantize(w, s0, z0, 3) - w) ** 2).sum(1)
    e1 = ((fake_quantize(w, s1, z1, 3) - w) ** 2).sum(1)
    assert (e1 <= e0 + 1e-6).all()
    assert e1.sum() < 0.9 * e0.sum()


def test_clipping_search_equals_brute_force():
    torch.manual_seed(1)
    w = torch.randn(4, 50)
    ratios = torch.linspace(1.0, 0.2, 17)
    s, z = row_params(w, Grid(3, clip_min=0.2, clip_steps=17))
    for r in range(4):
        best = min(
            ((fake_quantize(w[r], p * w[r].abs().max() / 3, torch.tensor(4.0), 3) - w[r]) ** 2).sum().item()
            for p in ratios.tolist()
        )
        got = ((fake_quantize(w[r], s[r], z[r], 3) - w[r]) ** 2).sum().item()
        assert got == pytest.approx(best, rel=1e-5)


def _rounding_errors(wm: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """Every entry of ``wm`` rounded in float64 on each candidate ``(s, z)``, its squared errors summed over the row."""
    q = torch.clamp(torch.round(wm.double() / s.double()), -z.double(), 2**bits - 1 - z.double())
    return ((q * s.double() - wm.double()) ** 2).sum(-1, keepdim=True)


def _least_error_ratio(w: torch.Tensor, mask: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """The slow reference of the clipping search: every ratio's grid built as ``row_params`` builds it, every
    entry rounded in float64 and its error summed, the first ratio within 1e-10 of the row's sum of squares of
    the least error kept."""
    wm = torch.where(mask, w, torch.zeros_like(w))
    xmin, xmax = wm.min(1, keepdim=True).values.clamp(max=0), wm.max(1, keepdim=True).values.clamp(min=0)
    cands, errs = [], []
    for r in torch.linspace(1.0, grid.clip_min, grid.clip_steps):
        s, z = _params_from_range(r * xmin, r * xmax, grid)
        errs.append(_rounding_errors(wm, s, z, grid.bits).squeeze(1))
        cands.append((s, z))
    errs = torch.stack(errs)
    tol = 1e-10 * (wm.double() ** 2).sum(1)
    pick = (errs <= errs.min(0).values + tol).to(torch.uint8).argmax(0).tolist()
    return (torch.stack([cands[p][0][i] for i, p in enumerate(pick)]),
            torch.stack([cands[p][1][i] for i, p in enumerate(pick)]))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym,sym_step", [(True, "paper"), (True, "gptq"), (False, "paper")])
@pytest.mark.parametrize("chunk", [None, 2835])
def test_clipping_search_equals_float64_rounding_of_every_ratio(bits, sym, sym_step, chunk, monkeypatch):
    """The search scores each ratio from the sorted row and its prefix sums; the reference rounds every entry
    for every ratio. Same ratio in every row: rows with an outlier, masked entries, a row of one value, an
    all-zero row and one whose two ratios represent it alike (an exact tie: the first ratio). ``chunk``: work
    tensors of that many entries, so the rows are searched a few at a time (the last chunk partial), as a
    large layer's are."""
    if chunk is not None:
        monkeypatch.setattr("gift_quant.grid._SEARCH_ELEMENTS", chunk)
        assert 1 < search_rows(96, Grid(bits, clip_min=0.2, clip_steps=81)) < 64
    g = torch.Generator().manual_seed(bits * 10 + len(sym_step) + sym)
    w = torch.randn(64, 96, generator=g) * 0.05
    w[::3, 7] *= 25  # outliers
    w[5] = 0.3  # one value
    w[6] = 0.0  # all zero
    w[9] = 0.0
    w[9, 2], w[9, 4] = -1.0, 0.01  # 2-bit symmetric: ratios 1 and 0.5 both hold -1 and round 0.01 to 0
    mask = (torch.rand(96, generator=g) > 0.15).expand(64, 96)
    grid = Grid(bits, sym=sym, sym_step=sym_step, clip_min=0.2, clip_steps=81)
    scale, zero = row_params(w, grid, mask)
    ref_scale, ref_zero = _least_error_ratio(w, mask, grid)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)


def test_clip_errors_are_the_rounding_errors():
    """``clip_errors`` against every entry rounded and summed (float64), candidates of every ratio."""
    w = torch.randn(12, 200, generator=torch.Generator().manual_seed(5))
    for grid in (Grid(3), Grid(4, sym=False), Grid(2, sym_step="gptq")):
        r = torch.linspace(1.0, 0.2, 9).view(-1, 1, 1)
        xmin, xmax = w.min(1, keepdim=True).values.clamp(max=0), w.max(1, keepdim=True).values.clamp(min=0)
        s, z = _params_from_range(r * xmin, r * xmax, grid)
        torch.testing.assert_close(clip_errors(w, s, z, grid.bits), _rounding_errors(w, s, z, grid.bits),
                                   rtol=1e-10, atol=1e-12)


def test_groups_and_mask():
    torch.manual_seed(2)
    w = torch.randn(3, 10)
    w[:, 1] = 100.0  # a salient column excluded from the range
    mask = torch.ones(10, dtype=torch.bool)
    mask[1] = False
    scale, zero = grid_params(w, Grid(4, group_size=4), mask)
    assert scale.shape == (3, 3)  # groups [0:4], [4:8], [8:10]
    for gi, (a, b) in enumerate([(0, 4), (4, 8), (8, 10)]):
        cols = [c for c in range(a, b) if c != 1]
        alpha = w[:, cols].abs().max(1).values
        torch.testing.assert_close(scale[:, gi], alpha / 7)
    full = expand_groups(scale, 4, 10)
    assert full.shape == (3, 10) and torch.equal(full[:, 7], scale[:, 1]) and torch.equal(full[:, 8], scale[:, 2])


def test_rtn_keeps_salient_columns_exactly():
    torch.manual_seed(3)
    w = torch.randn(8, 40)
    idx = torch.tensor([3, 17])
    qw = rtn(w, Grid(3), idx)
    eff = qw.effective_weight()
    assert torch.equal(eff[:, idx], w[:, idx])
    # non-salient columns are the plain rounding with the step of the non-salient columns
    rest = torch.tensor([c for c in range(40) if c not in (3, 17)])
    scale = w[:, rest].abs().max(1, keepdim=True).values / 3
    torch.testing.assert_close(eff[:, rest], fake_quantize(w[:, rest], scale, torch.tensor(4.0), 3))
    # codes of the salient columns are their own rounding (used by the gptq+lora export)
    torch.testing.assert_close(qw.dequantize_grid()[:, idx], fake_quantize(w[:, idx], scale, torch.tensor(4.0), 3))


def test_gptq_style_symmetric_step():
    # sym_step="gptq": Delta = 2 alpha / (2^b - 1), zero 2^(b-1): 3 bits, alpha 3.5 -> Delta 1, levels -4..3
    w = torch.tensor([[3.5, -3.5, 1.2]])
    scale, zero = row_params(w, Grid(3, sym_step="gptq"))
    assert scale.item() == pytest.approx(1.0) and zero.item() == 4
    # +3.5 clips to the top level 3; -3.5 rounds half-to-even to -4, the bottom level
    assert fake_quantize(w, scale, zero, 3).tolist() == [[3.0, -4.0, 1.0]]


def test_quantizers_never_build_a_graph():
    # A trainable weight used to chain all clipping candidates into an autograd graph (GBs on SmolLM2).
    from gift_quant.gptq import gptq

    w = torch.nn.Linear(32, 8).weight
    qw = rtn(w, Grid(3, clip_min=0.5, clip_steps=5), torch.tensor([1]))
    qg = gptq(w, torch.eye(32), Grid(3, clip_min=0.5, clip_steps=5), torch.tensor([1]))
    assert not any(t.requires_grad for q in (qw, qg) for t in (q.scale, q.zero, q.salient_weight))


@pytest.mark.parametrize("group_size", [-1, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_straight_through_gradients_are_the_hand_derived_ones(group_size, sym):
    """``fake_quantize_ste``'s gradients against the derivation in its docstring, weight by weight, summed over each
    row's group for the grid (a weight beyond the grid's ends clamps: no gradient to it, ``-scale`` to its zero point);
    and its value is the dequantized codes of ``quantize``. Weights drawn wide enough that some clamp."""
    torch.manual_seed(0)
    bits, out, n = 3, 5, 12
    w = torch.randn(out, n) * 2
    scale, zero = grid_params(w * 0.5, Grid(bits, group_size, sym=sym))  # a grid half as wide: a share clamps
    zero = zero + (0 if sym else 0.3)  # a trained, off-integer zero point: the forward rounds it
    w_, s_, z_ = (t.clone().requires_grad_() for t in (w, scale, zero))
    upstream = torch.randn(out, n)
    (fake_quantize_ste(w_, s_, z_, bits, group_size) * upstream).sum().backward()

    s, z = expand_groups(scale, group_size, n), expand_groups(zero.round(), group_size, n)
    q = quantize(w, s, z, bits)
    inside = (torch.round(w / s) + z >= 0) & (torch.round(w / s) + z <= maxq(bits))
    assert 0 < inside.sum() < inside.numel()
    torch.testing.assert_close(fake_quantize_ste(w, scale, zero, bits, group_size), (q - z) * s)
    torch.testing.assert_close(w_.grad, upstream * inside)
    ds = upstream * torch.where(inside, q - z - w / s, q - z)
    dz = upstream * torch.where(inside, 0.0, -s)
    groups = torch.arange(n) // (n if group_size == -1 else group_size)
    for name, per_weight, got in (("scale", ds, s_.grad), ("zero", dz, z_.grad)):
        want = torch.zeros_like(scale).index_add_(1, groups, per_weight)
        torch.testing.assert_close(got, want, msg=name)
