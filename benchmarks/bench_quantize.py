"""Perplexity of RTN / GPTQ / GPTQ + salient columns on SmolLM2-135M-Instruct, and the gptqmodel peer.

    python benchmarks/bench_quantize.py [--calib 128] [--eval-windows 20] [--setting 3:-1 ...]

Calibration: C4 windows of 512 tokens; held-out: Wikipedia, 512-token non-overlapping windows
(both from ASSETS.md). The saliency/bit/group grid shares one non-sequential calibration pass
(statistics of the full-precision model, like the issue's prototype); the comparison with
gptqmodel uses our default sequential mode on the same windows, in a child process.
Prints markdown tables.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import calibration, heldout, run_child, smollm2

from gift_quant.evaluate import perplexity
from gift_quant.quantize import collect_stats, quantize_model, quantize_with_stats
from gift_quant.recipe import QuantSpec, SaliencySpec
from gift_quant.sources import SMOLLM2, resolve_model

MODEL = SMOLLM2
PEER_SETTINGS = [(4, -1), (3, -1), (4, 128), (3, 128)]  # (bits, group size)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--setting", action="append", default=None, metavar="BITS:GROUP",
                    help="grid only at these settings, e.g. 3:-1 (repeatable; default: 2/3/4 bits x row/g128)")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--peer-only", action="store_true", help="only the comparison with gptqmodel")
    ap.add_argument("--peer-calib", type=int, default=32, help="calibration windows of the sequential peer runs")
    ap.add_argument("--peer-setting", action="append", default=None, metavar="BITS:GROUP",
                    help="peer comparison only at these settings, e.g. 3:-1 (repeatable; default: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration window sampler")
    ap.add_argument("--peer-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype gptqmodel quantizes in (ours calibrates in float32; gptqmodel's CPU default is bfloat16)")
    args = ap.parse_args()
    torch.manual_seed(0)

    model, tok = smollm2()
    original = {n: p.detach().clone() for n, p in model.state_dict().items()}
    calib = calibration(tok, args.calib, seed=args.seed)
    evalw = heldout(tok, args.eval_windows)

    if args.peer_only:
        return peer(model, original, calib[: args.peer_calib], evalw, args.peer_setting, args.peer_dtype)
    t = time.time()
    fp = perplexity(model, evalw)
    print(f"full precision: ppl {fp:.2f} ({time.time() - t:.0f} s eval)", flush=True)
    t = time.time()
    stats = collect_stats(model, calib, SaliencySpec().targets)
    calib_s = time.time() - t
    print(f"calibration statistics: {calib_s:.0f} s", flush=True)

    rows = []
    settings = _settings(args.setting) or [(b, g) for b in (3, 4, 2) for g in (-1, 128)]
    for bits, group in settings:
        # (label, method, k, preset, sym_step, clip search)
        configs = [("RTN", "rtn", 0, "gift", "paper", True), ("GPTQ", "gptq", 0, "gift", "paper", True),
                   ("GPTQ, gptq step, no clip", "gptq", 0, "gift", "gptq", False),
                   ("RTN + salient (gift)", "rtn", args.k, "gift", "paper", True)]
        configs += [(f"GPTQ + salient ({p})", "gptq", args.k, p, "paper", True) for p in ("gift", "owq", "quik", "wanda")]
        for label, method, k, preset, step, clip in configs:
            model.load_state_dict(original)
            sal = SaliencySpec(metric=preset, k=k, k_overrides={"down_proj": 3 * k})
            quant = QuantSpec(method=method, bits=bits, group_size=group, sym_step=step,
                              clip_steps=81 if clip else 1)
            t = time.time()
            quantize_with_stats(model, stats, sal, quant)
            q_s = time.time() - t
            ppl = perplexity(model, evalw)
            rows.append((bits, "row" if group == -1 else f"g{group}", label, ppl, q_s))
            print(f"| {bits} | {rows[-1][1]} | {label} | {ppl:.2f} | {q_s:.0f} |", flush=True)

    print(f"\nFull precision: {fp:.2f}. Calibration statistics ({args.calib} x 512 C4 tokens): {calib_s:.0f} s.")
    print("\n| bits | grid | method | ppl (wiki, 512) | quantize s |\n|---|---|---|---|---|")
    for b, g, label, ppl, q_s in rows:
        print(f"| {b} | {g} | {label} | {ppl:.2f} | {q_s:.0f} |")
    if not args.skip_peer:
        peer(model, original, calib[: args.peer_calib], evalw, args.peer_setting, args.peer_dtype)


def _settings(args: list[str] | None) -> list[tuple[int, int]]:
    """``["3:-1", "4:128"]`` -> ``[(3, -1), (4, 128)]``."""
    return [tuple(map(int, x.split(":"))) for x in args or []]


def peer(model, original, calib, evalw, only: list[str] | None = None, dtype: str = "float32") -> None:
    """Sequential GPTQ, ours vs gptqmodel 7.6.0: same windows, same grid (sym GPTQ step, no clipping
    search, damp 0.01, no act-order, true-sequential, groups fitted on the updated weights as
    gptqmodel does; gptqmodel's model in ``dtype``, ours always float32). gptqmodel's time includes its model load."""
    print("\n| setting | ours ppl | gptqmodel ppl | ours s | gptqmodel s | time ratio (gptqmodel/ours) | ppl ratio (ours/gptqmodel) |")
    print("|---|---|---|---|---|---|---|")
    folder = resolve_model(MODEL)
    tmp = Path(tempfile.mkdtemp())
    torch.save(calib, tmp / "calib.pt")
    torch.save(evalw, tmp / "eval.pt")
    settings = _settings(only) or PEER_SETTINGS
    for bits, group in settings:
        model.load_state_dict(original)
        t = time.time()
        quantize_model(model, calib, SaliencySpec(k=0),
                       QuantSpec(bits=bits, group_size=group, sym_step="gptq", clip_steps=1))
        ours_s = time.time() - t
        ours = perplexity(model, evalw)
        gm, out = run_child([str(Path(__file__).with_name("gptqmodel_peer.py")), folder, str(tmp / "calib.pt"),
                             str(tmp / "eval.pt"), str(bits), str(group), "0.01", str(tmp / f"gm{bits}"), dtype])
        if gm is None:
            print(out.stdout[-2000:], out.stderr[-3000:])
            continue
        print(f"| W{bits} {'row' if group == -1 else f'g{group}'} sym | {ours:.2f} | {gm['ppl']:.2f} | {ours_s:.0f} | {gm['quantize_s']:.0f} | "
              f"{gm['quantize_s'] / ours_s:.2f} | {ours / gm['ppl']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
