# The two commands of the README:
#   make demo  -- set everything up, then train a tiny LoRA in torch, validate it, load it into Keras
#   make test  -- set everything up, type-check (make typecheck), then run the whole test suite
# Both create the virtualenv at .venv (reused when present) with pinned versions (constraints.txt).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo typecheck test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, alone: the pinned 2.13.0 is the local CPU build (any other spec pulls CUDA wheels)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# the Flax backend is a separate distribution, installed the way a third-party plugin would be
	$(PY) -m pip install -q -c constraints.txt -e ./examples/adapterspec-flax
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) examples/demo_torch_to_keras.py

# mypy --strict over sdk/ and plugins/ (settings: [tool.mypy] in pyproject.toml); any error fails
typecheck: setup
	$(PY) -m mypy

# the suite on TEST_WORKERS processes (pytest-xdist; CI has 2 cores): TEST_WORKERS=0 runs it in this process
TEST_WORKERS ?= 2

test: setup typecheck
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist worksteal

bench: setup
	$(PY) benchmarks/bench_load.py --backends torch,keras --repeats 21

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache
