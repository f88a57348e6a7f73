"""Run reports: a markdown table, the recovery ratio, and plots (perplexity bars, training loss)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def recovery(recovered: float, quantized: float, full: float) -> float:
    """Share of the gap closed: ``(recovered - quantized) / (full precision - quantized)``."""
    return (recovered - quantized) / (full - quantized)


def _manifest(run_dir: Path, stage: str) -> dict:
    p = run_dir / stage / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _bar_plot(rows: dict[str, dict], path: Path) -> None:
    labels = list(rows)
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(labels) + 1.2))
    ax.barh(labels, [rows[k]["ppl"] for k in labels], color="#4c72b0")
    ax.set_xscale("log")
    ax.set_xlabel("perplexity (log scale, lower is better)")
    ax.invert_yaxis()
    for i, k in enumerate(labels):
        ax.text(rows[k]["ppl"], i, f" {rows[k]['ppl']:.2f}", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _loss_plot(log_path: Path, path: Path) -> bool:
    recs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    if not recs:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in recs], [r["lr"] for r in recs], color="gray", lw=0.8, ls="--")
    ax2.set_ylabel("learning rate", color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(run, out: Path) -> Path:
    """``report.md`` (+ PNGs) for one pipeline run, from its stage outputs."""
    run_dir = Path(run.dir)
    rows: dict[str, dict] = json.loads((run_dir / "evaluate" / "results.json").read_text())
    lines = [f"# {run.recipe.name}", "", f"Model: `{run.recipe.model.ref}`", ""]
    lines += ["| model | perplexity | eval s |", "|---|---|---|"]
    lines += [f"| {k} | {v['ppl']:.3f} | {v['eval_s']:.0f} |" for k, v in rows.items()]
    fp = rows.get("full precision", {}).get("ppl")
    recovered = next((v["ppl"] for k, v in rows.items() if k.startswith("GIFT-SW")), None)
    lines.append("")
    if fp is not None and recovered is not None:
        for k, v in rows.items():
            if k.startswith(("GPTQ", "RTN")):
                lines.append(f"- perplexity recovery vs {k}: {recovery(recovered, v['ppl'], fp):.1%} of the gap closed")
    lines += ["", "| stage | seconds |", "|---|---|"]
    for stage in ("quantize", "train", "export", "evaluate"):
        m = _manifest(run_dir, stage)
        if m:
            lines.append(f"| {stage} | {m['seconds']:.0f} |")
    exp = _manifest(run_dir, "export")
    sizes = {k[:-6]: v for k, v in exp.items() if k.endswith("_bytes")}
    if sizes:
        lines += ["", "| export | size on disk (MB) |", "|---|---|"]
        lines += [f"| {k} | {v / 1e6:.1f} |" for k, v in sizes.items()]
    _bar_plot(rows, out / "perplexity.png")
    lines += ["", "![perplexity](perplexity.png)"]
    if _loss_plot(run_dir / "train" / "train_log.jsonl", out / "loss.png"):
        lines += ["", "![training loss](loss.png)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
