# Two commands for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 3000
# The model store lives in the checkout unless the user points BENTOML_HOME elsewhere.
export BENTOML_HOME ?= $(CURDIR)/bentoml_home

.PHONY: install serve test models clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Train the small default models if the store lacks them (progress bars on stderr).
models: install
	$(PY) -m training.ensure_defaults

serve: models
	$(VENV)/bin/bentoml serve service.app:Generation --host 127.0.0.1 --port $(PORT)

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) bentoml_home runs
