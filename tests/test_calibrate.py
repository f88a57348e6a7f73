"""Block-by-block statistics against plain whole-model forward hooks."""
import pytest
import torch

from gift_quant.calibrate import run_blocks
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
