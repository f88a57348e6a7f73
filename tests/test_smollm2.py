"""Integration on the real SmolLM2-135M-Instruct: 3-bit per-row, GPTQ vs RTN, salient columns vs none."""
import pytest

from gift_quant.data import nonoverlapping_windows, sample_windows
from gift_quant.evaluate import perplexity
from gift_quant.quantize import collect_stats, quantize_with_stats
from gift_quant.recipe import QuantSpec, SaliencySpec
from gift_quant.sources import read_text, tokenize

from .conftest import C4, WIKI

pytestmark = pytest.mark.slow


def test_gptq_salient_columns_on_smollm2(smollm2):
    model, tok = smollm2
    original = {n: p.clone() for n, p in model.state_dict().items()}
    calib = sample_windows(tokenize(tok, read_text(C4)), 16, 512, seed=0)
    evalw = nonoverlapping_windows(tokenize(tok, read_text(WIKI)), 512, 8)
    stats = collect_stats(model, calib, SaliencySpec().targets)
    fp = perplexity(model, evalw)

    def ppl(method: str, k: int) -> float:
        model.load_state_dict(original)
        quantize_with_stats(model, stats, SaliencySpec(k=k, k_overrides={"down_proj": 3 * k}),
                            QuantSpec(method=method, bits=3, group_size=-1))
        return perplexity(model, evalw)

    rtn_sal, gptq_sal, gptq_plain = ppl("rtn", 16), ppl("gptq", 16), ppl("gptq", 0)
    model.load_state_dict(original)
    print(f"fp {fp:.1f}  rtn+sal {rtn_sal:.1f}  gptq+sal {gptq_sal:.1f}  gptq {gptq_plain:.1f}")
    assert fp < gptq_sal < rtn_sal
    assert gptq_sal < 0.5 * gptq_plain
