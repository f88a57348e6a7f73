"""Size on disk, bits per weight, load time and CPU greedy-generation speed of the export formats.

    python benchmarks/bench_export.py [--bits 2 3 4] [--new-tokens 32]

SmolLM2-135M-Instruct, RTN of every projection at ``bits`` with group 64 (gptqmodel's CPU kernels
need SmolLM2's 576 inputs divisible by the group) and 16 salient columns a layer (48 for
down_proj, `gift` metric from 8 C4 windows). Side by side, in this one process:

* ``gift bf16``: the native folder through ``AutoModelForCausalLM.from_pretrained(..., dtype=bfloat16)``
  (``import gift_quant`` registers the quantizer), its layers through torch's packed integer matmuls
  (``gift_quant.kernels``: int8 per row, int4 in groups; fast for bfloat16 activations only);
* ``gift bf16 dequant``: the same with the kernels switched off (``kernels.ENABLED = False``): the weight
  dequantized in plain torch in every forward, the fallback; ``gift fp32``: loaded in float32 (the
  kernels' float32 paths are slow, so it dequantizes);
* ``gptq+lora``: transformers + gptqmodel (its default CPU kernel) + the PEFT adapter;
* ``dense fp32`` / ``dense bf16``: the effective weights as a plain checkpoint, loaded in fp32 / bf16.

Decode: greedy tokens/s after a 7-token prompt, batch 1; prefill: ms for one forward of ``--prefill``
tokens. The memory-bound limit of a format against dense fp32 is 32 / (its bits per weight), for the
linears alone. ``--layer`` adds one 4096 x 4096 layer (Llama-2-7B's attention width) at W3 per row
(int8 kernel) and W3 g128 (int4 kernel) against ``nn.Linear`` in fp32 and bf16, 1 and 128 tokens.

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
from common import calibration, row, smollm2, table

import gift_quant  # noqa: F401  registers quant_method "gift" with transformers
from gift_quant import kernels
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

    kernels.ENABLED = not fmt.endswith("dequant")
    if fmt == "gptq+lora":
        base = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
        return PeftModel.from_pretrained(base, folder / "adapter")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if "bf16" in fmt else torch.float32)


@torch.no_grad()
def tokens_per_second(model, ids: torch.Tensor, new_tokens: int) -> float:
    model.eval()
    model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up (and the kernels' packing)
    t = time.time()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert out.shape[1] - ids.shape[1] == new_tokens
    return new_tokens / (time.time() - t)


@torch.no_grad()
def prefill_ms(model, tokens: int, repeat: int = 3) -> float:
    ids = torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    model(ids)
    t = time.time()
    for _ in range(repeat):
        model(ids)
    return (time.time() - t) / repeat * 1e3


def export_all(model, tok, results, tmp: Path, bits: int) -> dict[str, Path]:
    gift, dense = tmp / f"w{bits}-gift", tmp / f"w{bits}-dense"
    folders = {"gift bf16": gift, "gift bf16 dequant": gift, "gift fp32": gift, "gptq+lora": tmp / f"w{bits}-gptq_lora",
               "dense fp32": dense, "dense bf16": dense}
    export_gift(model, tok, results, gift, {})
    export_gptq_lora(model, tok, results, folders["gptq+lora"])
    model.half().save_pretrained(folders["dense fp32"])  # fp16 on disk, loaded as fp32 / bf16
    tok.save_pretrained(folders["dense fp32"])
    folders["dense bf16"] = folders["dense fp32"]
    model.float()
    return folders


@torch.no_grad()
def layer_table(repeat: int = 20) -> None:
    """One 4096 x 4096 layer (k = 128 salient columns) through the kernels against nn.Linear."""
    from gift_quant.grid import Grid, rtn
    from gift_quant.layers import SalientLinear

    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    dense = {dt: torch.nn.Linear(4096, 4096, bias=False, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
    for lin in dense.values():
        lin.weight.data.copy_(w)
    layers = {f"W3 {'row' if g == -1 else f'g{g}'} gift": SalientLinear.from_quantized(
        rtn(w, Grid(3, g), torch.arange(128) * 32), None, "none", 4, torch.bfloat16).eval() for g in (-1, 128)}
    table("layer 4096 x 4096, bf16 activations", "tokens", "ms (kernels)", "ms (dequant)", "ms fp32 linear",
          "ms bf16 linear", "kernels vs fp32", "kernels vs bf16")
    for tokens in (1, 128):
        x = torch.randn(tokens, 4096).bfloat16()
        ref = {dt: _ms(lambda dt=dt, xd=x.to(dt): dense[dt](xd), repeat) for dt in dense}
        for name, lin in layers.items():
            fast = _ms(lambda lin=lin: lin(x), repeat)
            kernels.ENABLED = False  # the dequantizing path
            slow = _ms(lambda lin=lin: lin(x), repeat)
            kernels.ENABLED = True
            row(name, tokens, f"{fast:.2f}", f"{slow:.2f}", f"{ref[torch.float32]:.2f}", f"{ref[torch.bfloat16]:.2f}",
                f"{ref[torch.float32] / fast:.2f}x", f"{ref[torch.bfloat16] / fast:.2f}x")


def _ms(fn, repeat: int) -> float:
    fn()
    t = time.time()
    for _ in range(repeat):
        fn()
    return (time.time() - t) / repeat * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--group", type=int, default=64, help="-1: per row (int8 kernel); 64: groups (int4 kernel)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--layer", action="store_true", help="also the 4096 x 4096 layer table")
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
        results = quantize_with_stats(model, stats, sal, QuantSpec(method="rtn", bits=bits, group_size=args.group))
        shapes = {name: tuple(qw.codes.shape) for name, qw in results.items()}
        formula = bits_per_weight(results)
        for fmt, folder in export_all(model, tok, results, tmp, bits).items():
            st = storage(folder, shapes)
            t = time.time()
            loaded = load_format(fmt, folder)
            load_s = time.time() - t
            tps, pre = tokens_per_second(loaded, ids, args.new_tokens), prefill_ms(loaded, args.prefill)
            del loaded
            rows.append((bits, fmt, st["bytes"] / 1e6, st["linear_bits_per_weight"], formula, load_s, tps, pre))
            print(rows[-1], flush=True)
    kernels.ENABLED = True
    print(f"\nthreads: {torch.get_num_threads()}, group {args.group}, prompt {ids.shape[1]} tokens, {args.new_tokens} "
          f"new tokens, batch 1; prefill {args.prefill} tokens\n")
    # bits a forward reads per weight of the linears: the int8 / int4 kernel's, or the dense weight's
    read = {"gift bf16": 8 if args.group == -1 else 4, "dense fp32": 32, "dense bf16": 16}
    table("bits", "format", "MB on disk", "bits/weight in linears (files)", "formula (METHOD 7)", "load s",
          "decode tokens/s", "vs dense fp32", "memory-bound limit", "prefill ms", "vs dense fp32")
    dense = {b: (tps, pre) for b, f, *_, tps, pre in rows if f == "dense fp32"}
    for b, f, mb, bpw, formula, load_s, tps, pre in rows:
        row(b, f, f"{mb:.1f}", f"{bpw:.3f}", f"{formula:.3f}", f"{load_s:.2f}", f"{tps:.2f}", f"{tps / dense[b][0]:.2f}x",
            f"{32 / read[f]:.0f}x" if f in read else "-", f"{pre:.0f}", f"{dense[b][1] / pre:.2f}x")
    if args.layer:
        layer_table()


if __name__ == "__main__":
    main()
