# The two commands a user types on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/demo
CONFIG ?= configs/digits.py
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

# Re-installs when setup.py changes; `pip install -e` keeps the checkout importable.
$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,serve]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m coe_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

bench: $(STAMP)
	$(PY) -m benchmarks.inference --config=$(CONFIG) --json=$(WORKDIR)/bench_inference.json

clean:
	rm -rf $(VENV) runs
