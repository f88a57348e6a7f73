"""The prepared GPU check: the scale a user runs at, on random weights built from a config (nothing downloaded).

    python benchmarks/gpu_check.py [--out FILE.json]     # one GPU: a Llama-3-8B-shaped model
    python benchmarks/gpu_check.py --tiny                # the same steps on a tiny config, on the CPU

Steps (each prints a table row; ``--out`` writes all rows as JSON):

1. cpu vs device: a small model quantized (GPTQ W3 + salient columns) with ``device=cpu`` and on the
   device; share of equal codes and the largest effective-weight difference.
2. calibrate + GPTQ of two blocks of the full-size config, block by block on the device from a model on
   the CPU (128 windows of 2048 tokens, the paper's calibration): seconds and peak device memory per
   block, extrapolated to all blocks.
3. one training step of the whole model (bf16, codes on the device, 128 salient columns a layer,
   gradient checkpointing, micro-batch 1 x 2048) through ``gift_quant.train.train``, with the paper's
   noise and without: s/step, tokens/s, peak memory; beside it PEFT LoRA r=64 on all seven projections
   of the same weights held dense in bf16 (PEFT cannot wrap our integer layer, so its base takes 2 bytes
   a weight where ours takes 1).
4. greedy decode tokens/s of the ``gift`` layers (codes dequantized every forward) against the same
   weights merged into dense bf16 linears.
The memory plan's estimate for the training step is printed beside the measured peak.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from gift_quant import devices
from gift_quant.compress import quantize_model
from gift_quant.devices import GiB
from gift_quant.layers import merge_to_dense, wrap_quantized
from gift_quant.plan import plan_train, shape_of
from gift_quant.quantize import Grid, QuantizedWeight, rtn
from gift_quant.recipe import ALL_PROJECTIONS, QuantSpec, SaliencySpec, TrainSpec, parse_recipe
from gift_quant.train import train

CONFIGS = Path(__file__).resolve().parent.parent / "gift_quant" / "configs"


def config(tiny: bool, **changes):
    """A tiny Llama, or Llama-3-8B's shipped config; ``changes`` override fields (e.g. num_hidden_layers)."""
    from transformers import LlamaConfig

    if tiny:
        data = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    else:
        data = json.loads((CONFIGS / "llama-3-8b.json").read_text())
    return LlamaConfig(**{k: v for k, v in {**data, **changes}.items() if not k.startswith("_") and k != "model_type"})


def build(cfg, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with device:
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_same_codes(device: torch.device, tiny: bool) -> dict:
    cfg = config(True) if tiny else config(True, hidden_size=256, intermediate_size=704)
    windows = torch.randint(0, cfg.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    sal, quant = SaliencySpec(k=8), QuantSpec(bits=3)
    res = {}
    for where in ("cpu", device):
        model = build(cfg, torch.device("cpu"), torch.float32)
        res[str(where)] = quantize_model(model, windows, sal, quant, batch_size=4, device=where)
    a, b = res["cpu"], res[str(device)]
    same = sum(int((a[n].codes == b[n].codes).sum()) for n in a) / sum(a[n].codes.numel() for n in a)
    diff = max(float((a[n].effective_weight() - b[n].effective_weight()).abs().max()) for n in a)
    return {"step": "cpu vs device codes", "equal_codes": same, "max_weight_diff": diff,
            "same_salient": all(torch.equal(a[n].salient_idx, b[n].salient_idx) for n in a)}


def check_calibration(device: torch.device, tiny: bool) -> dict:
    cfg = config(tiny, num_hidden_layers=2)
    full_blocks = config(tiny).num_hidden_layers
    n, seq = (8, 128) if tiny else (128, 2048)
    model = build(cfg, torch.device("cpu"), torch.bfloat16 if device.type == "cuda" else torch.float32)
    windows = torch.randint(0, cfg.vocab_size, (n, seq), generator=torch.Generator().manual_seed(0))
    _sync(device)
    t0 = time.time()
    with devices.peak(device) as used:
        quantize_model(model, windows, SaliencySpec(k=8 if tiny else 128), QuantSpec(bits=3), batch_size=4,
                       device=device)
    _sync(device)
    s = time.time() - t0
    return {"step": "calibrate + GPTQ, 2 blocks", "windows": f"{n} x {seq}", "s_per_block": s / 2,
            "peak_gib": used.peak / GiB, f"extrapolated_s_{full_blocks}_blocks": s / 2 * full_blocks}


def rtn_random_salient(model: nn.Module, k: int) -> dict[str, QuantizedWeight]:
    """Every projection of ``model`` RTN W3 (no clipping search) with ``k`` seeded random salient columns:
    the cost of a GIFT-SW model without calibrating one (the columns' choice does not change it)."""
    results = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ALL_PROJECTIONS:
            idx = torch.randperm(m.in_features, generator=torch.Generator().manual_seed(len(results)))[:k].sort().values
            results[name] = rtn(m.weight.detach(), Grid(3), idx.to(m.weight.device))
    return results


def quantized_model(cfg, device: torch.device, dtype: torch.dtype, k: int) -> nn.Module:
    """The model of ``cfg`` wrapped as GIFT-SW (``rtn_random_salient``, the paper's noise)."""
    model = build(cfg, device, dtype)
    wrap_quantized(model, rtn_random_salient(model, k), "gaussian", 4)
    return model


def _train_row(label: str, model: nn.Module, spec: TrainSpec, device: torch.device, vocab: int, work: Path,
               estimate: int | None = None) -> dict:
    ids = torch.randint(0, vocab, (8, spec.seq_len), generator=torch.Generator().manual_seed(1))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with devices.peak(device) as used:
        train(model, ids, ids.clone(), spec, work / label.replace(" ", "_"), device=device)
    log = [json.loads(x) for x in (work / label.replace(" ", "_") / "train_log.jsonl").read_text().splitlines()]
    steady = log[1:] or log
    row = {"step": f"train step: {label}", "trainable": trainable,
           "s_per_step": sum(r["s_per_step"] for r in steady) / len(steady),
           "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady), "peak_gib": used.peak / GiB}
    if estimate is not None:
        row["plan_gib"] = estimate / GiB
    return row


def check_training(device: torch.device, tiny: bool, work: Path) -> list[dict]:
    cfg = config(tiny)
    seq, k = (64, 8) if tiny else (2048, 128)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    recipe = parse_recipe({"model": {"ref": "-", "dtype": "bfloat16" if dtype == torch.bfloat16 else "float32"},
                           "saliency": {"k": k}, "train": {"micro_batch_size": 1, "seq_len": seq,
                                                           "gradient_checkpointing": True}})
    estimate = sum(plan_train(shape_of(cfg, recipe), recipe, device).values())
    for noise in ("gaussian", "none"):
        model = quantized_model(cfg, device, dtype, k)
        for layer in model.modules():
            if hasattr(layer, "noise"):
                layer.noise = noise
        spec = TrainSpec(steps=3, micro_batch_size=1, seq_len=seq, lr=1e-4, gradient_checkpointing=True,
                         checkpoint_every=10**6, noise=noise)
        rows.append(_train_row(f"GIFT-SW k={k}, noise {noise}", model, spec, device, cfg.vocab_size, work, estimate))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    from peft import LoraConfig, get_peft_model

    model = quantized_model(cfg, device, dtype, 0)
    merge_to_dense(model)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, target_modules=ALL_PROJECTIONS))
    spec = TrainSpec(steps=3, micro_batch_size=1, seq_len=seq, lr=1e-4, gradient_checkpointing=True,
                     checkpoint_every=10**6, noise="none")
    rows.append(_train_row("LoRA r=64 (peft, dense bf16 base)", model, spec, device, cfg.vocab_size, work))
    return rows


@torch.no_grad()
def _decode(model: nn.Module, device: torch.device, vocab: int, tokens: int) -> float:
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(2)).to(device)
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
    _sync(device)
    t0 = time.time()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    _sync(device)
    return tokens / (time.time() - t0)


def check_decode(device: torch.device, tiny: bool) -> dict:
    cfg = config(tiny)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = 8 if tiny else 64
    model = quantized_model(cfg, device, dtype, 8 if tiny else 128)
    for layer in model.modules():
        if hasattr(layer, "noise"):
            layer.noise = "none"
    gift = _decode(model.eval(), device, cfg.vocab_size, tokens)
    merge_to_dense(model)
    dense_tps = _decode(model.eval(), device, cfg.vocab_size, tokens)
    return {"step": "greedy decode, batch 1", "gift_tokens_per_s": gift, "dense_tokens_per_s": dense_tps,
            "ratio": gift / dense_tps}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny config on the CPU (what the test suite runs)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    device = torch.device("cpu") if args.tiny or not torch.cuda.is_available() else torch.device("cuda", 0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {name}, torch {torch.__version__}, {'tiny config' if args.tiny else 'Llama-3-8B shape'}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for fn in (lambda: [check_same_codes(device, args.tiny)], lambda: [check_calibration(device, args.tiny)],
                   lambda: check_training(device, args.tiny, Path(work)), lambda: [check_decode(device, args.tiny)]):
            t0 = time.time()
            for row in fn():
                row["wall_s"] = round(time.time() - t0, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
