# Quick start: `make demo` (set up + train/evaluate on the built-in synthetic dataset) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned here (local wheels on our machines); pyproject.toml keeps loose ranges for real users.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test,onnx,dali,int8,serve
STAMP := $(VENV)/.installed

.PHONY: install lint typecheck test demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]' $(TORCH_PINS)
	touch $@

install: $(STAMP)

lint: install
	$(PY) -m ruff check .

typecheck: install
	$(PY) -m mypy

# .ci/run calls this: lint and type check first (seconds), then the suite.
test: lint typecheck
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) -m ssd300 demo --out runs/demo --overwrite

bench: install
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .mypy_cache
