"""Block-by-block statistics against plain whole-model forward hooks."""
from types import SimpleNamespace

import pytest
import torch

from gift_quant.calibrate import run_blocks, served_budget
from gift_quant.families import decoder_layers
from gift_quant.quantize import collect_stats
from gift_quant.recipe import ALL_PROJECTIONS

from .conftest import tiny_llama


def reference_inputs(model, ids):
    """Inputs of every targeted linear from one ordinary forward of the whole model."""
    seen = {}
    hooks = [m.register_forward_hook(lambda _m, inp, _o, n=n: seen.setdefault(n, []).append(inp[0].reshape(-1, inp[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ALL_PROJECTIONS]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_block_statistics_equal_whole_model_hooks():
    model = tiny_llama(layers=3)
    ids = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))
    ref = reference_inputs(model, ids)
    stats = collect_stats(model, ids, ALL_PROJECTIONS, batch_size=4)
    assert set(stats) == set(ref)
    for name, x in ref.items():
        st = stats[name]
        assert st.n_tokens == 6 * 24
        torch.testing.assert_close(st.hessian, x.T @ x, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(st.gptq_hessian(), 2 * x.T @ x / len(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(st.absmax, x.abs().amax(0))
        torch.testing.assert_close(st.norm(2), x.norm(dim=0), atol=1e-4, rtol=1e-4)


def test_true_sequential_order_and_sequential_feeding():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    calls = []

    def on_block(i, linears, stats):
        calls.append((i, sorted(linears)))
        for lin in linears.values():  # zero every quantized layer: later groups must see the change
            lin.weight.data.zero_()
        if "self_attn.o_proj" in linears:
            # o_proj's input is the attention output of the zeroed v_proj: exactly zero
            assert stats["self_attn.o_proj"].absmax.max() == 0

    run_blocks(model, ids, ALL_PROJECTIONS, on_block, batch_size=2)
    assert calls[:4] == [(0, ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]), (0, ["self_attn.o_proj"]),
                         (0, ["mlp.gate_proj", "mlp.up_proj"]), (0, ["mlp.down_proj"])]
    assert len(calls) == 8


def test_group_passes_stopped_at_their_input_measure_what_the_whole_model_reads():
    """True-sequential passes stop where each group's input arrives and serve finished layers; with nothing
    changed between groups, every layer's statistics are still those of its input in one plain forward."""
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(6))
    ref = reference_inputs(model, ids)
    names = {m: n for n, m in model.named_modules()}
    got = {}
    run_blocks(model, ids, ALL_PROJECTIONS, lambda _i, linears, stats: got.update(
        {names[lin]: stats[n] for n, lin in linears.items()}), batch_size=2)
    assert set(got) == set(ref)
    for name, x in ref.items():
        assert got[name].n_tokens == 4 * 16
        torch.testing.assert_close(got[name].hessian, x.T @ x, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(got[name].absmax, x.abs().amax(0))


def _stats_from(x: torch.Tensor, rows: int):
    """Statistics of ``x`` fed ``rows`` tokens at a time (the batches' order, so float sums match)."""
    from gift_quant.calibrate import InputStats

    st = InputStats(x.shape[1])
    for chunk in x.split(rows):
        st.update(chunk)
    return st


def test_block_offload_path_equals_whole_model_reference():
    """Non-sequential GPTQ + salient columns through the block-by-block path with the inputs kept off the
    device (``resident=False``) equals each layer quantized from one ordinary whole-model forward."""
    from gift_quant.quantize import quantize_linear, quantize_model
    from gift_quant.recipe import QuantSpec, SaliencySpec

    model = tiny_llama(layers=2)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    sal, quant = SaliencySpec(k=4), QuantSpec(bits=3, clip_steps=5)
    modules = dict(model.named_modules())
    ref = {n: quantize_linear(modules[n].weight, _stats_from(x, 2 * 16), sal, quant, n.rsplit(".", 1)[-1])
           for n, x in reference_inputs(model, ids).items()}
    for resident in (False, True):
        got = quantize_model(tiny_llama(layers=2), ids, sal, quant, batch_size=2, sequential=False, device="cpu",
                             resident=resident)
        assert set(got) == set(ref)
        for n in ref:
            assert torch.equal(got[n].salient_idx, ref[n].salient_idx), n
            assert torch.equal(got[n].codes, ref[n].codes), n
            assert got[n].codes.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_quantize_on_the_gpu_equals_the_cpu():
    from gift_quant.quantize import quantize_model
    from gift_quant.recipe import QuantSpec, SaliencySpec

    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    sal, quant = SaliencySpec(k=4), QuantSpec(bits=3)
    cpu = quantize_model(tiny_llama(layers=2), ids, sal, quant, batch_size=2, device="cpu")
    model = tiny_llama(layers=2)
    gpu = quantize_model(model, ids, sal, quant, batch_size=2, device="cuda")
    assert next(model.parameters()).device.type == "cpu"  # every block went back
    for n in cpu:
        assert torch.equal(cpu[n].salient_idx, gpu[n].salient_idx)
        assert (cpu[n].codes == gpu[n].codes).float().mean() > 0.999


def _linear_calls(monkeypatch) -> list[int]:
    """A counter of the matmuls ``nn.Linear`` computes (served layers compute none)."""
    count = [0]
    linear = torch.nn.functional.linear

    def counted(*args, **kwargs):
        count[0] += 1
        return linear(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", counted)
    return count


def _sequential_run(model, ids, budget: int | None, monkeypatch):
    """Every group's statistics and every block's output of a true-sequential pass in which each group is changed
    once measured; ``budget``: bytes for served outputs (None: the machine's)."""
    import gift_quant.calibrate as calibrate

    monkeypatch.setattr(calibrate, "served_budget", served_budget if budget is None else lambda *_a, **_k: budget)
    seen = []

    def on_block(i, linears, stats):
        seen.extend(stats[n].hessian.clone() for n in sorted(linears))
        for lin in linears.values():
            lin.weight.data.mul_(0.5).add_(0.01)

    outputs = []
    hook = decoder_layers(model)[-1].register_forward_hook(
        lambda _m, _i, out: outputs.append(calibrate.block_output(out).clone()))
    run_blocks(model, ids, ALL_PROJECTIONS, on_block, batch_size=2)
    hook.remove()
    return seen, outputs


def test_served_outputs_change_nothing_and_skip_the_finished_layers(monkeypatch):
    """Llama, 2 blocks, 2 batches. Computed matmuls by hand: the layout's first forward (one batch, 7 layers), then
    per block and batch the group passes, each stopped where its group's input arrives, and the outputs: q/k/v's
    (0), o's (q/k/v: 3, recorded), gate/up's (o: 1, q/k/v served), down's (gate/up: 2, q/k/v/o served), the outputs
    (down: 1, the rest served): 7, one forward, against 0 + 3 + 4 + 6 + 7 = 20 computing everything. A budget of the
    first batch's q/k/v outputs (k and v are half q's width: 2 of 4 heads), recorded batch by batch, serves those
    alone: 0 + 3 + 1 + 3 + 4 = 11 on that batch, 20 on the other."""
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(4))
    count = _linear_calls(monkeypatch)
    runs = {}
    first_qkv = 2 * 16 * (64 + 32 + 32) * 4  # bytes, float32
    for budget, matmuls in [(0, 7 + 2 * 2 * 20), (None, 7 + 2 * 2 * 7), (first_qkv, 7 + 2 * (11 + 20))]:
        count[0] = 0
        runs[budget] = _sequential_run(tiny_llama(layers=2), ids, budget, monkeypatch)
        assert count[0] == matmuls, budget
    for budget in (None, first_qkv):
        for a, b in zip(runs[0][0] + runs[0][1], runs[budget][0] + runs[budget][1], strict=True):
            assert torch.equal(a, b)


class _OutOfOrder(torch.nn.Module):
    """A block whose layers are declared in another order than they run (q, up, down, o), o called twice and
    q's output changed in place: the served outputs must still be exactly what computing gives."""

    def __init__(self, d: int):
        super().__init__()
        self.q_proj, self.down_proj, self.o_proj, self.up_proj = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, h, **_kw):
        a = self.q_proj(h)
        a.mul_(2.0)
        x = self.down_proj(torch.tanh(self.up_proj(torch.relu(a))))
        return h + self.o_proj(self.o_proj(x))


class _Toy(torch.nn.Module):
    """Laid out as a Llama (``model.layers``, ``config.model_type``), which is all ``families`` reads of it."""

    config = SimpleNamespace(model_type="llama")

    def __init__(self, d: int = 16, blocks: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(32, d)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(_OutOfOrder(d) for _ in range(blocks))

    def forward(self, ids, use_cache=False):
        h = self.embed(ids)
        for block in self.model.layers:
            h = block(h)
        return h


def test_served_outputs_exact_out_of_declaration_order(monkeypatch):
    """Groups in declaration order: q, down, o, up. down is final when o's group is measured but up, which runs
    before it, is not: down's output there must not be recorded (nor served later). q is final from down's pass on
    and served after, though the block changes its output in place; o runs twice a forward."""
    ids = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(5))
    count = _linear_calls(monkeypatch)
    matmuls = {}
    runs = {}
    for budget in (0, None):
        count[0] = 0
        runs[budget] = _sequential_run(_Toy(), ids, budget, monkeypatch)
        matmuls[budget] = count[0]
    for a, b in zip(runs[0][0] + runs[0][1], runs[None][0] + runs[None][1], strict=True):
        assert torch.equal(a, b)
    # one batch's layout forward (q, up, down, o: 4), then per block and batch the passes of q (0), down (q, up: 2),
    # o (q, up, down: 3), up (q: 1) and the outputs (q, up, down, o twice: 5): 11; served, q is computed in down's
    # pass only: 8
    assert matmuls == {0: 4 + 2 * 2 * 11, None: 4 + 2 * 2 * 8}
