"""GIFT-SW training variants against LoRA at equal trainable parameters, on SmolLM2-135M-Instruct.

    python benchmarks/bench_train.py [--steps 60] [--lr 1e-3] [--eval-windows 20]

One GPTQ 3-bit per-row model with salient columns (16 a layer, 48 for down_proj; C4 calibration,
statistics of the full-precision model) is shared by every variant. Each variant trains in its own
child process (so peak memory is its own) on the same packed C4 windows of 256 tokens, 4 a step,
and is scored by perplexity on held-out Wikipedia (512-token windows). LoRA (peft, rank 10, all
seven projections: 3.05M parameters like the salient columns) trains on the same quantized base
with the salient columns frozen. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from gift_quant.compress import collect_stats, quantize_with_stats
from gift_quant.evaluate import nonoverlapping_windows, perplexity
from gift_quant.export import load_quantized, save_quantized
from gift_quant.layers import merge_to_dense, wrap_quantized
from gift_quant.recipe import QuantSpec, SaliencySpec, TrainSpec
from gift_quant.sources import C4, SMOLLM2, WIKI, load_model, read_text, sample_windows, tokenize
from gift_quant.train import text_examples, train

MODEL = SMOLLM2

VARIANTS = {
    "untrained": None,
    "GIFT-SW (paper: gaussian, 4-bit step)": dict(noise="gaussian", noise_bits=4),
    "salient FT, no noise": dict(noise="none"),
    "rounding noise (uniform, 3-bit step)": dict(noise="uniform", noise_bits=3),
    "gaussian 4-bit, annealed to 0": dict(noise="gaussian", noise_bits=4, noise_schedule="linear"),
    "gaussian 4-bit + distillation": dict(noise="gaussian", noise_bits=4, distill=1.0),
    "LoRA r=10 (peft), salient frozen": "lora",
}


def child(args) -> None:
    """Train one variant; print a RESULT line."""
    model, tok = load_model(MODEL)
    results = load_quantized(Path(args.work) / "quantized.safetensors")
    variant = VARIANTS[args.variant]
    evalw = nonoverlapping_windows(tokenize(tok, read_text(WIKI)), 512, args.eval_windows)
    teacher = load_model(MODEL)[0] if isinstance(variant, dict) and variant.get("distill") else None
    cfg = variant if isinstance(variant, dict) else {}
    wrap_quantized(model, results, cfg.get("noise", "none"), cfg.get("noise_bits", 4))
    out = {"variant": args.variant}
    if variant is not None:
        if variant == "lora":
            from peft import LoraConfig, get_peft_model

            merge_to_dense(model)
            model = get_peft_model(model, LoraConfig(r=10, lora_alpha=20, lora_dropout=0.0, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        out["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ids, labels = text_examples(tokenize(tok, read_text(C4)), 256)
        spec = TrainSpec(steps=args.steps, lr=args.lr, micro_batch_size=4, seq_len=256, checkpoint_every=10**6, **cfg)
        summary = train(model, ids, labels, spec, Path(args.work) / args.variant.replace(" ", "_"), seed=0,
                        teacher=teacher)
        logs = [json.loads(x) for x in (Path(args.work) / args.variant.replace(" ", "_") / "train_log.jsonl").read_text().splitlines()]
        steady = logs[2:] or logs
        out.update(s_per_step=sum(r["s_per_step"] for r in steady) / len(steady),
                   tokens_per_s=sum(r["tokens_per_s"] for r in steady) / len(steady),
                   first_loss=logs[0]["loss"], final_loss=summary["final_loss"])
    out["ppl"] = perplexity(model.eval(), evalw)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--only", default=None, help="comma-separated substrings: run only the matching variants")
    ap.add_argument("--variant")
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.variant:
        return child(args)
    work = Path(args.work or tempfile.mkdtemp())
    model, tok = load_model(MODEL)
    calib = sample_windows(tokenize(tok, read_text(C4)), args.calib, 512, seed=0)
    sal = SaliencySpec(k=16, k_overrides={"down_proj": 48})
    t = time.time()
    stats = collect_stats(model, calib, sal.targets)
    save_quantized(quantize_with_stats(model, stats, sal, QuantSpec(bits=3)), work / "quantized.safetensors")
    print(f"GPTQ W3 per-row + salient columns: {time.time() - t:.0f} s", flush=True)
    print("| variant | trainable params | ppl | first loss | final loss | s/step | tokens/s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in VARIANTS:
        if args.only and not any(o in name for o in args.only.split(",")):
            continue
        cmd = [sys.executable, __file__, "--variant", name, "--work", str(work), "--steps", str(args.steps),
               "--lr", str(args.lr), "--eval-windows", str(args.eval_windows)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(f"| {name} | failed: {res.stderr[-500:]!r} |", flush=True)
            continue
        r = json.loads(line[0][7:])
        f = lambda k, fmt: format(r[k], fmt) if k in r else "-"  # noqa: E731
        print(f"| {name} | {f('trainable', ',')} | {r['ppl']:.2f} | {f('first_loss', '.3f')} | {f('final_loss', '.3f')} | "
              f"{f('s_per_step', '.2f')} | {f('tokens_per_s', '.0f')} | {r['peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
