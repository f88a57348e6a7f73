"""Reports of one or more pipeline runs: markdown tables, recovery ratios and PNG plots.

Built only from what the stages wrote (``evaluate/results.json``, manifests, the training log), so
``gift-quant report RUN_DIR...`` can compare runs made at different times.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SHORT = {"gq_arc_easy": "ARC-e", "gq_arc_challenge": "ARC-c", "gq_hellaswag": "HellaSwag", "gq_piqa": "PIQA",
         "gq_winogrande": "WinoGrande", "gq_boolq": "BoolQ"}


def recovery(recovered: float, quantized: float, full: float, higher_is_better: bool) -> float | None:
    """Share of the gap closed: ``(recovered - quantized) / (full precision - quantized)``.

    None when there is no gap: a quantized model that already scores as well as full precision (an
    accuracy above it, as 40-item task samples produce) would otherwise turn the ratio's sign around.
    """
    worse_by = (full - quantized) if higher_is_better else (quantized - full)
    if worse_by <= 0:
        return None
    return (recovered - quantized) / (full - quantized)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def load_rows(run_dirs: list[Path]) -> dict[str, dict]:
    """Evaluated variants of every run, labelled ``<run>: <variant>`` when there are several runs."""
    rows = {}
    for d in map(Path, run_dirs):
        if not (d / "evaluate" / "results.json").exists():
            raise FileNotFoundError(f"{d}: no evaluate/results.json; run the evaluate stage first")
        results = _json(d / "evaluate" / "results.json")
        if not results:
            raise ValueError(f"{d}: the evaluate stage scored no model (eval.baselines empty and nothing exported "
                             "that the report scores)")
        for label, row in results.items():
            rows[label if len(run_dirs) == 1 else f"{d.name}: {label}"] = row
    return rows


def task_names(row: dict) -> list[str]:
    return [t for t in row["tasks"] if not t.startswith("mean_acc")]


def task_cell(metrics: dict) -> str:
    cell = " / ".join(f"{metrics[m]:.4f}" for m in ("acc", "acc_norm") if m in metrics)
    return cell + (f" ± {metrics['acc_stderr']:.3f}" if "acc_stderr" in metrics else "")


def _ppl(r: dict) -> str:
    ci = r.get("ppl_ci95")
    return f"{r['ppl']:.3f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")


def mean_cell(tasks: dict) -> str:
    return f"{tasks['mean_acc']:.4f}" + (f" ± {tasks['mean_acc_stderr']:.3f}" if "mean_acc_stderr" in tasks else "")


INDICATIVE_SE = 0.02  # a mean accuracy with a larger standard error cannot separate models a few points apart


def noise_lines(rows: dict[str, dict]) -> list[str]:
    """Which differences are within noise: perplexities whose 95% intervals overlap, mean accuracies less
    than 1.96 combined standard errors apart; and whether the task means are only indicative."""
    labels, out = list(rows), []
    ppl = [f"{a} / {b}" for i, a in enumerate(labels) for b in labels[i + 1:]
           if "ppl_ci95" in rows[a] and "ppl_ci95" in rows[b]
           and rows[a]["ppl_ci95"][0] <= rows[b]["ppl_ci95"][1] and rows[b]["ppl_ci95"][0] <= rows[a]["ppl_ci95"][1]]
    if any("ppl_ci95" in r for r in rows.values()):
        out.append("Perplexity within noise (95% intervals from the spread of the windows overlap): "
                   + ("; ".join(ppl) if ppl else "none") + ".")
    with_se = [k for k in labels if "mean_acc_stderr" in rows[k].get("tasks", {})]
    if with_se:
        acc = []
        for i, a in enumerate(with_se):
            for b in with_se[i + 1:]:
                ta, tb = rows[a]["tasks"], rows[b]["tasks"]
                if abs(ta["mean_acc"] - tb["mean_acc"]) < 1.96 * (ta["mean_acc_stderr"] ** 2 + tb["mean_acc_stderr"] ** 2) ** 0.5:
                    acc.append(f"{a} / {b}")
        out.append("Mean accuracy within noise (less than 1.96 combined standard errors apart): "
                   + ("; ".join(acc) if acc else "none") + ".")
        worst = max(rows[k]["tasks"]["mean_acc_stderr"] for k in with_se)
        if worst > INDICATIVE_SE:
            out.append(f"The task columns are indicative only: the mean accuracy's standard error reaches {worst:.3f} "
                       f"(above {INDICATIVE_SE}); score more items a task (eval.limit) to separate models.")
    return [""] + out if out else []


def _tables(rows: dict[str, dict]) -> list[str]:
    tasks = next((task_names(r) for r in rows.values() if "tasks" in r), [])
    head = ["model", "perplexity"] + [SHORT.get(t, t) for t in tasks] + (["mean acc"] if tasks else []) + ["eval s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        cells = [label, _ppl(r)]
        if tasks:
            cells += [task_cell(r["tasks"][t]) for t in tasks] + [mean_cell(r["tasks"])]
        cells.append(f"{r.get('eval_s', 0):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    if tasks:
        lines += ["", "Task cells are acc / acc_norm (where the task defines it) ± the standard error of acc; the mean "
                  "is over acc. Perplexity: 95% interval in brackets."]
    return lines + noise_lines(rows)


def _recovery_lines(rows: dict[str, dict]) -> list[str]:
    fp = next((r for k, r in rows.items() if k.endswith("full precision")), None)
    rec = next((r for k, r in rows.items() if "GIFT-SW" in k), None)
    if fp is None or rec is None:
        return []
    out = ["", "Recovery `(recovered - quantized) / (full precision - quantized)`:", ""]
    for k, r in rows.items():
        if ("GPTQ" in k or "RTN" in k) and "LoRA" not in k:
            parts = [_ratio("perplexity", recovery(rec["ppl"], r["ppl"], fp["ppl"], higher_is_better=False))]
            if "tasks" in r and "tasks" in fp and "tasks" in rec:
                acc = recovery(rec["tasks"]["mean_acc"], r["tasks"]["mean_acc"], fp["tasks"]["mean_acc"], higher_is_better=True)
                parts.append(_ratio("mean acc", acc))
            out.append(f"- vs {k}: " + ", ".join(parts))
    return out


def _source_lines(rows: dict[str, dict]) -> list[str]:
    """Where each scored model came from: the exported folders for what the run ships (loaded as a user loads
    them), memory for the baselines, which are not shipped."""
    shipped = [f"{label} {row['source']}" if row["source"].startswith("rebuilt") else f"{label} from `{row['source']}`"
               for label, row in rows.items() if "source" in row and not row["source"].startswith("in memory")]
    if not shipped:
        return []
    rest = [label for label, row in rows.items() if row.get("source", "").startswith("in memory")]
    return ["", "Scored from what ships: " + "; ".join(shipped) + "."
            + (f" In memory (not exported): {', '.join(rest)}." if rest else "")]


def _ratio(metric: str, value: float | None) -> str:
    return f"{metric} {value:.1%}" if value is not None else f"{metric} n/a (no worse than full precision)"


def smooth(values: list[float], span: int = 10) -> list[float]:
    """Exponential moving average with the weight ``2 / (span + 1)``, started at the first value (the curve
    drawn over the raw losses, which are noisy step to step)."""
    alpha, out = 2 / (span + 1), []
    for v in values:
        out.append(v if not out else alpha * v + (1 - alpha) * out[-1])
    return out


def _save(fig, out: Path, name: str, alt: str) -> list[str]:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return ["", f"![{alt}]({name})"]


def _plots(rows: dict[str, dict], run_dirs: list[Path], out: Path) -> list[str]:
    md = []
    labels = list(rows)
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(labels) + 1.2))
    ax.barh(labels, [rows[k]["ppl"] for k in labels], color="#4c72b0")
    ax.set_xscale("log")
    ax.set_xlabel("perplexity (log scale, lower is better)")
    ax.invert_yaxis()
    for i, k in enumerate(labels):
        ax.text(rows[k]["ppl"], i, f" {rows[k]['ppl']:.2f}", va="center")
    md += _save(fig, out, "perplexity.png", "perplexity")

    with_tasks = [k for k in labels if "tasks" in rows[k]]
    if with_tasks:
        tasks = task_names(rows[with_tasks[0]])
        fig, ax = plt.subplots(figsize=(1.3 * len(tasks) + 3, 4))
        width = 0.8 / len(with_tasks)
        for i, k in enumerate(with_tasks):
            ax.bar([j + i * width for j in range(len(tasks) + 1)],
                   [rows[k]["tasks"][t]["acc"] for t in tasks] + [rows[k]["tasks"]["mean_acc"]], width, label=k)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks) + 1)], [SHORT.get(t, t) for t in tasks] + ["mean"])
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7)
        md += _save(fig, out, "tasks.png", "zero-shot accuracy")

    logs = {f"{Path(d).name}{label}": Path(d) / stage / "train_log.jsonl"
            for d in run_dirs for stage, label in (("train", ""), ("lora", " LoRA"))}
    logs = {n: [json.loads(x) for x in p.read_text().splitlines() if x.strip()] for n, p in logs.items() if p.exists()}
    if any(logs.values()):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for name, recs in logs.items():
            steps, loss = [r["step"] for r in recs], [r["loss"] for r in recs]
            line, = ax.plot(steps, loss, lw=0.6, alpha=0.35)
            ax.plot(steps, smooth(loss), lw=1.6, color=line.get_color(), label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats/token)")
        ax.legend(fontsize=7)
        md += _save(fig, out, "loss.png", "training loss")
    return md


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """``report.md`` and its PNGs in ``out`` for the given run folders."""
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(run_dirs)
    lines = ["# gift-quant report", ""]
    for d in map(Path, run_dirs):
        recipe = _json(d / "recipe.json")
        q = _json(d / "quantize" / "manifest.json")
        lines.append(f"- `{d.name}`: model `{recipe.get('model', {}).get('ref')}`, "
                     f"{q.get('bits_per_weight', float('nan')):.3f} bits per weight over the quantized linears")
    lines += [""] + _tables(rows) + _recovery_lines(rows) + _source_lines(rows)
    for d in map(Path, run_dirs):
        done = sorted((p for p in d.glob("*/manifest.json") if p.parent.name != "report"), key=lambda p: p.stat().st_mtime)
        lines += ["", f"Stage wall times of `{d.name}` (s, in the order they finished): "
                  + ", ".join(f"{p.parent.name} {_json(p)['seconds']:.0f}" for p in done)]
        sizes = _json(d / "export" / "manifest.json").get("formats", {})
        if sizes:
            lines.append("Export sizes: " + ", ".join(f"`{k}` {v['bytes'] / 1e6:.1f} MB "
                         f"({v['linear_bits_per_weight']:.2f} bits per weight in the quantized linears)"
                         for k, v in sizes.items()))
    lines += _plots(rows, run_dirs, out)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
