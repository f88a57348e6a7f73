"""Block-by-block statistics against plain whole-model forward hooks."""
import torch

from gift_quant.calibrate import run_blocks
from gift_quant.compress import collect_stats
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
