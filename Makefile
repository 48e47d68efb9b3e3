# The two commands of the README: `make demo` (main job on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv demo test
venv:
	@DLAX_VENV=$(VENV) scripts/setup_env.sh

demo: venv
	$(PY) -m dlax_training.demo

test: venv
	$(PY) -m pytest -n 2 -q $(PYTEST_ARGS)
