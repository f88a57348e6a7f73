"""What the training text costs in memory and time: tokenized whole (as before issue 42) against a piece at a time
into a memory-mapped token file (``data.text_tokens``, ``data.TextExamples``: the product's way).

    python benchmarks/bench_data.py [--copies 1 3 6]

The text is the bundled C4 repeated ``--copies`` times (1.3 MB a copy), tokenized with SmolLM2's tokenizer. Each
way runs in a process of its own with glibc's mmap threshold pinned (the RSS then follows what is alive) and reads
its peak with ``devices.peak``: the whole text tokenized at once and cut into windows of 256 tokens, or written to
the token file and a step's 16 windows read from it. Prints seconds and the peak RSS added, and checks that both ways
give the same windows.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import row, run_measured, table

CHILD = """
import sys, tempfile, time, torch
sys.path.insert(0, "benchmarks")
from common import emit
from gift_quant import devices
from gift_quant.data import TextExamples, nonoverlapping_windows, text_tokens
from gift_quant.sources import SMOLLM2, load_tokenizer, read_text, tokenize
path, way = sys.argv[1], sys.argv[2]
tok = load_tokenizer(SMOLLM2)
rows = torch.arange(0, 1100, 70)  # 16 windows, within one copy
t0 = time.time()
with devices.peak(torch.device("cpu")) as used:
    if way == "whole":
        windows = nonoverlapping_windows(tokenize(tok, read_text(path)), 256)
        n, got = len(windows), windows[rows]
    else:
        examples = TextExamples(text_tokens(tok, path, tempfile.mkdtemp()), 256)
        n, got = len(examples), examples.ids[rows]
emit({"seconds": time.time() - t0, "added": used.added, "windows": n, "sum": int(got.sum())})
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, nargs="+", default=[1, 3, 6])
    args = ap.parse_args()
    from gift_quant.sources import C4, read_text

    c4 = read_text(C4)
    table("text MB", "windows of 256", "whole: s", "whole: MB added", "token file: s", "token file: MB added",
          "memory whole / file", "same windows")
    with tempfile.TemporaryDirectory() as d:
        for copies in args.copies:
            path = Path(d) / f"c4x{copies}.txt"
            path.write_text(c4 * copies)
            whole, pieces = run_measured(CHILD, str(path), "whole"), run_measured(CHILD, str(path), "pieces")
            same = whole["windows"] == pieces["windows"] and whole["sum"] == pieces["sum"]
            row(f"{path.stat().st_size / 1e6:.1f}", whole["windows"], f"{whole['seconds']:.1f}",
                f"{whole['added'] / 2**20:.0f}", f"{pieces['seconds']:.1f}", f"{pieces['added'] / 2**20:.1f}",
                f"{whole['added'] / max(pieces['added'], 1):.0f}x", "yes" if same else "NO")


if __name__ == "__main__":
    main()
