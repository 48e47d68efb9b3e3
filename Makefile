# The two commands of the README: `make demo` (main job on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv torch-env demo test
venv:
	@DLAX_VENV=$(VENV) scripts/setup_env.sh

# Python 3.11 + CPU torch + transformers, only for tests/torch_parity (run via subprocess).
torch-env:
	@scripts/torch_env.sh

demo: venv
	$(PY) -m dlax_training.demo

test: venv torch-env
	$(PY) -m pytest -n 2 -q $(PYTEST_ARGS)
