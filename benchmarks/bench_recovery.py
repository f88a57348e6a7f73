"""What each recovery addition buys at the demo point, through the product (issue 26).

    python benchmarks/bench_recovery.py [--variants today reconstruct ...] [--work DIR] [--jobs 2] [--tasks]
        [--plot recovered.png] [--read]

Every variant is one ``gift-quant recover`` run of the embedded SmolLM2 recipe with ``--set`` overrides (the
table names them, on top of ``FAST``: GIFT-SW without distillation, as the issue found it), so what is measured is
what ships. A variant copies every finished stage of the runs in ``--work``
(and ``--reuse``) that computed the one it needs (the stage's key: the same sections of the recipe up to it) and
does only the rest. Runs in ``--work`` are
kept: a rerun reads the finished ones and resumes the rest, so the table can grow across sessions. ``--jobs``
runs that many variants at once, each on one thread. Perplexity on the recipe's 20 Wikipedia windows of 512
tokens (the report's 95% interval beside it); ``--tasks`` also scores the six tasks (40 items each; ``--limit
null`` the whole validation sets, ``--task-list`` a subset of them).
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import finished, recover, row, table

from gift_quant.report import SHORT, mean_cell, task_cell, task_names

# every variant starts from GIFT-SW as issue 26 found it: no distillation (the recipe's default since), the table
# says what each addition buys on top of that; later --set entries override earlier ones
FAST = ["export.formats=[gift]", "train.distill=0", "train.distill_topk=null"]
RECONSTRUCT = ["reconstruct.enabled=true", "reconstruct.train=columns", "reconstruct.inputs=fp", "reconstruct.epochs=6",
               "reconstruct.lr=1e-3"]  # the salient columns alone (the demo recipe reconstructs every weight since issue 43)
TOPK = ["train.distill=1.0", "train.distill_topk=32"]
NOISE = ["train.noise=gaussian"]  # the paper's: gaussian at the 4-bit step
GENERATED = ["train.data=generated", "generate.seq_len=256", "generate.tokens=61440"]  # what 60 steps x 4 x 256 read
# three times the bundled C4 (1,181 windows of 256 tokens), read once: does text without a corpus lift the data limit?
GENERATED_3X = [*GENERATED[:2], "generate.tokens=907008", "train.steps=885"]
GENERATED_300 = [*GENERATED[:2], "generate.tokens=307200", "train.steps=300"]  # what 300 steps read: C4's one pass
G128 = ["saliency.k=8", "saliency.k_overrides={down_proj: 24}", "quant.group_size=128"]  # the second point, 3.44 bits
# the same bits on disk without salient columns: groups of 32 (3.64 bits a weight against per-row k16's 3.53),
# every grid scale learned in reconstruction and training
NO_SALIENT = ["saliency.k=0", "saliency.k_overrides={}", "quant.group_size=32", *RECONSTRUCT,
              "reconstruct.learn_scales=true", "reconstruct.scales_lr=1e-4", "train.learn_scales=true",
              "train.scales_lr=1e-4"]
# issue 43: every weight trained block by block (latent weights on the grid, scales), the salient columns with them
WEIGHTS = [*RECONSTRUCT, "reconstruct.train=weights", "reconstruct.weights_lr=1e-4", "reconstruct.scales_lr=1e-4"]
E2E = ["train.learn_scales=true", "train.scales_lr=1e-5"]  # EfficientQAT's E2E-QP learning rate of the scales
# every weight from fp, then the columns, the scales (lr 1e-4: the no-column peer barely moves at 1e-5) and the
# top-32 teacher end to end: the best recovery measured, with columns or without
EVERY_WEIGHT_E2E = [*WEIGHTS, "reconstruct.init=fp", *TOPK, *E2E, "train.scales_lr=1e-4"]
W4 = ["quant.bits=4", *G128]  # the third point: W4 g128 k8
W2 = ["quant.bits=2", *G128[:2], "quant.group_size=64"]  # the fourth point: W2 g64 k8


def no_columns(group: int) -> list[str]:
    """The peer: no salient columns, groups of ``group`` (chosen for about the bits on disk of the columns' point)."""
    return ["saliency.k=0", "saliency.k_overrides={}", f"quant.group_size={group}"]


VARIANTS: dict[str, list[str]] = {
    "today": [],
    "reconstruct (fp inputs)": RECONSTRUCT,
    "reconstruct (quantized inputs)": [*RECONSTRUCT, "reconstruct.inputs=quantized"],
    "reconstruct + scales": [*RECONSTRUCT, "reconstruct.learn_scales=true", "reconstruct.scales_lr=1e-4"],
    "learned scales": ["train.learn_scales=true", "train.scales_lr=1e-5"],
    "distill (full teacher)": ["train.distill=1.0"],
    "distill (top-32 cache)": TOPK,
    "generated text": GENERATED,
    "generated text x3, top-32 distill": [*GENERATED_3X, *TOPK],
    "generated text, top-32 distill, 300 steps": [*GENERATED_300, *TOPK],  # against "top-32 distill, 300 steps"
    "noise (paper's)": NOISE,
    "noise, uniform at the 3-bit step": ["train.noise=uniform", "train.noise_bits=3"],
    "noise, annealed to 0": [*NOISE, "train.noise_schedule=linear"],
    "reconstruct + noise": [*RECONSTRUCT, *NOISE],
    "reconstruct with noise": [*RECONSTRUCT, "reconstruct.noise=gaussian"],
    "top-32 distill + noise": [*TOPK, *NOISE],
    "reconstruct + top-32 distill": [*RECONSTRUCT, *TOPK],
    "reconstruct + top-32 distill, seed 1": ["seed=1", *RECONSTRUCT, *TOPK],  # quantizes again: seed draws calibration
    "reconstruct + top-32 distill + noise": [*RECONSTRUCT, *TOPK, *NOISE],
    "top-32 distill, 300 steps": [*TOPK, "train.steps=300"],  # about one pass over C4
    "top-32 distill, 600 steps": [*TOPK, "train.steps=600"],  # two passes over C4: does the teacher outlast the text?
    "reconstruct + top-32 distill, 300 steps": [*RECONSTRUCT, *TOPK, "train.steps=300"],
    "lora baseline": ["eval.baselines=[lora]"],
    "lora baseline + top-32 distill": ["eval.baselines=[lora]", *TOPK],
    "no salient columns, g32, scales": NO_SALIENT,
    "no salient columns, g32, scales + top-32 distill": [*NO_SALIENT, *TOPK],
    "g128 k8": G128,
    "g128 k8, top-32 distill": [*G128, *TOPK],
    "g128 k8, reconstruct": [*G128, *RECONSTRUCT],
    "g128 k8, reconstruct + top-32 distill": [*G128, *RECONSTRUCT, *TOPK],
    "every weight, from fp": [*WEIGHTS, "reconstruct.init=fp"],
    "every weight, from gptq": [*WEIGHTS, "reconstruct.init=quantized"],
    # the end-to-end stage after it (EfficientQAT's E2E-QP plus GIFT-SW): columns, scales and the top-32 teacher
    "every weight, from fp, + top-32 distill + scales": [*WEIGHTS, "reconstruct.init=fp", *TOPK, *E2E],
    "every weight, from gptq, + top-32 distill + scales": [*WEIGHTS, "reconstruct.init=quantized", *TOPK, *E2E],
    # the peer without salient columns at about the same bits on disk (groups of 32: 3.64 against 3.53)
    "no salient columns, g32, every weight, from fp, + top-32 distill + scales":
        ["saliency.k=0", "saliency.k_overrides={}", "quant.group_size=32", *WEIGHTS, "reconstruct.init=fp", *TOPK,
         *E2E],
    # the scales at the learning rate the earlier no-column rows used (1e-4), with and without columns
    "no salient columns, g32, every weight, from fp, + top-32 distill + scales 1e-4": [*no_columns(32),
                                                                                        *EVERY_WEIGHT_E2E],
    "every weight, from fp, + top-32 distill + scales 1e-4": EVERY_WEIGHT_E2E,
    # the second point (g128 k8, 3.44 bits): every weight with the columns, and the peer without them at about the
    # same bits (groups of 48: 3.43), each end to end
    "g128 k8, every weight, from fp, + top-32 distill + scales 1e-4": [*G128, *EVERY_WEIGHT_E2E],
    "no salient columns, g48, every weight, from fp, + top-32 distill + scales 1e-4": [*no_columns(48),
                                                                                        *EVERY_WEIGHT_E2E],
    "g128 k8, lora baseline + top-32 distill": [*G128, "eval.baselines=[lora]", *TOPK],
    # the third point, W4 g128 k8, and its peer at about the same bits (groups of 48, as at W3)
    "w4 g128 k8, every weight, from fp, + top-32 distill + scales 1e-4": [*W4, *EVERY_WEIGHT_E2E],
    "w4 g128 k8, reconstruct + top-32 distill": [*W4, *RECONSTRUCT, *TOPK],
    "w4, no salient columns, g48, every weight, from fp, + top-32 distill + scales 1e-4":
        ["quant.bits=4", *no_columns(48), *EVERY_WEIGHT_E2E],
    "w4 g128 k8, lora baseline + top-32 distill": [*W4, "eval.baselines=[lora]", *TOPK],
    # the fourth point, W2 g64 k8, and its peer at about the same bits (groups of 32)
    "w2 g64 k8, every weight, from fp, + top-32 distill + scales 1e-4": [*W2, *EVERY_WEIGHT_E2E],
    "w2 g64 k8, reconstruct + top-32 distill": [*W2, *RECONSTRUCT, *TOPK],
    "w2, no salient columns, g32, every weight, from fp, + top-32 distill + scales 1e-4":
        ["quant.bits=2", *no_columns(32), *EVERY_WEIGHT_E2E],
    "w2 g64 k8, lora baseline + top-32 distill": [*W2, "eval.baselines=[lora]", *TOPK],
    # at 2 bits the blocks trained on full-precision inputs do not compose: each block reads its quantized
    # predecessors' outputs instead (EfficientQAT's Block-AP)
    "w2 g64 k8, every weight, quantized inputs, from fp, + top-32 distill + scales 1e-4":
        [*W2, *EVERY_WEIGHT_E2E, "reconstruct.inputs=quantized"],
    "w2, no salient columns, g32, every weight, quantized inputs, from fp, + top-32 distill + scales 1e-4":
        ["quant.bits=2", *no_columns(32), *EVERY_WEIGHT_E2E, "reconstruct.inputs=quantized"],
    # and at EfficientQAT's learning rate of the weights at 2 bits (2e-5): is 1e-4 what overfits the blocks there?
    "w2 g64 k8, every weight at lr 2e-5, quantized inputs, from fp, + top-32 distill + scales 1e-4":
        [*W2, *EVERY_WEIGHT_E2E, "reconstruct.inputs=quantized", "reconstruct.weights_lr=2e-5"],
    # not the learning rate (2e-5 is worse): the start, GPTQ's codes instead of round-to-nearest from fp
    "w2 g64 k8, every weight from gptq, quantized inputs, + top-32 distill + scales 1e-4":
        [*W2, *EVERY_WEIGHT_E2E, "reconstruct.inputs=quantized", "reconstruct.init=quantized"],
    # a second seed (another calibration draw, its own quantize stage) of the per-row k16 pair that differs by 2.2%,
    # beside "reconstruct + top-32 distill, seed 1"
    "every weight, from fp, + top-32 distill + scales 1e-4, seed 1": ["seed=1", *EVERY_WEIGHT_E2E],
    # the W2 pair within 1.4% (every weight from GPTQ's codes, the columns alone) at a second seed
    "w2 g64 k8, every weight from gptq, quantized inputs, + top-32 distill + scales 1e-4, seed 1":
        ["seed=1", *W2, *EVERY_WEIGHT_E2E, "reconstruct.inputs=quantized", "reconstruct.init=quantized"],
    "w2 g64 k8, reconstruct + top-32 distill, seed 1": ["seed=1", *W2, *RECONSTRUCT, *TOPK],
    # the W4 rows within 1% (every weight, the columns alone, no columns at g48) at a second seed
    "w4 g128 k8, every weight, from fp, + top-32 distill + scales 1e-4, seed 1": ["seed=1", *W4, *EVERY_WEIGHT_E2E],
    "w4 g128 k8, reconstruct + top-32 distill, seed 1": ["seed=1", *W4, *RECONSTRUCT, *TOPK],
    "w4, no salient columns, g48, every weight, from fp, + top-32 distill + scales 1e-4, seed 1":
        ["seed=1", "quant.bits=4", *no_columns(48), *EVERY_WEIGHT_E2E],
    # the block's norms trained with every weight (reconstruct.norms), at the latent weights' learning rate
    "every weight and norms, from fp, + top-32 distill + scales 1e-4": [*EVERY_WEIGHT_E2E, "reconstruct.norms=true",
                                                                       "reconstruct.norms_lr=1e-4"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--work", default=None, help="keep the runs here (default: a temp folder)")
    ap.add_argument("--jobs", type=int, default=1, help="variants at once, one thread each")
    ap.add_argument("--tasks", action="store_true", help="also the six tasks (slower)")
    ap.add_argument("--reuse", nargs="*", default=[], help="more run folders whose finished stages the variants may copy")
    ap.add_argument("--limit", default=None, help="with --tasks: items a task (the recipe's 40 unless given; 'null': "
                    "the whole validation sets)")
    ap.add_argument("--task-list", default=None, help="with --tasks: comma-separated lm-eval tasks instead of the "
                    "recipe's six (a whole validation set of each task a job, spread over cores and sessions)")
    ap.add_argument("--baselines", default="salient", help="eval.baselines of every variant (fp,salient adds the "
                    "full-precision row)")
    ap.add_argument("--read", action="store_true", help="only read the finished runs in --work, as they are (no "
                    "stage runs, no key check): each run's recipe fields that differ from the variant's today are "
                    "printed beside the table")
    ap.add_argument("--plot", default=None, help="write the trained perplexity against bits per weight of the variants "
                    "here, those with salient columns and those without (saliency.k=0) as two frontiers")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    common = FAST + ([] if args.tasks else ["eval.tasks=[]"]) + ([f"eval.limit={args.limit}"] if args.limit else [])
    common += [f"eval.baselines=[{args.baselines}]"] + ([f"eval.tasks=[{args.task_list}]"] if args.task_list else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.jobs > 1 else None
    slug = {v: re.sub(r"[^A-Za-z0-9._-]+", "_", v.replace("+", "and")).strip("_") for v in VARIANTS}  # run names
    extra = [Path(r) for r in args.reuse]

    def run(v: str) -> dict:  # the finished runs it may copy stages from are those there when it starts
        return recover(work, slug[v], common + VARIANTS[v], [*extra, *sorted(work.iterdir())], env)

    from transformers import AutoConfig  # noqa: F401 (its lazy import is not thread-safe: resolved before the pool)

    if args.read:
        done = {v: finished(work, slug[v], common + VARIANTS[v]) for v in args.variants}
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            done = dict(zip(args.variants, pool.map(run, args.variants)))
    table("variant", "--set", "bits/weight", "untrained", "before training", "trained", "95% interval",
          "stage s (added)", "train s/step", "peak GiB (reconstruct, train)")
    for v in args.variants:
        rows, stages = done[v]["rows"], done[v]["stages"]
        untrained = next((r["ppl"] for k, r in rows.items() if k.endswith(("salient columns", "salient columns)"))), None)
        before = next((r["ppl"] for k, r in rows.items() if k.endswith("reconstructed")), untrained)
        trained = next((r for k, r in rows.items() if ("LoRA" if "lora" in stages else "GIFT-SW") in k), None)
        added = {s: m["seconds"] for s, m in stages.items() if s in ("reconstruct", "generate", "teacher")}
        train = stages.get("lora" if "lora" in stages else "train", {})
        per_step = train.get("train_s", 0) / max(train.get("steps_run", 1), 1)
        bits = stages["export"]["formats"]["gift"]["linear_bits_per_weight"]
        row(v, " ".join(VARIANTS[v]) or "-", f"{bits:.2f}", f"{untrained:.2f}" if untrained else "-",
            f"{before:.2f}" if before else "-", f"{trained['ppl']:.2f}" if trained else "-",
            "-".join(f"{x:.2f}" for x in trained["ppl_ci95"]) if trained else "-",
            ", ".join(f"{s} {t:.0f}" for s, t in added.items()) or "-", f"{per_step:.2f}",
            ", ".join(f"{stages[s]['peak_memory_bytes'] / 2**30:.2f}" if s in stages else "-"
                      for s in ("reconstruct", "lora" if "lora" in stages else "train")))
    for v in args.variants:
        if done[v].get("differs"):
            print(f"\n{v}: made with " + ", ".join(f"{k}={a} (today {b})" for k, (a, b) in done[v]["differs"].items()))
    if args.plot:
        plot(args.plot, {v: (done[v]["stages"]["export"]["formats"]["gift"]["linear_bits_per_weight"],
                             next(r["ppl"] for k, r in done[v]["rows"].items()
                                  if ("LoRA" if "lora" in done[v]["stages"] else "GIFT-SW") in k))
                         for v in args.variants})
    scored = [(v, label, r) for v in args.variants for label, r in done[v]["rows"].items() if "tasks" in r]
    if scored:
        tasks = task_names(scored[0][2])
        print()
        table("variant", "row", "ppl", *[f"{SHORT.get(t, t)} acc / norm" for t in tasks], "mean acc")
        for v, label, r in scored:
            row(v, label, f"{r['ppl']:.2f}", *[task_cell(r["tasks"][t]) for t in tasks], mean_cell(r["tasks"]))


def plot(path: str, points: dict[str, tuple[float, float]]) -> None:
    """Trained perplexity against bits per weight, a point a variant; the variants with salient columns and those
    without (``saliency.k=0``) each joined along their frontier (the best perplexity at or below each bit count),
    whose points carry their perplexity (the table names the variants). Left every point on a log scale (2 bits
    fail by orders of magnitude), right the points from 3 bits on a linear one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, low in zip(axes, (0.0, 3.0)):
        for columns, marker in ((True, "o"), (False, "s")):
            mine = sorted((b, p) for v, (b, p) in points.items()
                          if ("saliency.k=0" not in VARIANTS[v]) == columns and b >= low)
            if not mine:
                continue
            label = "with salient columns" if columns else "without (finer groups)"
            line = ax.scatter(*zip(*mine), marker=marker, label=label)
            front, best = [], float("inf")
            for b, p in mine:
                if p < best:
                    front.append((b, p))
                    best = p
            ax.plot(*zip(*front), color=line.get_facecolor()[0], alpha=0.6)
            for b, p in front:
                text = f"{p:.2f}" if p < 1000 else f"{p:,.0f}"
                ax.annotate(text, (b, p), fontsize=7, xytext=(4, 3 if columns else -9), textcoords="offset points")
        ax.margins(x=0.15, y=0.1)
        ax.set_xlabel("bits per weight of the quantized linears (gift export)")
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("Wikipedia perplexity, trained (log scale)")
    axes[1].set_ylabel("Wikipedia perplexity, trained")
    axes[0].set_title("every point")
    axes[1].set_title("from 3 bits on")
    fig.suptitle("SmolLM2-135M-Instruct: recovered models (bench_recovery)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
