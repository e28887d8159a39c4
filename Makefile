# Two commands on a fresh machine:
#   make demo   create .venv and run the pipeline on the embedded default (dvc repro)
#   make test   create .venv if needed and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Keep Ray on loopback for local runs (see README, Troubleshooting).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
# glibc hands large freed blocks back to the OS and page-faults them in again on every
# forward pass; keeping them (blocks up to 4 GiB, up to 16 GiB of free heap top), in one
# arena for all threads, makes CPU inference faster (mambastyle.runtime.ALLOCATOR_ENV
# says why; the README has the figures).
export MALLOC_MMAP_THRESHOLD_ := 4294967296
export MALLOC_TRIM_THRESHOLD_ := 17179869184
export MALLOC_ARENA_MAX := 1
# Stage commands call `python`: the project's environment comes first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test test-fast venv bench lint deps constraints clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/dvc repro
	$(BIN)/mambastyle report

test: $(STAMP)
	$(BIN)/python -m pytest --durations=15

# Unit tests only (no Ray clusters, no stage runs): a minute or two.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" --durations=10

bench: $(STAMP)
	$(BIN)/python benchmarks/generator_forward.py
	$(BIN)/python benchmarks/selective_scan.py
	$(BIN)/python benchmarks/encoders.py
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/train_data.py
	$(BIN)/python benchmarks/invert.py
	$(BIN)/python benchmarks/edit.py
	$(BIN)/python benchmarks/fuser.py

lint: $(STAMP)
	$(BIN)/ruff check mambastyle pipelines tests benchmarks docs
	$(BIN)/ruff format --check mambastyle pipelines tests benchmarks docs
	$(BIN)/python -m mambastyle.codegraph --check

# Rewrites dvc.yaml's code deps from the import graph (after adding a module or an import).
deps: $(STAMP)
	$(BIN)/python -m mambastyle.codegraph

# Re-pin every package after a dependency change in pyproject.toml.
constraints: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^mambastyle'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
