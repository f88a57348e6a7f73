#!/usr/bin/env bash
# Runs the benchmarks one after another (each uses both cores); logs go to benchmarks/out/.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/out
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python benchmarks/bench_quantize.py > benchmarks/out/bench_quantize.log 2>&1
.venv/bin/python benchmarks/bench_recovery.py --work benchmarks/out/recovery > benchmarks/out/bench_recovery.log 2>&1
