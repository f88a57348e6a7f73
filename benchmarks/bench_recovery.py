"""What each recovery addition buys at the demo point, through the product (issue 26).

    python benchmarks/bench_recovery.py [--variants today reconstruct ...] [--work DIR] [--jobs 2] [--tasks]

Every variant is one ``gift-quant recover`` run of the embedded SmolLM2 recipe with ``--set`` overrides (the
table names them), so what is measured is what ships. The first variant quantizes and the others copy its
``quantize`` stage (all copy that of ``--quantized`` where given) (same calibration, saliency and grid) and redo everything after it. Runs in ``--work`` are
kept: a rerun reads the finished ones and resumes the rest, so the table can grow across sessions. ``--jobs``
runs that many variants at once, each on one thread. Perplexity on the recipe's 20 Wikipedia windows of 512
tokens (the report's 95% interval beside it); ``--tasks`` also scores the six tasks (40 items each).
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import recover, row, table

FAST = ["export.formats=[gift]", "eval.baselines=[salient]"]
RECONSTRUCT = ["reconstruct.enabled=true", "reconstruct.inputs=fp", "reconstruct.epochs=6", "reconstruct.lr=1e-3"]
TOPK = ["train.distill=1.0", "train.distill_topk=32"]
GENERATED = ["train.data=generated", "generate.seq_len=256", "generate.tokens=61440"]  # what 60 steps x 4 x 256 read
VARIANTS: dict[str, list[str]] = {
    "today": [],
    "reconstruct (fp inputs)": RECONSTRUCT,
    "reconstruct (quantized inputs)": [*RECONSTRUCT[:1], "reconstruct.inputs=quantized", *RECONSTRUCT[2:]],
    "reconstruct + scales": [*RECONSTRUCT, "reconstruct.learn_scales=true", "reconstruct.scales_lr=1e-4"],
    "learned scales": ["train.learn_scales=true", "train.scales_lr=1e-5"],
    "distill (full teacher)": ["train.distill=1.0"],
    "distill (top-32 cache)": TOPK,
    "generated text": GENERATED,
    "noise (paper's)": ["train.noise=gaussian"],
    "reconstruct + top-32 distill": [*RECONSTRUCT, *TOPK],
    "reconstruct + top-32 distill, seed 1": ["seed=1", *RECONSTRUCT, *TOPK],  # quantizes again: seed draws calibration
    "lora baseline": ["eval.baselines=[lora]"],
    # the same bits on disk without salient columns: groups of 32 (3.59 bits a weight against per-row k16's 3.53),
    # every grid scale learned in reconstruction and training
    "no salient columns, g32, scales": ["saliency.k=0", "saliency.k_overrides={}", "quant.group_size=32", *RECONSTRUCT,
                                        "reconstruct.learn_scales=true", "reconstruct.scales_lr=1e-4",
                                        "train.learn_scales=true", "train.scales_lr=1e-4"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--work", default=None, help="keep the runs here (default: a temp folder)")
    ap.add_argument("--jobs", type=int, default=1, help="variants at once, one thread each")
    ap.add_argument("--tasks", action="store_true", help="also the six tasks (slower)")
    ap.add_argument("--quantized", default=None, help="a demo run folder whose quantize stage the first variant copies")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    common = FAST + ([] if args.tasks else ["eval.tasks=[]"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.jobs > 1 else None
    slug = {v: re.sub(r"[^A-Za-z0-9._-]+", "_", v.replace("+", "and")).strip("_") for v in VARIANTS}  # run names
    if args.quantized:  # every variant copies the given quantize stage
        seed, done, rest = Path(args.quantized), {}, args.variants
    else:  # the first variant quantizes, the others copy its stage
        first, *rest = args.variants
        done = {first: recover(work, slug[first], common + VARIANTS[first], env=env)}
        seed = work / slug[first]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {v: pool.submit(recover, work, slug[v], common + VARIANTS[v], seed, env) for v in rest}
        done |= {v: f.result() for v, f in futures.items()}
    table("variant", "--set", "bits/weight", "untrained", "before training", "trained", "95% interval",
          "stage s (added)", "train s/step")
    for v in args.variants:
        rows, stages = done[v]["rows"], done[v]["stages"]
        untrained = next((r["ppl"] for k, r in rows.items() if k.endswith("salient columns")), None)
        before = next((r["ppl"] for k, r in rows.items() if k.endswith("reconstructed")), untrained)
        trained = next((r for k, r in rows.items() if ("LoRA" if "lora" in stages else "GIFT-SW") in k), None)
        added = {s: m["seconds"] for s, m in stages.items() if s in ("reconstruct", "generate", "teacher")}
        train = stages.get("lora" if "lora" in stages else "train", {})
        per_step = train.get("train_s", 0) / max(train.get("steps_run", 1), 1)
        bits = stages["export"]["formats"]["gift"]["linear_bits_per_weight"]
        row(v, " ".join(VARIANTS[v]) or "(the recipe)", f"{bits:.2f}", f"{untrained:.2f}" if untrained else "-",
            f"{before:.2f}" if before else "-", f"{trained['ppl']:.2f}" if trained else "-",
            "-".join(f"{x:.2f}" for x in trained["ppl_ci95"]) if trained else "-",
            ", ".join(f"{s} {t:.0f}" for s, t in added.items()) or "-", f"{per_step:.2f}")


if __name__ == "__main__":
    main()
