# Two entry points, both from nothing: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pin the CPU build of torch when none is present: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,serve,hf]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/ray-eplb demo

bench: $(VENV)/.installed
	$(VENV)/bin/ray-eplb bench

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
