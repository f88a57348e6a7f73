#!/usr/bin/env bash
# Prepare the GPU check. The GPU machine has python3.12, torch, transformers, accelerate, peft, safetensors,
# pyyaml, tqdm and matplotlib, but no pydantic (which gift_quant.recipe needs), no registry and no install of
# this package. This fetches the missing wheels (the versions this tree is tested with) into .gpu_wheels/
# (ignored by git, carried by the device tool), then prints the command to run there: it installs them into a
# virtual environment of its own on top of the machine's packages (--system-site-packages), not into the
# machine's environment.
#
# lm-eval is not carried: with its dependencies (datasets, pyarrow, pandas, scikit-learn, scipy) it is well
# over the 64 MiB the device tool carries, and its task data sets would have to come too; the test suite runs
# the lm-eval path on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
rm -rf .gpu_wheels
mkdir -p .gpu_wheels
"$PIP" download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps \
  -d .gpu_wheels pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0
du -sh .gpu_wheels
cat <<'CMD'
device tool: run(carry=[".gpu_wheels"], timeout_s=540, command=
  python3 -m venv --system-site-packages .gpu_venv && .gpu_venv/bin/pip install -q --no-index --no-deps .gpu_wheels/*.whl && PYTHONPATH=. .gpu_venv/bin/python benchmarks/gpu_check.py --out $OUT/gpu_check.json)
CMD
