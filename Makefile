# effx: the two README commands and their parts. Everything installs into the current Python.
PYTHON ?= python3
BUILD_CPP ?= build/cpp

.PHONY: demo test setup install pytest ctest bench wheel

demo: install
	$(PYTHON) -m effx demo

test: install pytest ctest

# torch only if missing: on this project's CPU machines `torch==2.13.0` comes from a local wheel;
# a machine with a CUDA torch keeps it.
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -q "scikit-build-core>=0.10" ninja "cmake>=3.24" numpy "pytest>=7" "hypothesis>=6" \
		"scipy>=1.9" safetensors tokenizers tqdm "transformers==5.24.0" matplotlib

install: setup
	$(PYTHON) -m pip install -q --no-build-isolation .

pytest:
	$(PYTHON) -m pytest -q tests/python

ctest:
	cmake -S . -B $(BUILD_CPP) -G Ninja -DEFFX_BUILD_TESTS=ON
	cmake --build $(BUILD_CPP)
	ctest --test-dir $(BUILD_CPP) --output-on-failure -LE bench

bench: install
	$(PYTHON) -m effx bench --json bench/results/latest.json

wheel: setup
	$(PYTHON) -m pip wheel --no-build-isolation --no-deps -w dist .
