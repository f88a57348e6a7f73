"""Start-up time of the command line, beside what it cannot go below and what it used to pay (issue 14).

    python benchmarks/bench_cli.py [--repeat 5]

Each command runs ``--repeat`` times in a fresh process; the table gives the median wall time and its
ratio to ``import torch`` (every gift-quant command needs torch). "with the quantizer registry" is what
``import gift_quant`` cost before the registration of the gift quantizer waited for transformers'
registry to be imported by whoever needs it.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c 'import torch' (floor)": [sys.executable, "-c", "import torch"],
    "gift-quant --help": [sys.executable, "-m", "gift_quant.cli", "--help"],
    "gift-quant recover --help": [sys.executable, "-m", "gift_quant.cli", "recover", "--help"],
    "import gift_quant + transformers' quantizer registry (before)":
        [sys.executable, "-c", "import gift_quant, transformers.quantizers.auto"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print("| command | median s | x import torch |")
    print("|---|---|---|")
    floor = None
    for name, cmd in COMMANDS.items():
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        floor = floor or med
        print(f"| {name} | {med:.2f} | {med / floor:.2f} |", flush=True)


if __name__ == "__main__":
    main()
