# The two commands a user types on a fresh clone: `make demo` and `make test`.
# The Python the venv is made from; by default the first recent enough one
# (launch/python.sh, which has uv install one where the machine has none).
PYTHON ?=
VENV ?= .venv
WORKDIR ?= runs/demo
CONFIG ?= configs/digits.py
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all lint format bench constraints clean

venv: $(STAMP)

# Re-installs when setup.py or the pinned versions change; `pip install -e`
# keeps the checkout importable. constraints.txt pins every package to the
# version the suite passed with.
$(STAMP): setup.py pyproject.toml constraints.txt
	python="$$(launch/python.sh $(PYTHON))" && "$$python" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,serve]' -c constraints.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m coe_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

# `make test`: the fast suite, for every change. `make test-all`: also the
# end-to-end tests marked `slow`; CI runs it. --durations: the slowest tests,
# so a slow one shows in every log.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --durations=20
test: $(STAMP)
	$(PYTEST) -m "not slow" tests

test-all: $(STAMP)
	$(PYTEST) tests

# Settings in pyproject.toml. ruff: pyflakes, pycodestyle, sorted imports;
# yapf: the layout, shown as a diff here and applied by `make format`.
SOURCES := coe_jax tests benchmarks configs
lint: $(STAMP)
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/yapf --diff --recursive --parallel $(SOURCES)

format: $(STAMP)
	$(VENV)/bin/yapf --in-place --recursive --parallel $(SOURCES)
	$(VENV)/bin/ruff check --fix --quiet $(SOURCES)

bench: $(STAMP)
	$(PY) -m benchmarks.inference --config=$(CONFIG) --json=$(WORKDIR)/bench_inference.json

# The newest versions setup.py allows, frozen into constraints.txt (and the GPU
# extra's CUDA wheels into constraints-cuda.txt): run `make test` on them
# before committing the files.
constraints:
	rm -rf .venv-latest
	python="$$(launch/python.sh $(PYTHON))" && "$$python" -m venv .venv-latest
	.venv-latest/bin/pip install --quiet -e '.[test,serve]'
	(head -2 constraints.txt; .venv-latest/bin/pip freeze --exclude-editable) > constraints.new
	mv constraints.new constraints.txt
	# The GPU extra's CUDA wheels at the new jax, resolved without downloading them.
	.venv-latest/bin/pip install --dry-run --ignore-installed --quiet --report .cuda-report.json \
	    "jax[cuda12]==$$(.venv-latest/bin/python -c 'import jax; print(jax.__version__)')" \
	    -c constraints.txt
	.venv-latest/bin/python launch/cuda_constraints.py .cuda-report.json constraints.txt \
	    > constraints-cuda.txt
	rm -rf .venv-latest .cuda-report.json

clean:
	rm -rf $(VENV) runs
