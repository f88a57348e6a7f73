"""The prepared GPU check: the scale a user runs at, on random weights built from a config (nothing downloaded).

    benchmarks/gpu_check.sh                               # here: fetch the wheels the GPU machine lacks
    PYTHONPATH=. python benchmarks/gpu_check.py --out F   # there (one GPU): Llama-3-8B-shaped rows + recover
    python benchmarks/gpu_check.py --tiny [--dtype bfloat16]  # the same steps on a tiny config, on the CPU

Steps (each prints a table row; ``--out`` writes all rows as JSON):

1. cpu vs device: a small model quantized (GPTQ W3 + salient columns) with ``device=cpu`` and on the
   device; share of equal codes and the largest effective-weight difference.
2. calibrate + GPTQ of two blocks of the full-size config, block by block on the device from a model on
   the CPU (128 windows of 2048 tokens, the paper's calibration): seconds of the second block (the first
   carries one-time costs: capturing the inputs, kernel warm-up), peak device memory, extrapolated to all
   blocks.
3. one training step of the whole model (bf16, codes on the device, 128 salient columns a layer,
   gradient checkpointing, micro-batch 1 x 2048) through ``gift_quant.train.train``, with the paper's
   noise and without: s/step, tokens/s, peak memory; beside it PEFT LoRA r=64 on all seven projections
   of the same weights held dense in bf16 (PEFT cannot wrap our integer layer, so its base takes 2 bytes
   a weight where ours takes 1).
4. greedy decode tokens/s of the ``gift`` layers (codes dequantized every forward) against the same
   weights merged into dense bf16 linears.
5. the product: ``gift-quant recover`` on the device for a random-weight model of the shipped config cut
   to two blocks, with a byte-level tokenizer trained here on a generated text (calibration, training
   and perplexity text): every baseline (fp, rtn, gptq, salient, lora), all three exports; then the gift
   export loaded back with ``device_map`` on the device, its logits against the dense export's and its
   perplexity against the report's. No lm-eval tasks: its data sets and dependencies do not fit what the
   GPU machine can be given (the test suite runs them on the CPU).
The memory plan's estimate for the training step is printed beside the measured peak. Rows free their
model before the next one starts (``devices.release``: accelerate binds ``forward`` to the model, a cycle).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tree, where the package is not installed

from gift_quant import devices, kernels  # noqa: E402
from gift_quant.devices import GiB  # noqa: E402
from gift_quant.grid import Grid  # noqa: E402
from gift_quant.layers import merge_to_dense, salient_layers, wrap_quantized  # noqa: E402
from gift_quant.plan import meta_model, plan_train, shape_of  # noqa: E402
from gift_quant.quantize import quantize_model, rtn_with_columns, seeded_columns  # noqa: E402
from gift_quant.recipe import ALL_PROJECTIONS, QuantSpec, SaliencySpec, TrainSpec  # noqa: E402
from gift_quant.recipe_file import parse_recipe
from gift_quant.train import train  # noqa: E402

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


def build(cfg, device: torch.device, dtype: torch.dtype, seed: int = 0, home: torch.device | None = None) -> nn.Module:
    """The model of ``cfg`` with seeded random weights, initialised on ``device`` (fast on a GPU; a 1.5B model
    initialised on one CPU thread takes minutes) and then moved to ``home`` (default: stays there)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    return model if home is None else model.to(home)


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


def check_calibration(device: torch.device, tiny: bool, dtype: torch.dtype) -> dict:
    cfg = config(tiny, num_hidden_layers=2)
    full_blocks = config(tiny).num_hidden_layers
    n, seq = (8, 128) if tiny else (128, 2048)
    model = build(cfg, device, dtype, home=torch.device("cpu"))
    windows = torch.randint(0, cfg.vocab_size, (n, seq), generator=torch.Generator().manual_seed(0))
    second = {}

    def mark(*_):  # the second block's first forward: the first block and the one-time costs are behind
        devices.synchronize(device)
        second.setdefault("t", time.time())

    hook = model.model.layers[1].register_forward_pre_hook(mark)
    with devices.peak(device) as used:
        quantize_model(model, windows, SaliencySpec(k=8 if tiny else 128), QuantSpec(bits=3), batch_size=4,
                       device=device)
    devices.synchronize(device)
    hook.remove()
    s = time.time() - second["t"]
    return {"step": "calibrate + GPTQ, 2 blocks", "windows": f"{n} x {seq}", "s_per_block": s,
            "peak_gib": used.peak / GiB, f"extrapolated_s_{full_blocks}_blocks": s * full_blocks}


def quantized_model(cfg, device: torch.device, dtype: torch.dtype, k: int, noise: str = "gaussian") -> nn.Module:
    """The model of ``cfg`` wrapped as GIFT-SW (RTN W3, no clipping search, ``k`` seeded random salient columns a
    layer: the columns' choice does not change the cost) with ``noise`` (the paper's by default;
    ``none`` skips the noise grid's clipping search, minutes over 7B weights)."""
    model = build(cfg, device, dtype)
    wrap_quantized(model, rtn_with_columns(model, Grid(3), seeded_columns(k)), noise, 4)
    return model


def warm_up(cfg, spec: TrainSpec, device: torch.device,
            adapt: Callable[[nn.Module], nn.Module] = lambda m: m) -> None:
    """One step of ``train`` with ``spec`` (no teacher) on ``cfg`` cut to one block (``adapt`` makes its model the
    measured stage's kind), so that what the runtime takes on first use is in memory before a measurement of
    ``train``'s own: lazy imports, thread pools, and the CPU kernel libraries' caches, which oneDNN keeps per shape
    (hence the measured model's widths). The plan counts tensors, as ``torch.cuda.max_memory_allocated`` does."""
    ids = torch.randint(0, cfg.vocab_size, (spec.micro_batch_size, spec.seq_len))
    one = type(cfg)(**{**cfg.to_dict(), "num_hidden_layers": 1})
    with tempfile.TemporaryDirectory() as w:
        train(adapt(quantized_model(one, device, torch.float32, 4)), ids, ids.clone(),
              spec.model_copy(update={"steps": 1, "distill": 0.0}), Path(w), device=device, checkpoints=False)
    devices.release(device)


def _train_row(label: str, model: nn.Module, spec: TrainSpec, device: torch.device, vocab: int, work: Path,
               estimate: int | None = None) -> dict:
    ids = torch.randint(0, vocab, (8, spec.seq_len), generator=torch.Generator().manual_seed(1))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    folder = work / label.replace(" ", "_")
    with devices.peak(device) as used:
        train(model, ids, ids.clone(), spec, folder, device=device, checkpoints=False)
    log = [json.loads(x) for x in (folder / "train_log.jsonl").read_text().splitlines()]
    steady = log[1:] or log
    row = {"step": f"train step: {label}", "trainable": trainable,
           "s_per_step": sum(r["s_per_step"] for r in steady) / len(steady),
           "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady), "peak_gib": used.peak / GiB}
    if estimate is not None:
        row["plan_gib"] = estimate / GiB
    return row


def check_training(device: torch.device, tiny: bool, dtype: torch.dtype, work: Path) -> list[dict]:
    cfg = config(tiny)
    seq, k = (64, 8) if tiny else (2048, 128)
    rows = []
    recipe = parse_recipe({"model": {"ref": "-", "dtype": "bfloat16" if dtype == torch.bfloat16 else "float32"},
                           "saliency": {"k": k}, "train": {"micro_batch_size": 1, "seq_len": seq,
                                                           "gradient_checkpointing": True}})
    estimate = sum(plan_train(shape_of(meta_model(cfg), recipe), recipe, device).values())
    for noise in ("gaussian", "none"):
        model = quantized_model(cfg, device, dtype, k, noise)
        spec = TrainSpec(steps=3, micro_batch_size=1, seq_len=seq, lr=1e-4, gradient_checkpointing=True,
                         checkpoint_every=10**6, noise=noise)
        rows.append(_train_row(f"GIFT-SW k={k}, noise {noise}", model, spec, device, cfg.vocab_size, work, estimate))
        del model
        devices.release(device)
    from peft import LoraConfig, get_peft_model

    model = quantized_model(cfg, device, dtype, 0, "none")
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
    devices.synchronize(device)
    t0 = time.time()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    devices.synchronize(device)
    return tokens / (time.time() - t0)


def check_decode(device: torch.device, tiny: bool, dtype: torch.dtype) -> dict:
    cfg = config(tiny)
    tokens = 8 if tiny else 64
    model = quantized_model(cfg, device, dtype, 8 if tiny else 128, "none")
    gift = _decode(model.eval(), device, cfg.vocab_size, tokens)  # through the packed kernels where they run
    packed = [lin.base.packed(dtype) for lin in salient_layers(model).values()]
    kernels.ENABLED = False
    dequant = _decode(model, device, cfg.vocab_size, tokens)
    kernels.ENABLED = True
    merge_to_dense(model)
    dense_tps = _decode(model.eval(), device, cfg.vocab_size, tokens)
    return {"step": "greedy decode, batch 1", "gift_tokens_per_s": gift, "gift_dequant_tokens_per_s": dequant,
            "dense_tokens_per_s": dense_tps, "ratio": gift / dense_tps,
            "kernels": sorted({p.kind if p else "dequantize (no kernel)" for p in packed})}


# ----------------------------------------------------------------------------- the whole product on the device


def generated_text(n_words: int, seed: int) -> str:
    """A seeded text of a made-up language (each word has a few likely successors), so that a model has
    something to learn and perplexity something to measure."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("aeioubcdfghklmnprstvz") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    follow = {w: rng.sample(words, 6) for w in words}
    out, w = [], rng.choice(words)
    for i in range(n_words):
        out.append(w)
        w = rng.choice(follow[w]) if rng.random() < 0.85 else rng.choice(words)
        if i % 17 == 16:
            out.append(".\n")
    return " ".join(out)


def write_model_folder(folder: Path, cfg, device: torch.device, dtype: torch.dtype, text: str) -> None:
    """A random-weight model of ``cfg`` and a byte-level BPE tokenizer trained on ``text``, as a model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(512, cfg.vocab_size), special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(folder)
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = 0
    build(cfg, device, dtype, home=torch.device("cpu")).save_pretrained(folder)


def check_recover(device: torch.device, tiny: bool, dtype: torch.dtype, work: Path) -> dict:
    """``gift-quant recover`` on the device (see module docstring, step 5)."""
    from transformers import AutoModelForCausalLM

    from gift_quant.data import eval_windows
    from gift_quant.evaluate import window_nll
    from gift_quant.pipeline import recover

    cfg = config(tiny, num_hidden_layers=2)
    folder, run = work / "model", work / "run"
    (work / "train.txt").write_text(generated_text(60_000 if tiny else 400_000, seed=1))
    (work / "heldout.txt").write_text(generated_text(8_000 if tiny else 40_000, seed=2))
    write_model_folder(folder, cfg, device, dtype, (work / "train.txt").read_text())
    seq = 64 if tiny else 512
    recipe = parse_recipe({
        "name": "gpu-check", "device": str(device), "output_dir": str(run),
        "model": {"ref": str(folder), "dtype": str(dtype).removeprefix("torch.")},
        "calibration": {"data": str(work / "train.txt"), "n_samples": 4 if tiny else 32, "seq_len": seq,
                        "batch_size": 2 if tiny else 8},
        "saliency": {"k": 4 if tiny else 128, "metric": "owq"},
        "quant": {"bits": 3, "method": "gptq", "group_size": -1},
        "train": {"steps": 4, "micro_batch_size": 2, "seq_len": seq, "checkpoint_every": 2, "lr": 1e-4,
                  "data": str(work / "train.txt"), "data_format": "text", "gradient_checkpointing": True,
                  "noise": "gaussian"},
        "export": {"formats": ["dense", "gift", "gptq_lora"]},
        "eval": {"ppl_data": str(work / "heldout.txt"), "ppl_seq_len": seq, "ppl_max_windows": 8, "batch_size": 2,
                 "tasks": [], "baselines": ["fp", "rtn", "gptq", "salient", "lora"]},
    }, "gpu_check")
    t0 = time.time()
    recover(recipe)
    wall = time.time() - t0
    results = json.loads((run / "evaluate" / "results.json").read_text())
    manifests = {s: json.loads((run / s / "manifest.json").read_text())
                 for s in ("quantize", "plain", "train", "lora", "export", "evaluate")}
    from gift_quant.sources import load_tokenizer

    windows = eval_windows(recipe, load_tokenizer(str(folder)))
    gift = AutoModelForCausalLM.from_pretrained(run / "export" / "gift", dtype=dtype, device_map=str(device)).eval()
    with torch.no_grad():
        gift_logits = gift(windows[:2].to(device)).logits.float()
    gift_ppl = float(window_nll(gift, windows, 2).mean().exp())
    del gift
    devices.release(device)
    dense = AutoModelForCausalLM.from_pretrained(run / "export" / "dense", dtype=dtype, device_map=str(device)).eval()
    with torch.no_grad():
        dense_logits = dense(windows[:2].to(device)).logits.float()
    del dense
    devices.release(device)
    label = next(k for k in results if k.startswith("GIFT-SW"))
    return {"step": "recover on the device (2 blocks)", "wall_s": round(wall, 1),
            "stage_s": {s: round(m["seconds"], 1) for s, m in manifests.items()},
            "stage_peak_gib": {s: round(m["peak_memory_bytes"] / GiB, 2) for s, m in manifests.items()},
            "ppl": {k: round(v["ppl"], 3) for k, v in results.items()},
            "scored_from": {k: v["source"] for k, v in results.items()},
            "gift_export_ppl": gift_ppl, "gift_vs_report_ppl": gift_ppl / results[label]["ppl"],
            "gift_vs_dense_max_logit_diff": float((gift_logits - dense_logits).abs().max()),
            "logit_scale": float(dense_logits.abs().max())}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny config on the CPU (what the test suite runs)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="of the models (auto: bfloat16 on a GPU, as every paper-scale recipe; float32 on the CPU)")
    ap.add_argument("--only", default=None, help="comma-separated steps to run: codes,calibration,training,decode,"
                                                 "recover (default: all)")
    args = ap.parse_args(argv)
    device = torch.device("cpu") if args.tiny or not torch.cuda.is_available() else torch.device("cuda", 0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"gpu_check on {name}, torch {torch.__version__}, {'tiny config' if args.tiny else 'Llama-3-8B shape'}, "
          f"{dtype}", flush=True)
    rows, failed = [], []
    steps = {"codes": lambda w: [check_same_codes(device, args.tiny)],
             "calibration": lambda w: [check_calibration(device, args.tiny, dtype)],
             "training": lambda w: check_training(device, args.tiny, dtype, w),
             "decode": lambda w: [check_decode(device, args.tiny, dtype)],
             "recover": lambda w: [check_recover(device, args.tiny, dtype, w)]}
    chosen = args.only.split(",") if args.only else list(steps)
    with tempfile.TemporaryDirectory() as work:
        for step in chosen:
            t0 = time.time()
            (Path(work) / step).mkdir()
            try:
                out = steps[step](Path(work) / step)
            except Exception as e:  # noqa: BLE001 (one failed step must not hide the others' rows)
                out = [{"step": step, "error": f"{type(e).__name__}: {e}"[:2000]}]
                failed.append(step)
            for row in out:
                row.setdefault("wall_s", round(time.time() - t0, 1))
                rows.append(row)
                print(json.dumps(row), flush=True)
            devices.release(device)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    if failed:
        raise SystemExit(f"gpu_check: {', '.join(failed)} failed (see the rows above)")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
