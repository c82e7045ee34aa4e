# Shortcuts; the README gives the full commands.
PYTHON ?= python

.PHONY: install test bench gpu-check

install:
	$(PYTHON) -m pip install --no-build-isolation -e .

test:
	$(PYTHON) -m pytest tests -q

bench:
	$(PYTHON) benchmarks/compare.py

# On a GPU machine: build (CUDA kernels included), run the GPU tests, print the GPU table.
gpu-check:
	STCCL_FORCE_CUDA=1 $(PYTHON) -m pip install --no-build-isolation -e .
	$(PYTHON) -m pytest tests -q -m cuda
	$(PYTHON) benchmarks/compare.py --device cuda
