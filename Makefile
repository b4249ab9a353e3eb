# The two commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv on first use and install everything the project needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.curvlib-installed
# torch is pinned so that pip installs the CPU build here instead of multi-GB CUDA wheels;
# override with `make TORCH_SPEC=torch ...` on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
# The independent oracles declare torchvision, which has no CPU build for our torch:
# install them without dependencies, plus what they really import.
ORACLES := backpack-for-pytorch curvlinops-for-pytorch linear_operator nngeometry asdfghjkl
ORACLE_NEEDS := einops unfoldNd einconv opt-einsum jaxtyping wadler-lindig

.PHONY: demo test lint bench docs clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,plot,demo,docs]"
	$(PY) -m pip install -q $(ORACLE_NEEDS)
	$(PY) -m pip install -q --no-deps $(ORACLES)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m curvlib demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 tests

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) benchmarks/partitioned.py
	$(PY) benchmarks/kron.py

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) site
