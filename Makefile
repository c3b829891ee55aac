# The two commands of the README, and their helpers. `make test` is what CI runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# Extras installed into the development virtualenv: the CPU backend, onnxruntime, test tools.
EXTRAS ?= cpu,test

.PHONY: demo test test-avx2 venv goldens docs example clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

# Compile the shipped example model for the host and run it beside onnxruntime.
demo: venv
	$(PY) examples/quickstart.py

test: venv
	$(PY) -m pytest -q -n 2 tests

# The tests where the host ISA matters, run as an AVX2-only x86 host (Haswell, Zen 3) would:
# QC_HOST_ISA=avx2 masks AVX-512 and VNNI from host detection (codegen/cpu/host.py). On an
# AVX-512 machine this covers the path the other CI processor takes (.ci/run); under 2 minutes.
CPU_ISA_TESTS ?= tests/test_cpu_backend.py tests/test_cpu_ops.py tests/test_tuning.py \
                 tests/test_cpu_int8_fused.py tests/test_cpu_avx2.py \
                 tests/test_examples.py::test_quickstart
test-avx2: venv
	QC_HOST_ISA=avx2 $(PY) -m pytest -q -n 2 $(CPU_ISA_TESTS)

# Regenerate golden files and the generated docs pages (then review `git diff tests/golden docs`).
goldens: venv
	$(PY) -m pytest -q tests --update-goldens

# Regenerate docs/passes.md, ops.md and targets.md from the registries.
docs: venv
	$(PY) -m qcompiler.driver.reference_docs docs

# Rebuild the shipped example model from its script (deterministic).
example: venv
	$(PY) examples/make_example_model.py

clean:
	rm -rf $(VENV) build dist *.egg-info qc_out
