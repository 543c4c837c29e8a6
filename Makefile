# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# glibc malloc on transparent huge pages: XLA:CPU's per-call buffers stop costing a page
# fault per 4 KiB (B0 forward 1.38x faster here; see gradcamo_jax/runtime.py). No-op off glibc.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: venv lint test test-fast demo benchmark clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, from the CPU wheel; the constraint keeps everything after on it.
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Two test processes (pytest-xdist), each file in one of them so its fixtures are built once.
# The suite is compile-bound and XLA:CPU compiles mostly on one thread, so two processes use both cores.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST) tests

test-fast: $(STAMP)
	$(PYTEST) -m 'not slow' tests

demo: $(STAMP)
	$(VENV)/bin/gradcamo demo --out demo_out

benchmark: $(STAMP)
	$(PY) -m experiments.benchmark --quick

clean:
	rm -rf $(VENV) .pytest_cache
