# Two commands for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 3000
# The model store lives in the checkout unless the user points BENTOML_HOME elsewhere.
export BENTOML_HOME ?= $(CURDIR)/bentoml_home

.PHONY: install serve port test models clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Train the small default models if the store lacks them (progress bars on stderr).
models: install
	$(PY) -m training.ensure_defaults

serve: port models
	$(VENV)/bin/bentoml serve service.app:Generation --host 127.0.0.1 --port $(PORT)

# Checked before the models train: the server took PORT=70000 as 4464 (70000 mod 65536).
# (In order under -j too: nothing here gains from running side by side.)
.NOTPARALLEL:
port:
	@case "$(PORT)" in ''|*[!0-9]*) false;; esac && [ "$(PORT)" -ge 1 ] && [ "$(PORT)" -le 65535 ] \
		|| { echo "PORT='$(PORT)': must be a port number, 1 to 65535" >&2; exit 2; }

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) bentoml_home runs

# Against a server that is already running (`make serve` in another terminal); HOST overrides.
HOST ?= http://127.0.0.1:$(PORT)
.PHONY: loadtest fuzz soak

loadtest: install  ## headless locust, CSV + HTML under load_tests/reports/, non-zero past the thresholds
	$(PY) -m load_tests.run --host $(HOST) --users 16 --spawn-rate 16 --run-time 60s \
		--max-failure-ratio 0.01 --max-p95-ms 2000 --out load_tests/reports/run

fuzz: install  ## schemathesis, 2,000 generated requests against /openapi.json
	$(PY) -m load_tests.fuzz --host $(HOST) --cases 2000

soak: install  ## 30 minutes of steady load, PSS growth of the server's process tree
	$(PY) -m load_tests.soak --host $(HOST) --minutes 30
