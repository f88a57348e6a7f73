"""Size on disk, bits per weight, load time and CPU greedy-generation speed of the export formats.

    python benchmarks/bench_export.py [--bits 2 3 4] [--new-tokens 32]

SmolLM2-135M-Instruct, RTN of every projection at ``bits`` with group 64 (gptqmodel's CPU kernels
need SmolLM2's 576 inputs divisible by the group) and 16 salient columns a layer (48 for
down_proj, `gift` metric from 8 C4 windows). Side by side, in this one process:

* ``gift``: the native folder through ``AutoModelForCausalLM.from_pretrained`` (``import gift_quant``
  registers the quantizer; plain torch dequantization in every forward);
* ``gptq+lora``: transformers + gptqmodel (its default CPU kernel) + the PEFT adapter;
* ``dense fp32``: the effective weights as a plain checkpoint, loaded in fp32.

Bits per weight are those the files spend on the quantized linears (read from the safetensors
headers), next to METHOD section 7's formula. Load times are warm (files in the page cache,
libraries imported). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import calibration, smollm2

import gift_quant  # noqa: F401  registers quant_method "gift" with transformers
from gift_quant.gift_format import export_gift
from gift_quant.gptq_lora_format import export_gptq_lora
from gift_quant.quantize import collect_stats, quantize_with_stats
from gift_quant.recipe import QuantSpec, SaliencySpec
from gift_quant.sizes import bits_per_weight, storage
from gift_quant.sources import SMOLLM2

MODEL = SMOLLM2
PROMPT = "The history of the Roman Empire begins"


def load_format(fmt: str, folder: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if fmt == "gptq+lora":
        base = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
        return PeftModel.from_pretrained(base, folder / "adapter")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@torch.no_grad()
def tokens_per_second(model, ids: torch.Tensor, new_tokens: int) -> float:
    model.eval()
    model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
    t = time.time()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert out.shape[1] - ids.shape[1] == new_tokens
    return new_tokens / (time.time() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()

    model, tok = smollm2()
    original = {n: p.detach().clone() for n, p in model.state_dict().items()}
    sal = SaliencySpec(k=16, k_overrides={"down_proj": 48})
    stats = collect_stats(model, calibration(tok, 8), sal.targets)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    tmp = Path(tempfile.mkdtemp(prefix="bench_export_"))
    rows = []
    for bits in args.bits:
        model.load_state_dict(original)
        results = quantize_with_stats(model, stats, sal, QuantSpec(method="rtn", bits=bits, group_size=64))
        shapes = {name: tuple(qw.codes.shape) for name, qw in results.items()}
        folders = {"gift": tmp / f"w{bits}-gift", "gptq+lora": tmp / f"w{bits}-gptq_lora", "dense fp32": tmp / f"w{bits}-dense"}
        export_gift(model, tok, results, folders["gift"], {})
        export_gptq_lora(model, tok, results, folders["gptq+lora"])
        model.half().save_pretrained(folders["dense fp32"])  # fp16 on disk, loaded as fp32
        tok.save_pretrained(folders["dense fp32"])
        model.float()
        formula = bits_per_weight(results)
        for fmt, folder in folders.items():
            st = storage(folder, shapes)
            t = time.time()
            loaded = load_format(fmt, folder)
            load_s = time.time() - t
            tps = tokens_per_second(loaded, ids, args.new_tokens)
            del loaded
            rows.append((bits, fmt, st["bytes"] / 1e6, st["linear_bits_per_weight"], formula, load_s, tps))
            print(f"| {bits} | {fmt} | {rows[-1][2]:.1f} | {rows[-1][3]:.3f} | {formula:.3f} | {load_s:.2f} | {tps:.2f} |",
                  flush=True)

    print(f"\nthreads: {torch.get_num_threads()}, prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens, batch 1\n")
    print("| bits | format | MB on disk | bits/weight in linears (files) | formula (METHOD 7) | load s | tokens/s | vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    dense = {b: tps for b, f, *_, tps in rows if f == "dense fp32"}
    for b, f, mb, bpw, formula, load_s, tps in rows:
        print(f"| {b} | {f} | {mb:.1f} | {bpw:.3f} | {formula:.3f} | {load_s:.2f} | {tps:.2f} | {tps / dense[b]:.2f}x |")


if __name__ == "__main__":
    main()
