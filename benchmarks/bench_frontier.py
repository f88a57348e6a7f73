"""Perplexity against bits per weight on disk, untrained, for the saliency metrics x groups x k (issue 12).

    python benchmarks/bench_frontier.py [--bits 3] [--metric gift owq ...] [--group -1 128] [--k 8 16 32]
        [--points benchmarks/frontier.jsonl]

SmolLM2-135M-Instruct, GPTQ at ``--bits`` with ``k`` salient columns in every projection (3 k for
down_proj, whose 1536 inputs are 2.7x the others'), statistics of one non-sequential calibration pass
(32 x 512 C4 tokens) shared by every point; perplexity on 10 held-out Wikipedia windows of 512 tokens;
bits per weight of the quantized linears from the ``gift`` export's files (``export.storage``).
Every point measured is appended to ``--points`` with the commit that measured it, and points already
there are not measured again, so a frontier can be filled over several runs. Prints a markdown table of
this run's points and writes ``--plot`` from all of them (perplexity vs bits per weight, one line per
metric and group size).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from common import calibration, heldout, smollm2

from gift_quant.evaluate import perplexity
from gift_quant.gift_format import export_gift
from gift_quant.grid import QuantizedWeight
from gift_quant.quantize import collect_stats, quantize_with_stats
from gift_quant.recipe import QuantSpec, SaliencySpec
from gift_quant.sizes import storage


def disk_bits_per_weight(model, tok, results: dict[str, QuantizedWeight]) -> float:
    """Bits per weight of the quantized linears in the ``gift`` export of ``results`` (a temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        export_gift(model, tok, results, Path(tmp) / "gift", {})
        shapes = {n: tuple(qw.codes.shape) for n, qw in results.items()}
        return storage(Path(tmp) / "gift", shapes)["linear_bits_per_weight"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--metric", nargs="+", default=["gift", "owq", "wanda", "quik"])
    ap.add_argument("--group", type=int, nargs="+", default=[-1, 128])
    ap.add_argument("--k", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--plot", default="benchmarks/frontier.png")
    ap.add_argument("--points", default="benchmarks/frontier.jsonl", help="measured points (read, then appended)")
    args = ap.parse_args()
    store = Path(args.points)
    known = [json.loads(x) for x in store.read_text().splitlines()] if store.exists() else []
    done = {(p["bits"], p["metric"], p["group"], p["k"]) for p in known}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()

    model, tok = smollm2()
    original = {n: p.detach().clone() for n, p in model.state_dict().items()}
    calib = calibration(tok, 32)
    evalw = heldout(tok, 10)
    stats = collect_stats(model, calib, SaliencySpec().targets)
    print(f"full precision: ppl {perplexity(model, evalw):.2f}", flush=True)
    print("| metric | group | k (down_proj 3k) | bits/weight on disk | ppl | s |")
    print("|---|---|---|---|---|---|")
    for metric in args.metric:
        for group in args.group:
            for k in args.k:
                if (args.bits, metric, group, k) in done:
                    continue
                model.load_state_dict(original)
                sal = SaliencySpec(metric=metric, k=k, k_overrides={"down_proj": 3 * k})
                t0 = time.time()
                results = quantize_with_stats(model, stats, sal, QuantSpec(bits=args.bits, group_size=group))
                ppl = perplexity(model, evalw)
                bpw = disk_bits_per_weight(model, tok, results)
                known.append({"bits": args.bits, "metric": metric, "group": group, "k": k, "bpw": bpw, "ppl": ppl,
                              "commit": commit})
                with store.open("a") as f:
                    f.write(json.dumps(known[-1]) + "\n")
                print(f"| {metric} | {'row' if group == -1 else group} | {k} | {bpw:.3f} | {ppl:.2f} | "
                      f"{time.time() - t0:.0f} |", flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for p in known:
        if p["bits"] == args.bits:
            points.setdefault((p["metric"], p["group"]), []).append((p["bpw"], p["ppl"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (metric, group), pts in points.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if group == -1 else "s--",
                label=f"{metric}, {'per row' if group == -1 else f'g{group}'}")
    ax.set_xlabel("bits per weight of the quantized linears (gift files)")
    ax.set_ylabel("Wikipedia perplexity (untrained)")
    ax.set_title(f"SmolLM2-135M, GPTQ W{args.bits} + salient columns")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
