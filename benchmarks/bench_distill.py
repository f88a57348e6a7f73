"""The training step's time with distillation: no teacher, the full teacher beside every step, the cached top-k.

    python benchmarks/bench_distill.py [--steps 6] [--k 32] [--rounds 2]

SmolLM2-135M-Instruct as the demo trains it (W3 per-row codes, 16 salient columns a layer, 4 windows of 256
C4 tokens a step, no noise; the columns are seeded, not scored: only the cost is measured), trained by the
product's ``train`` with each teacher in turn, ``--rounds`` times in alternation in one process (so a busy
machine slows all three alike). The cache is built by the product's ``teacher_topk`` for exactly the
windows the steps read; its time is reported per window, what it costs once against what the full
teacher costs every step. Prints a markdown table of seconds per step and the ratios to no distillation.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import row, smollm2, table

from gift_quant.data import text_windows
from gift_quant.distill import TopKTeacher, read_cache, teacher_topk
from gift_quant.grid import Grid
from gift_quant.layers import wrap_quantized
from gift_quant.quantize import rtn_with_columns, seeded_columns
from gift_quant.recipe import TrainSpec
from gift_quant.sources import C4
from gift_quant.train import train, windows_read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    teacher, tok = smollm2()
    ids = text_windows(tok, C4, 256)
    spec = TrainSpec(steps=args.steps, lr=1e-3, micro_batch_size=4, seq_len=256, noise="none", distill=1.0,
                     warmup_ratio=0.0)
    windows = windows_read(len(ids), spec, 1, seed=0)
    work = Path(tempfile.mkdtemp())
    t0 = time.time()
    teacher_topk(teacher, ids, windows, work / "teacher.safetensors", k=args.k, temperature=1.0,
                 batch_size=spec.micro_batch_size, work=work / "cache", key="bench")
    cache_s = (time.time() - t0) / len(windows)
    topk = TopKTeacher(read_cache(work / "teacher.safetensors"), len(ids), 1.0)
    teachers = {"none": None, "full teacher": teacher, f"top-{args.k} cache": topk}
    times: dict[str, list[float]] = {k: [] for k in teachers}
    for r in range(args.rounds):
        for name, t in teachers.items():
            model = smollm2()[0]
            wrap_quantized(model, rtn_with_columns(model, Grid(3), seeded_columns(16)), "none", 4)
            s = spec if t is not None else spec.model_copy(update={"distill": 0.0})
            summary = train(model, ids, ids.clone(), s, work / f"{name}-{r}", teacher=t, checkpoints=False)
            times[name].append(summary["train_s"] / summary["steps_run"])
    base = min(times["none"])
    table("teacher", "s/step (best of rounds)", "x no distillation", "one-time cost")
    for name, ts in times.items():
        once = f"{cache_s:.2f} s a window ({cache_s * spec.micro_batch_size:.2f} s a step's windows)" \
            if name.startswith("top") else "-"
        row(name, f"{min(ts):.2f}", f"{min(ts) / base:.2f}", once)


if __name__ == "__main__":
    main()
