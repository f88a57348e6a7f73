"""GPTQ against a slow, unblocked Optimal Brain Surgeon reference written plainly here.

The reference keeps the full inverse Hessian and removes each quantized column from it by Gaussian
elimination (the OBQ formulation) instead of GPTQ's Cholesky rows and lazy block updates, so the two
share no code beyond the grid parameters (tested separately in test_quantize.py).
"""
import pytest
import torch

from gift_quant.gptq import gptq, inverse_cholesky
from gift_quant.grid import Grid, expand_groups, fake_quantize, grid_params, row_params, rtn

from .conftest import needs_gptqmodel


def reference(w, h, bits, group_size, sym, salient, damp, act_order, dynamic=False, then_salient=False):
    """``then_salient``: after the other columns, quantize the salient ones too, in their given order."""
    n = w.shape[1]
    w = w.double().clone()
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(n, dtype=torch.float64)
    mask = torch.ones(n, dtype=torch.bool)
    mask[salient] = False
    scale, zero = grid_params(w.float(), Grid(bits, group_size, sym), mask)
    s = expand_groups(scale, group_size, n).double()
    z = expand_groups(zero, group_size, n).double()
    order = [j for j in range(n) if mask[j]]
    if act_order:
        order = sorted(order, key=lambda j: -h[j, j].item())  # sorted() is stable: ties keep index order
    if then_salient:
        order += [int(j) for j in salient]
    hinv = torch.linalg.inv(h)
    fitted = set()
    for j in order:
        if dynamic and j // group_size not in fitted:  # fit the group on its weights as they are now
            fitted.add(j // group_size)
            cols = [c for c in order if c // group_size == j // group_size]
            gs, gz = row_params(w[:, cols].float(), Grid(bits, group_size, sym))
            s[:, cols], z[:, cols] = gs.double(), gz.double()
        q = fake_quantize(w[:, j], s[:, j], z[:, j], bits)
        err = (w[:, j] - q) / hinv[j, j]
        w -= err[:, None] * hinv[j][None, :]
        w[:, j] = q
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return w.float()


def problem(seed, out=24, n=70, tokens=400):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g)
    x = torch.randn(tokens, n, generator=g) @ (torch.randn(n, n, generator=g) * 0.3 + torch.eye(n))
    x[:, 3] *= 8  # an outlier feature
    return w, x, x.T @ x / tokens


@pytest.mark.parametrize("salient", [[], [3, 11, 50]])
@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_equals_obs_reference(salient, group_size, act_order, sym):
    w, _, h = problem(len(salient) + group_size + act_order + sym)
    idx = torch.tensor(salient, dtype=torch.long)
    got = gptq(w, h, Grid(3, group_size, sym), idx, damp=0.01, block_size=8, act_order=act_order).effective_weight()
    ref = reference(w, h, 3, group_size, sym, idx, 0.01, act_order)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def damped(h, damp=0.01):
    return h.double() + damp * torch.diag(h).double().mean() * torch.eye(h.shape[0], dtype=torch.float64)


@pytest.mark.parametrize("group_size,act_order", [(-1, False), (16, False), (-1, True)])
def test_layer_error_is_the_output_error_and_the_salient_share_what_quantizing_them_adds(group_size, act_order):
    """GPTQ's loss equals 1/2 tr(D H D^T) for D = W - the result (each OBS step adds (w - q)^2 / [H^-1]_jj exactly),
    and with the salient columns quantized too (the OBS reference going on over them) the two losses add up."""
    w, _, h = problem(7 + group_size)
    idx = torch.tensor([3, 11, 50])
    got = gptq(w, h, Grid(3, group_size, True), idx, damp=0.01, block_size=8, act_order=act_order)
    hd = damped(h)

    def half_trace(d):
        return float(0.5 * torch.trace(d.double() @ hd @ d.double().T))

    assert float(got.error) == pytest.approx(half_trace(w - got.effective_weight()), rel=1e-4)
    everything = reference(w, h, 3, group_size, True, idx, 0.01, act_order, then_salient=True)
    assert float(got.error + got.error_salient) == pytest.approx(half_trace(w - everything), rel=1e-4)
    assert got.error_salient > 0
    plain = gptq(w, h, Grid(3, group_size, True), idx[:0], damp=0.01, block_size=8, act_order=act_order)
    assert plain.error_salient == 0 and float(plain.error) == pytest.approx(half_trace(w - plain.effective_weight()), rel=1e-4)


@pytest.mark.parametrize("salient", [[], [3, 11, 16, 17, 50]])
@pytest.mark.parametrize("group_size,block_size", [(16, 8), (16, 40), (32, 16)])
@pytest.mark.parametrize("sym", [True, False])
def test_dynamic_groups_equal_reference(salient, group_size, block_size, sym):
    w, _, h = problem(len(salient) + group_size + block_size + sym)
    idx = torch.tensor(salient, dtype=torch.long)
    got = gptq(w, h, Grid(3, group_size, sym), idx, block_size=block_size, dynamic_groups=True)
    ref = reference(w, h, 3, group_size, sym, idx, 0.01, False, dynamic=True)
    torch.testing.assert_close(got.effective_weight(), ref, atol=1e-5, rtol=1e-5)
    # the stored per-group parameters are the ones the columns were rounded with
    assert torch.equal(got.dequantize_grid()[:, got.salient_idx], fake_quantize(
        got.salient_weight, expand_groups(got.scale, group_size, 70)[:, idx], expand_groups(got.zero, group_size, 70)[:, idx], 3))


@needs_gptqmodel
@pytest.mark.parametrize("bits,group_size,act_order", [(3, -1, False), (3, -1, True), (4, 32, False), (4, 32, True), (2, 32, False)])
def test_gptq_equals_gptqmodel(bits, group_size, act_order):
    """Same weights and inputs through gptqmodel 7.6.0's own ``GPTQ`` class (the path HF optimum drives):
    the same quantized weights. Its grid is the GPTQ tools' symmetric step with no clipping search; its
    groups are fitted when reached, except with act-order, where they are static (``static_groups``).
    One group per block here: with groups smaller than a block the tools fit a group on weights that
    lack the updates of the earlier columns of the same block, ours on the updated ones (module doc)."""
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    w, x, h = problem(bits + group_size, out=40, n=96, tokens=500)
    lin = torch.nn.Linear(96, 40, bias=False)
    lin.weight.data = w.clone()
    static = act_order and group_size != -1
    cfg = QuantizeConfig(bits=bits, group_size=group_size, sym=True, desc_act=act_order, static_groups=static,
                         act_group_aware=False, damp_percent=0.01, damp_auto_increment=0.0)
    ref = GPTQ(lin, cfg)
    ref.quantizer.configure(perchannel=True)
    ref.add_batch(x[None], None)
    ref.fasterquant(blocksize=32, percdamp=0.01, damp_auto_increment=0.0, group_size=group_size,
                    actorder=act_order, static_groups=static)
    got = gptq(w, h, Grid(bits, group_size, sym_step="gptq"), torch.tensor([], dtype=torch.long), block_size=32,
               act_order=act_order, dynamic_groups=not static)
    torch.testing.assert_close(got.effective_weight(), lin.weight.data, atol=1e-5, rtol=1e-5)


def spectrum(n, lowest, seed=0):
    """A float32 symmetric matrix with eigenvalues logspace(0, lowest) before rounding."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return ((q * torch.logspace(0, lowest, n, dtype=torch.float64)) @ q.T).float()


def test_inverse_cholesky_float32_then_float64_then_a_named_error(caplog):
    for lowest, warns in ((-3, False), (-8.5, True)):  # -8.5: float32 fails to factor, float64 does not
        h = spectrum(64, lowest)
        exact = torch.linalg.cholesky(torch.linalg.inv(h.double()), upper=True)
        caplog.clear()
        u = inverse_cholesky(h)
        assert u.dtype == torch.float32 and ("float64" in caplog.text) == warns
        torch.testing.assert_close(u.double(), exact, rtol=1e-3, atol=1e-3 * exact.abs().max().item())
    with pytest.raises(ValueError, match="quant.damp"):  # rounded to float32 it has negative eigenvalues
        inverse_cholesky(spectrum(64, -9))


def test_inverse_cholesky_falls_back_when_the_inverse_does_not_factor(monkeypatch, caplog):
    """H factors in float32 but its rounded inverse does not (what one machine's LAPACK did at the edge of float32):
    float64 then, not a raw LinAlgError."""
    real = torch.cholesky_inverse

    def spoiled(a, upper=False, *, out=None):  # float32 only: a negative diagonal entry, not positive definite
        res = real(a, upper=upper, out=out)
        if res.dtype == torch.float32:
            res[5, 5] = -1.0
        return res

    monkeypatch.setattr(torch, "cholesky_inverse", spoiled)
    h = spectrum(16, -2)
    exact = torch.linalg.cholesky(torch.linalg.inv(h.double()), upper=True)  # first: h's memory holds the result
    u = inverse_cholesky(h)
    assert "float64" in caplog.text
    torch.testing.assert_close(u.double(), exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())


def test_dynamic_groups_refuse_act_order():
    w, _, h = problem(0)
    with pytest.raises(ValueError, match="act_order"):
        gptq(w, h, Grid(3, 16), torch.tensor([], dtype=torch.long), act_order=True, dynamic_groups=True)


def test_dead_inputs_and_block_size_invariance():
    w, x, _ = problem(7)
    x[:, 9] = 0
    h = x.T @ x / len(x)
    idx = torch.tensor([3])
    a = gptq(w, h, Grid(4), idx, block_size=128).effective_weight()
    b = gptq(w, h, Grid(4), idx, block_size=5).effective_weight()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, reference(w, h, 4, -1, True, idx, 0.01, False), atol=1e-5, rtol=1e-5)
    assert (a[:, 9] == 0).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_output_error_below_rtn(bits):
    w, x, h = problem(bits)
    idx = torch.tensor([], dtype=torch.long)
    e_gptq = torch.linalg.norm((w - gptq(w, h, Grid(bits), idx).effective_weight()) @ x.T)
    e_rtn = torch.linalg.norm((w - rtn(w, Grid(bits), idx).effective_weight()) @ x.T)
    assert e_gptq < 0.9 * e_rtn


def test_salient_columns_absorb_error_and_reduce_it():
    w, x, h = problem(11)
    idx = torch.tensor([3, 20, 41])
    none = torch.tensor([], dtype=torch.long)
    qs = gptq(w, h, Grid(3), idx)
    eff = qs.effective_weight()
    # the salient columns moved (they absorbed propagated error) ...
    assert (eff[:, idx] - w[:, idx]).abs().max() > 1e-3
    # ... and keeping them in full precision lowers the output error
    e_sal = torch.linalg.norm((w - eff) @ x.T)
    e_none = torch.linalg.norm((w - gptq(w, h, Grid(3), none).effective_weight()) @ x.T)
    assert e_sal < e_none


def test_uncorrelated_inputs_reduce_gptq_to_rtn():
    # A diagonal Hessian has nothing to propagate: GPTQ is RTN and salient columns stay exact.
    w = torch.randn(10, 30)
    h = torch.diag(torch.rand(30) + 0.5)
    idx = torch.tensor([2, 5])
    got = gptq(w, h, Grid(3), idx)
    torch.testing.assert_close(got.effective_weight(), rtn(w, Grid(3), idx).effective_weight())
    assert torch.equal(got.salient_weight, w[:, idx])


def test_compensate_is_the_least_squares_optimum_of_the_kept_columns():
    """Against an explicit least-squares solve on the inputs: with the other columns frozen at Q, the kept
    columns minimise the output error, and no other choice does better than that (the original columns
    among them)."""
    from gift_quant.gptq import compensate

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    w = torch.randn(10, 24, generator=g, dtype=torch.float64)
    q = w + 0.1 * torch.randn(10, 24, generator=g, dtype=torch.float64)  # someone else's quantization
    idx = torch.tensor([2, 7, 19])
    rest = torch.ones(24, dtype=torch.bool)
    rest[idx] = False
    got = compensate(w, q, x.T @ x, idx, damp=0.0).double()
    target = x @ w.T - x[:, rest] @ q[:, rest].T
    ref = torch.linalg.lstsq(x[:, idx], target).solution.T
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

    def error(ws):
        full = q.clone()
        full[:, idx] = ws
        return float(((x @ (full - w).T) ** 2).sum())

    assert error(got) < error(w[:, idx])  # the original columns beside Q are worse
