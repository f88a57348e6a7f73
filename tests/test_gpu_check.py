"""benchmarks/gpu_check.py --tiny runs on the CPU, so the prepared GPU script cannot rot."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: what the GPU run and every paper recipe use
def test_gpu_check_tiny_runs_every_step(tmp_path, dtype):
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--dtype", dtype,
                          "--out", str(tmp_path / "rows.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["step"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert rows["cpu vs device codes"]["equal_codes"] == 1.0  # --tiny: both sides on the CPU
    assert rows["calibrate + GPTQ, 2 blocks"]["s_per_block"] > 0
    # tiny config: hidden 64, kv 32, MLP 176, 2 blocks; outputs of q,k,v,o,gate,up,down = 64,32,32,64,176,176,64
    assert rows["train step: GIFT-SW k=8, noise gaussian"]["trainable"] == 2 * 8 * (64 + 32 + 32 + 64 + 176 + 176 + 64)
    ins = [64] * 6 + [176]
    outs = [64, 32, 32, 64, 176, 176, 64]
    assert rows["train step: LoRA r=64 (peft, dense bf16 base)"]["trainable"] == 2 * sum(
        64 * (i + o) for i, o in zip(ins, outs))
    assert rows["greedy decode, batch 1"]["ratio"] > 0
    rec = rows["recover on the device (2 blocks)"]
    assert set(rec["ppl"]) == {"full precision", "RTN W3", "GPTQ W3", "GPTQ W3 + salient columns", "GIFT-SW W3",
                               "GPTQ W3 + LoRA r=2"}
    # the gift export, loaded anew through transformers, scores what the report scored (fp16 salient columns)
    assert abs(rec["gift_vs_report_ppl"] - 1) < 1e-3
    assert rec["gift_vs_dense_max_logit_diff"] < 1e-2 * rec["logit_scale"]
