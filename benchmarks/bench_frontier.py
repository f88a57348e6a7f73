"""Perplexity against bits per weight on disk, untrained, for the saliency metrics x groups x k (issue 12).

    python benchmarks/bench_frontier.py [--bits 3] [--metric gift owq ...] [--group -1 128] [--k 8 16 32]

SmolLM2-135M-Instruct, GPTQ at ``--bits`` with ``k`` salient columns in every projection (3 k for
down_proj, whose 1536 inputs are 2.7x the others'), statistics of one non-sequential calibration pass
(32 x 512 C4 tokens) shared by every point; perplexity on 10 held-out Wikipedia windows of 512 tokens;
bits per weight of the quantized linears from the ``gift`` export's files (``export.storage``).
Prints a markdown table and writes ``--plot`` (perplexity vs bits per weight, one line per metric and
group size).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from gift_quant.compress import collect_stats, quantize_with_stats
from gift_quant.evaluate import nonoverlapping_windows, perplexity
from gift_quant.export import storage
from gift_quant.gift_format import export_gift
from gift_quant.recipe import QuantSpec, SaliencySpec
from gift_quant.sources import C4, SMOLLM2, WIKI, load_model, read_text, sample_windows, tokenize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--metric", nargs="+", default=["gift", "owq", "wanda", "quik"])
    ap.add_argument("--group", type=int, nargs="+", default=[-1, 128])
    ap.add_argument("--k", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--plot", default="benchmarks/frontier.png")
    args = ap.parse_args()

    model, tok = load_model(SMOLLM2)
    original = {n: p.detach().clone() for n, p in model.state_dict().items()}
    calib = sample_windows(tokenize(tok, read_text(C4)), 32, 512, seed=0)
    evalw = nonoverlapping_windows(tokenize(tok, read_text(WIKI)), 512, 10)
    stats = collect_stats(model, calib, SaliencySpec().targets)
    print(f"full precision: ppl {perplexity(model, evalw):.2f}", flush=True)
    print("| metric | group | k (down_proj 3k) | bits/weight on disk | ppl | s |")
    print("|---|---|---|---|---|---|")
    points: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for metric in args.metric:
        for group in args.group:
            for k in args.k:
                model.load_state_dict(original)
                sal = SaliencySpec(metric=metric, k=k, k_overrides={"down_proj": 3 * k})
                t0 = time.time()
                results = quantize_with_stats(model, stats, sal, QuantSpec(bits=args.bits, group_size=group))
                ppl = perplexity(model, evalw)
                with tempfile.TemporaryDirectory() as tmp:
                    export_gift(model, tok, results, Path(tmp) / "gift", {})
                    shapes = {n: tuple(qw.codes.shape) for n, qw in results.items()}
                    bpw = storage(Path(tmp) / "gift", shapes)["linear_bits_per_weight"]
                points.setdefault((metric, group), []).append((bpw, ppl))
                print(f"| {metric} | {'row' if group == -1 else group} | {k} | {bpw:.3f} | {ppl:.2f} | "
                      f"{time.time() - t0:.0f} |", flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
