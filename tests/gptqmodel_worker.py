"""Write a GPTQ checkpoint with gptqmodel and record what gptqmodel's own loader computes from it.

    python tests/gptqmodel_worker.py FP_FOLDER OUT FORMAT DESC_ACT BITS GROUP SYM

Runs in its own process: gptqmodel patches torch and transformers when imported, which the test
process should not inherit. Quantizes FP_FOLDER with gptqmodel (random-token calibration), saves it in
FORMAT (``gptq`` or ``gptq_v2``) to OUT, loads OUT again with gptqmodel's loader and plain torch kernel,
and saves to ``OUT/reference.pt`` the logits of fixed token ids and each quantized layer's dequantized
weight, both computed in float32 (the loaded fp16 scales cast up, so the kernel's arithmetic is exact).
"""
import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # its loader pool asks for 2 workers

import torch  # noqa: E402
from gptqmodel import BACKEND, GPTQModel, QuantizeConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def main(fp: str, out: str, fmt: str, desc_act: str, bits: str, group: str, sym: str) -> None:
    group_size = int(group)
    cfg = QuantizeConfig(bits=int(bits), group_size=group_size, sym=sym == "1", desc_act=desc_act == "1", format=fmt,
                         act_group_aware=desc_act != "1" and group_size != -1)
    model = GPTQModel.load(fp, cfg, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 1000, (64,), generator=g).tolist(), "attention_mask": [1] * 64}
            for _ in range(8)]
    model.quantize(data, batch_size=4)
    model.save(out)
    del model

    # its torch kernel loads in fp16 / bf16 only: load fp16, cast up, and put back the checkpoint's own float32
    # tensors outside the quantized layers (which the fp16 load rounded)
    loaded = GPTQModel.load(out, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model.float().eval()
    plain = {k: v for k, v in load_file(os.path.join(out, "model.safetensors")).items() if v.is_floating_point()
             and not k.endswith(".scales")}
    assert not loaded.load_state_dict(plain, strict=False).unexpected_keys
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    weights = {n: m.dequantize_weight().T.contiguous() for n, m in loaded.named_modules() if hasattr(m, "qweight")}
    with torch.no_grad():
        logits = loaded(ids).logits
    torch.save({"ids": ids, "logits": logits, "weights": weights}, os.path.join(out, "reference.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:8])
