# The two commands of the README, and their helpers. `make test` is what CI runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# Extras installed into the development virtualenv: the CPU backend, onnxruntime, test tools.
EXTRAS ?= cpu,test

.PHONY: demo test venv goldens docs example clean

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
