# Two commands on a fresh machine:  `make demo` (set up + run the quickstart)  and  `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build available on this platform; a newer range would pull CUDA wheels.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
# learn2learn (optional extra; the tests and benchmarks use it as a reference). Its only release, 0.2.0, ships
# Cython-generated C that no longer compiles on Python 3.11, so it is built from its sdist after regenerating
# that C with current Cython, without its pinned dependencies. torchvision must be the release paired with TORCH.
# Only learn2learn's sdist is fetched as source, its metadata prepared with the Cython wheel installed first:
# `--no-binary :all:` built Cython from source too (this step: 16 minutes on a loaded 2-core machine, now 1.3).
TORCHVISION ?= torchvision==0.28.0
L2L_VERSION := 0.2.0
L2L_BUILD := $(VENV)/build/learn2learn
L2L_STAMP := $(VENV)/.learn2learn
# the benchmarks' own references (pyproject's `bench` extra: transformers, for bench_transformer's GPT-2)
BENCH_STAMP := $(VENV)/.bench
DOCS_STAMP := $(VENV)/.docs

.PHONY: setup learn2learn demo test test-all bench docs gpu-check clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

$(L2L_STAMP): $(STAMP)
	$(BIN)/pip install --quiet "$(TORCHVISION)" "gym>=0.26" "cython>=3"
	rm -rf $(L2L_BUILD) && mkdir -p $(L2L_BUILD)
	$(BIN)/pip download --quiet --no-deps --no-binary learn2learn --no-build-isolation "learn2learn==$(L2L_VERSION)" \
		-d $(L2L_BUILD)
	tar -xzf $(L2L_BUILD)/learn2learn-$(L2L_VERSION).tar.gz -C $(L2L_BUILD)
	$(BIN)/cython -3 --force $(L2L_BUILD)/learn2learn-$(L2L_VERSION)/learn2learn/data/*.pyx
	rm -rf $(L2L_BUILD)/learn2learn-$(L2L_VERSION)/.eggs
	$(BIN)/pip install --quiet --no-build-isolation --no-deps $(L2L_BUILD)/learn2learn-$(L2L_VERSION)
	touch $@

learn2learn: $(L2L_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	touch $@

demo: $(STAMP)
	$(BIN)/metaopt run quickstart $(ARGS)

test: $(L2L_STAMP)
	$(BIN)/python -m pytest $(ARGS)

test-all: $(L2L_STAMP)
	$(BIN)/python -m pytest -m "slow or not slow" $(ARGS)

bench: $(L2L_STAMP) $(BENCH_STAMP)
	$(BIN)/metaopt bench $(ARGS)

# The documentation site (docs/, mkdocs.yml; the API pages from the docstrings) into site/. --strict fails on a dead
# link, an unknown anchor or a page missing from the navigation.
$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[docs]"
	touch $@

docs: $(DOCS_STAMP)
	$(BIN)/mkdocs build --strict

# On a machine with CUDA (the venv's torch must be a CUDA build there): every recipe shrunk in fp32 and bf16, the
# benchmarks on the GPU, a 2-process NCCL run when 2 GPUs exist; under 8 minutes, one JSON in benchmarks/results/.
gpu-check: $(STAMP)
	$(BIN)/python -m benchmarks gpu $(ARGS)

clean:
	rm -rf $(VENV) runs wandb site .pytest_cache *.egg-info
