"""GIFT-SW training variants against LoRA at equal trainable parameters, on SmolLM2-135M-Instruct.

    python benchmarks/bench_train.py [--steps 60] [--lr 1e-3] [--seq-len 256] [--eval-windows 20]
        [--eval-every 50] [--metric gift] [--group -1] [--k 16] [--seed 0] [--work DIR] [--only SUBSTR,...]

One GPTQ 3-bit model with salient columns (``--k`` a layer, 3 k for down_proj; C4 calibration,
statistics of the full-precision model, ``--metric`` and ``--group`` as in the recipe) is shared by
every variant. Each variant trains in its own child process (so peak memory is its own) on the same
packed C4 windows of ``--seq-len`` tokens, 4 a step, and is scored by perplexity on held-out Wikipedia
(512-token windows). LoRA (peft, all seven projections, rank chosen so its parameters equal the salient
columns') trains on the same quantized base with the salient columns frozen. The full-precision
reference scores the same windows and the batches of the last 50 training steps: its loss there is what
a trained variant's "loss, last 50 steps" is to be read against (the logged loss of a variant with noise
or distillation includes those; only the others compare directly). Prints a markdown table.

Long budgets span sessions: with ``--work DIR`` the base is quantized once, each variant checkpoints
every 25 steps and resumes there when rerun, and finished variants are read back from
``DIR/results.jsonl`` instead of being trained again. Every ``--eval-every`` steps a variant scores the
Wikipedia windows (``DIR/<variant>/heldout.jsonl``): the curve that says whether more steps would help.
``--seed`` changes the training seed (data order, noise) over the same base (copy ``quantized.safetensors``
and ``bpw.json`` into the new work folder to skip quantizing it again): the spread a single seed hides.

    python benchmarks/bench_train.py --plot benchmarks/trained.png DIR [DIR ...]

draws perplexity against bits per weight on disk (the base's ``gift`` export; a LoRA adds its fp16
factors) from the results of several work folders, one line per variant, and prints their table.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from bench_frontier import disk_bits_per_weight
from common import calibration, emit, heldout, run_child
from safetensors.torch import load_file

from gift_quant.checkpoint import load_quantized, save_quantized
from gift_quant.data import text_examples
from gift_quant.evaluate import perplexity
from gift_quant.layers import merge_to_dense, wrap_quantized
from gift_quant.lora import lora_rank
from gift_quant.quantize import collect_stats, quantize_with_stats
from gift_quant.recipe import QuantSpec, SaliencySpec, TrainSpec
from gift_quant.report import smooth
from gift_quant.sources import C4, SMOLLM2, load_model, load_tokenizer, read_text, tokenize
from gift_quant.train import batch_indices, train

MODEL = SMOLLM2
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

VARIANTS = {
    "untrained": None,
    "GIFT-SW (paper: gaussian, 4-bit step)": dict(noise="gaussian", noise_bits=4),
    "salient FT, no noise": dict(noise="none"),
    "rounding noise (uniform, 3-bit step)": dict(noise="uniform", noise_bits=3),
    "gaussian 4-bit, annealed to 0": dict(noise="gaussian", noise_bits=4, noise_schedule="linear"),
    "gaussian 4-bit + distillation": dict(noise="gaussian", noise_bits=4, distill=1.0),
    "no noise + distillation": dict(noise="none", distill=1.0),
    "LoRA of equal size (peft), salient frozen": "lora",
    "full precision (reference)": "fp",
}
FP = next(name for name, kind in VARIANTS.items() if kind == "fp")
BATCH = 4  # training windows a step
TAIL = 50  # steps at the end of training whose mean loss the table shows


def tail_loss(folder: Path, steps: int) -> float | None:
    """Mean logged training loss over the last ``TAIL`` steps of a variant (None if it has no log)."""
    log = folder / "train_log.jsonl"
    if not log.exists():
        return None
    losses = [r["loss"] for r in map(json.loads, log.read_text().splitlines()) if r["step"] > steps - TAIL]
    return statistics.mean(losses) if losses else None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _cell(row: dict, key: str, fmt: str) -> str:
    return "-" if row.get(key) is None else format(row[key], fmt)


def _examples(tok, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed C4 training windows every variant reads."""
    return text_examples(tokenize(tok, read_text(C4)), seq_len)


def _heldout(tok, windows: int) -> torch.Tensor:
    """The Wikipedia windows every variant is scored on."""
    return heldout(tok, windows)


def _results(work: Path) -> dict[str, dict]:
    """The finished variants of a work folder, by name."""
    done = work / "results.jsonl"
    return {r["variant"]: r for r in map(json.loads, done.read_text().splitlines())} if done.exists() else {}


def _point(setting: dict) -> str:
    group = "row" if setting["group"] == -1 else f"g{setting['group']}"
    return f"{setting['metric']} {group} k{setting['k']}"


def _trainable(model, variant, results: dict, out: dict):
    """The quantized model of ``variant`` with what it trains: salient columns (with its noise), or for LoRA
    the merged base with an adapter of equal size (its rank goes to ``out``)."""
    cfg = variant if isinstance(variant, dict) else {}
    wrap_quantized(model, results, cfg.get("noise", "none"), cfg.get("noise_bits", 4))
    if variant != "lora":
        return model
    from peft import LoraConfig, get_peft_model

    salient = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out["lora_rank"] = rank = lora_rank(salient, [tuple(qw.codes.shape[::-1]) for qw in results.values()])
    merge_to_dense(model)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS))


def _score_heldout(model, evalw: torch.Tensor, folder: Path, step: int) -> float:
    """Perplexity of ``model`` (in eval mode) on the held-out windows, appended to ``folder/heldout.jsonl``."""
    ppl = perplexity(model.eval(), evalw, desc=f"held-out, step {step}")
    with (folder / "heldout.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, "ppl": ppl}) + "\n")
    return ppl


def score_checkpoints(work: Path, every: int) -> None:
    """Held-out perplexity of the kept checkpoints (every ``every`` steps) that have no point in a variant's
    ``heldout.jsonl`` yet: the curve of runs started without ``--eval-every``. Training keeps the last two
    checkpoints, so run this while they train."""
    st = json.loads((work / "setting.json").read_text())
    results = load_quantized(work / "quantized.safetensors")
    evalw = _heldout(load_tokenizer(MODEL), st["eval_windows"])
    for name, variant in VARIANTS.items():
        if variant in (None, "fp"):
            continue
        folder = work / _slug(name)
        held = folder / "heldout.jsonl"
        seen = {r["step"] for r in map(json.loads, held.read_text().splitlines())} if held.exists() else set()
        model = None  # built once a variant, at its first checkpoint to score; each state replaces all it trains
        for ck in sorted((folder / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:])):
            step = int(ck.name[5:])
            if step in seen or step % every:
                continue
            try:
                state = load_file(ck / "model.safetensors")
            except FileNotFoundError:  # removed by the run meanwhile, or an older checkpoint format
                continue
            if model is None:
                model = _trainable(load_model(MODEL)[0], variant, results, {})
            unexpected = model.load_state_dict(state, strict=False).unexpected_keys
            if unexpected or len(state) != sum(p.requires_grad for p in model.parameters()):
                raise SystemExit(f"{ck}: its tensors do not match {name!r}'s trainable parameters ({unexpected[:3]})")
            print(f"{name}: step {step} ppl {_score_heldout(model, evalw, folder, step):.2f}", flush=True)


def child(args) -> None:
    """Train one variant (resuming from its checkpoints in the work folder); print a RESULT line."""
    model, tok = load_model(MODEL)
    results = load_quantized(Path(args.work) / "quantized.safetensors")
    variant = VARIANTS[args.variant]
    evalw = _heldout(tok, args.eval_windows)
    if variant == "fp":
        return emit(reference(args, model, tok, evalw))
    teacher = load_model(MODEL)[0] if isinstance(variant, dict) and variant.get("distill") else None
    cfg = variant if isinstance(variant, dict) else {}
    out = {"variant": args.variant}
    model = _trainable(model, variant, results, out)
    if variant is not None:
        out["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ids, labels = _examples(tok, args.seq_len)
        spec = TrainSpec(steps=args.steps, lr=args.lr, micro_batch_size=BATCH, seq_len=args.seq_len,
                         checkpoint_every=25, **cfg)
        folder = Path(args.work) / _slug(args.variant)

        def heldout(step: int, _loss: float) -> None:
            if args.eval_every and step % args.eval_every == 0:  # eval mode: no noise; the RNG is not touched
                _score_heldout(model, evalw, folder, step)
                model.train()

        summary = train(model, ids, labels, spec, folder, seed=args.seed, teacher=teacher, on_step=heldout)
        logs = [json.loads(x) for x in (folder / "train_log.jsonl").read_text().splitlines()]
        steady = logs[2:] or logs  # the median step: a run paused or resumed across sessions has outliers
        out.update(s_per_step=statistics.median(r["s_per_step"] for r in steady),
                   tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
                   first_loss=logs[0]["loss"], final_loss=summary["final_loss"])
    out["ppl"] = perplexity(model.eval(), evalw)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    emit(out)


@torch.no_grad()
def reference(args, model, tok, evalw: torch.Tensor) -> dict:
    """The full-precision model on the batches of the last ``TAIL`` training steps (the loss the trained
    variants should approach on their own data) and on the evaluation windows."""
    ids, labels = _examples(tok, args.seq_len)
    spec = TrainSpec(steps=args.steps, micro_batch_size=BATCH, seq_len=args.seq_len)
    losses = []
    for step in range(max(0, args.steps - TAIL), args.steps):
        idx = batch_indices(len(ids), step, 0, spec, rank=0, world=1, seed=args.seed)
        losses.append(model(input_ids=ids[idx], labels=labels[idx]).loss.item())
    return {"variant": args.variant, "tail_loss": statistics.mean(losses), "ppl": perplexity(model.eval(), evalw),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seq-len", type=int, default=256, help="tokens a training window (4 windows a step)")
    ap.add_argument("--metric", default="gift")
    ap.add_argument("--group", type=int, default=-1)
    ap.add_argument("--k", type=int, default=16, help="salient columns a layer (3 k for down_proj)")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="training seed (data order, noise); the base stays seed 0's")
    ap.add_argument("--eval-every", type=int, default=50, help="score the Wikipedia windows every N steps (0: never)")
    ap.add_argument("--only", default=None, help="comma-separated substrings: run only the matching variants")
    ap.add_argument("--variant")
    ap.add_argument("--work", help="keep the base, checkpoints and results here (resumable); default: a temp folder")
    ap.add_argument("--score-checkpoints", action="store_true",
                    help="score the kept checkpoints of --work on the held-out text (runs without --eval-every)")
    ap.add_argument("--plot", nargs="+", metavar=("PNG", "DIR"), help="plot the results of these work folders")
    args = ap.parse_args()
    if args.variant:
        return child(args)
    if args.score_checkpoints:
        return score_checkpoints(Path(args.work), args.eval_every)
    if args.plot:
        return plot(Path(args.plot[0]), [Path(d) for d in args.plot[1:]])
    work = Path(args.work or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    setting = dict(metric=args.metric, group=args.group, k=args.k, calib=args.calib, steps=args.steps,
                   lr=args.lr, seq_len=args.seq_len, eval_windows=args.eval_windows)
    if args.seed:  # a folder of seed 0 has no key: the folders of earlier commits stay valid
        setting["seed"] = args.seed
    if (work / "setting.json").exists() and json.loads((work / "setting.json").read_text()) != setting:
        raise SystemExit(f"{work} holds runs of another setting ({(work / 'setting.json').read_text()}); use another --work")
    (work / "setting.json").write_text(json.dumps(setting))
    print(f"setting: {json.dumps(setting)}", flush=True)
    if not (work / "quantized.safetensors").exists() or not (work / "bpw.json").exists():
        model, tok = load_model(MODEL)  # quantized in place below: the export needs only its other weights
        if (work / "quantized.safetensors").exists():
            results = load_quantized(work / "quantized.safetensors")
        else:
            calib = calibration(tok, args.calib)
            sal = SaliencySpec(metric=args.metric, k=args.k, k_overrides={"down_proj": 3 * args.k})
            t = time.time()
            stats = collect_stats(model, calib, sal.targets)
            results = quantize_with_stats(model, stats, sal, QuantSpec(bits=3, group_size=args.group))
            save_quantized(results, work / "quantized.tmp")
            (work / "quantized.tmp").rename(work / "quantized.safetensors")
            print(f"GPTQ W3 + salient columns: {time.time() - t:.0f} s", flush=True)
        weights = sum(qw.codes.numel() for qw in results.values())
        (work / "bpw.json").write_text(json.dumps({"bpw": disk_bits_per_weight(model, tok, results),
                                                   "weights": weights}))
    done_file = work / "results.jsonl"
    done = _results(work)
    print(f"| variant | trainable params | ppl | first loss | final loss | loss, last {TAIL} steps | s/step | tokens/s "
          "| peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in VARIANTS:
        if args.only and not any(o in name for o in args.only.split(",")):
            continue
        if name not in done:
            cmd = [sys.executable, __file__, "--variant", name, "--work", str(work), "--steps", str(args.steps),
                   "--lr", str(args.lr), "--seq-len", str(args.seq_len), "--eval-windows", str(args.eval_windows),
                   "--eval-every", str(args.eval_every), "--seed", str(args.seed)]
            answer, res = run_child(cmd)
            if answer is None:
                print(f"| {name} | failed: {res.stderr[-500:]!r} |", flush=True)
                continue
            done[name] = answer
            with done_file.open("a") as f:
                f.write(json.dumps(done[name]) + "\n")
        r = done[name]
        r.setdefault("tail_loss", tail_loss(work / _slug(name), args.steps))
        f = partial(_cell, r)
        print(f"| {name} | {f('trainable', ',')} | {r['ppl']:.2f} | {f('first_loss', '.3f')} | {f('final_loss', '.3f')} | "
              f"{f('tail_loss', '.3f')} | {f('s_per_step', '.2f')} | {f('tokens_per_s', '.0f')} | {r['peak_rss_gb']:.2f} |",
              flush=True)


def plot(png: Path, works: list[Path]) -> None:
    """Perplexity against bits per weight on disk, one line per variant over the work folders' points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float]]] = {}
    full = None
    print(f"| point | bits/weight | variant | ppl | loss, last {TAIL} steps | s/step (median) |")
    print("|---|---|---|---|---|---|")
    for work in works:
        st, size = (json.loads((work / f).read_text()) for f in ("setting.json", "bpw.json"))
        point = _point(st)
        for r in _results(work).values():
            r.setdefault("tail_loss", tail_loss(work / _slug(r["variant"]), st["steps"]))
            f = partial(_cell, r)
            if r["variant"] == FP:
                full = r["ppl"]
                print(f"| {point} | 32 | {r['variant']} | {r['ppl']:.2f} | {f('tail_loss', '.3f')} | - |")
                continue
            bpw = size["bpw"] + (16 * r["trainable"] / size["weights"] if "lora_rank" in r else 0.0)
            lines.setdefault(r["variant"], []).append((bpw, r["ppl"]))
            print(f"| {point} | {bpw:.3f} | {r['variant']} | {r['ppl']:.2f} | {f('tail_loss', '.3f')} | "
                  f"{f('s_per_step', '.2f')} |")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if full is not None:
        ax.axhline(full, color="gray", linestyle=":", label=f"full precision ({full:.2f})")
    for name, pts in lines.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xlabel("bits per weight of the quantized linears (gift files; LoRA: + its fp16 factors)")
    ax.set_ylabel("Wikipedia perplexity")
    ax.set_title("SmolLM2-135M W3, trained variants at the frontier's best points")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    for work in works:
        loss_curves(work, png.with_name(f"{png.stem}-loss-{work.name}.png"))


def loss_curves(work: Path, png: Path) -> None:
    """Left: training loss of every variant of a work folder (smoothed over 25 steps), the full-precision
    model's loss on the last batches, and where the second pass over the training text begins. Right: the
    held-out Wikipedia perplexity every ``--eval-every`` steps, where a variant recorded it (whether a
    curve has flattened is read here, not from the training loss)."""
    import matplotlib.pyplot as plt

    st = json.loads((work / "setting.json").read_text())
    n = len(_examples(load_tokenizer(MODEL), st["seq_len"])[0])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    done = _results(work)
    start = {0: done["untrained"]["ppl"]} if "untrained" in done else {}  # every curve starts from the base
    for name, kind in VARIANTS.items():
        log, held = (work / _slug(name) / f for f in ("train_log.jsonl", "heldout.jsonl"))
        if kind == "fp" or not log.exists():
            continue
        rows = [json.loads(x) for x in log.read_text().splitlines()]
        line, = ax.plot([r["step"] for r in rows], smooth([r["loss"] for r in rows], 25), label=name)
        if held.exists():
            ppl = start | {r["step"]: r["ppl"] for r in map(json.loads, held.read_text().splitlines())}  # rerun: last
            steps = sorted(ppl)
            bx.plot(steps, [ppl[k] for k in steps], "o-", color=line.get_color(), label=name)
    ref = done.get(FP)
    if ref:
        ax.hlines(ref["tail_loss"], max(0, st["steps"] - TAIL), st["steps"], colors="gray", linestyles=":",
                  label="full precision on the same batches")
        bx.axhline(ref["ppl"], color="gray", linestyle=":", label=f"full precision ({ref['ppl']:.2f})")
    for epoch in range(1, st["steps"] * BATCH // n + 1):
        for axis in (ax, bx):
            axis.axvline(epoch * n / BATCH, color="black", lw=0.6, linestyle="--")
    ax.set_xlabel(f"step (dashed: the training text begins again, every {n / BATCH:.1f} steps)")
    ax.set_ylabel("training loss (smoothed over 25 steps)")
    ax.set_title(f"{_point(st)}, {st['steps']} steps of 4 x {st['seq_len']} (losses include noise / KL where a variant has them)",
                 fontsize=9)
    bx.set_xlabel("step")
    bx.set_ylabel(f"Wikipedia perplexity ({st['eval_windows']} windows of 512)")
    bx.set_title("held-out perplexity during training", fontsize=9)
    for axis in (ax, bx):
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
