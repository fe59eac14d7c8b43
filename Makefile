# Two set-up commands, each builds the virtual environment it needs:
#   make demo   prep the sample dataset, train the tiny model on CPU, export the LoRA
#   make test   the test suite (CPU only; GPU tests skip), then make check-sdxl
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test test-fast check-sdxl gpu-check gpu-wheels bench clean

$(BIN)/animagine-lora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The pinned CPU build first: an unpinned torch would pull several GB of CUDA wheels.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	# The sampler tests' reference; --no-deps: its dependencies would pull torchvision and CUDA torch.
	$(BIN)/pip install --quiet --no-deps "k-diffusion==0.1.1.post1"
	touch $@

venv: $(BIN)/animagine-lora

# One pytest worker per core (each with one torch thread); files stay whole on one worker.
PYTEST := $(BIN)/python -m pytest -q -n auto --dist loadgroup

# The suite, then the exact SDXL architecture end to end (what CI runs).
test: venv
	$(PYTEST) tests
	$(MAKE) check-sdxl

# Everything but the tiny training runs and the end-to-end sampling, evaluation and merge tests
# (marked `heavy`): about two minutes while editing.
test-fast: venv
	$(PYTEST) -m "not heavy and not slow" tests

# The exact SDXL architecture (random weights) through prep, cache, train, export, convert and
# sample: a slow test (2-4 minutes and 9-11 GB of RAM on 2 cores; bench/RESULTS.md has the figures).
check-sdxl: venv
	$(BIN)/python -m pytest -q -m slow tests/test_check_sdxl.py

# The first GPU run in one command (bench/gpu_check.py; bench/RESULTS.md says how to start it on
# the GPU machine). Without CUDA it runs the same steps on the tiny model. The GPU machine has no
# .venv: there it is its own python3.
GPU_CHECK_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	$(GPU_CHECK_PYTHON) bench/gpu_check.py

# The wheels the GPU machine lacks, into .whl/ (carried with the device's `run`, carry=[".whl"]).
gpu-wheels: venv
	$(BIN)/python bench/gpu_wheels.py

demo: venv
	$(BIN)/animagine-lora demo

bench: venv
	$(BIN)/python bench/caption_speed.py
	$(BIN)/python bench/prep_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
