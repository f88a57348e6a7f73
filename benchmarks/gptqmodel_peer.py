"""Quantize with gptqmodel 7.6.0 on given calibration windows; print perplexity and wall time as JSON.

Run as a separate process by bench_quantize.py (gptqmodel patches torch/transformers globally on
import, so it stays out of our process). Arguments: model folder, windows .pt, eval windows .pt,
bits, group size, damp, output folder, dtype of gptqmodel's model (float32 matches our calibration; on
CPU gptqmodel's own default is bfloat16, which changes its Hessians and hence its result), and
optionally desc_act (1: act-order, whose g_idx the checkpoint then carries; default 0).

The perplexity is measured on the full-precision model with every quantized linear replaced by the
dequantization of gptqmodel's saved GPTQ v1 tensors (our unpacker, checked against gptqmodel's own
kernel in tests/test_export.py). That way any group size can be compared, including group 128 on
SmolLM2's 576 inputs, which gptqmodel's CPU kernels refuse to load.
"""
import os
import sys
import time
from pathlib import Path

os.environ["GPTQMODEL_CPU_WORKERS"] = "2"  # its model loader pool asks for 2 workers

import torch  # noqa: E402
from common import emit  # noqa: E402
from gptqmodel import GPTQModel, QuantizeConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from gift_quant.evaluate import perplexity  # noqa: E402
from gift_quant.pack import from_gptq  # noqa: E402
from gift_quant.sources import load_model  # noqa: E402

model_dir, calib_pt, eval_pt, bits, group, damp, out, dtype = sys.argv[1:9]
bits, group, desc_act = int(bits), int(group), sys.argv[9:10] == ["1"]
calib = torch.load(calib_pt, weights_only=True)
evalw = torch.load(eval_pt, weights_only=True)
cfg = QuantizeConfig(bits=bits, group_size=group, sym=True, desc_act=desc_act, act_group_aware=False,
                     damp_percent=float(damp))
t0 = time.time()
model = GPTQModel.load(model_dir, cfg, device="cpu", dtype=getattr(torch, dtype))
assert next(model.model.parameters()).dtype == getattr(torch, dtype)
data = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in calib]
model.quantize(data, batch_size=8, calibration_sort=None)
t1 = time.time()
model.save(out)
del model

tensors = {}
for f in Path(out).glob("*.safetensors"):
    tensors.update(load_file(f))
dense, _ = load_model(model_dir)
replaced = 0
for name, lin in dense.named_modules():
    if f"{name}.qweight" not in tensors:
        continue
    t = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
    qw = from_gptq(t, bits, group, lin.in_features, lin.out_features)
    lin.weight.data = qw.dequantize_grid().to(lin.weight.dtype)
    replaced += 1
assert replaced, f"no GPTQ tensors found in {out}"
ppl = perplexity(dense, evalw)
emit({"ppl": ppl, "quantize_s": t1 - t0, "layers": replaced})
