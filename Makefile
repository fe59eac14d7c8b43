# Two set-up commands, each builds the virtual environment it needs:
#   make demo   prep the sample dataset, train the tiny model on CPU, export the LoRA
#   make test   the test suite (CPU only; GPU tests skip)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test test-fast bench clean

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

test: venv
	$(PYTEST) tests

# Everything but the tiny training runs and the slowest model tests: a minute or two while editing.
test-fast: venv
	$(PYTEST) -m "not training" tests

demo: venv
	$(BIN)/animagine-lora demo

bench: venv
	$(BIN)/python bench/caption_speed.py
	$(BIN)/python bench/prep_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
