"""Quantize with gptqmodel 7.6.0 on given calibration windows; print perplexity and wall time as JSON.

Run as a separate process by bench_quantize.py (gptqmodel patches torch/transformers globally on
import, so it stays out of our process). Arguments: model folder, windows .pt, eval windows .pt,
bits, group size, damp, output folder.
"""
import json
import os
import sys
import time

os.environ["GPTQMODEL_CPU_WORKERS"] = "2"  # its model loader pool asks for 2 workers

import torch  # noqa: E402
from gptqmodel import GPTQModel, QuantizeConfig  # noqa: E402

from gift_quant.evaluate import perplexity  # noqa: E402

model_dir, calib_pt, eval_pt, bits, group, damp, out = sys.argv[1:8]
calib = torch.load(calib_pt, weights_only=True)
evalw = torch.load(eval_pt, weights_only=True)
cfg = QuantizeConfig(bits=int(bits), group_size=int(group), sym=True, desc_act=False, act_group_aware=False, damp_percent=float(damp))
t0 = time.time()
model = GPTQModel.load(model_dir, cfg, device="cpu")
data = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in calib]
model.quantize(data, batch_size=8, calibration_sort=None)
t1 = time.time()
model.save(out)
del model
q = GPTQModel.load(out, device="cpu")
ppl = perplexity(q.model, evalw)
print("RESULT " + json.dumps({"ppl": ppl, "quantize_s": t1 - t0}))
