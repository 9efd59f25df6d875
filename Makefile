# make demo: set up, build, and run a quick `flashjit bench` on the GPU if there is one, else the CPU
#            (flashjit vs naive attention and PyTorch SDPA; tables, CSV, JSON and plots in build/demo).
# make test: set up, build, and run every test (ctest, then pytest).
PYTHON ?= python3
BUILD_DIR ?= build/cpp
JOBS ?= $(shell nproc)

.PHONY: all setup build-cpp install test test-cpp test-python demo format clean

all: build-cpp install

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

build-cpp:
	cmake -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=Release -DFLASHJIT_BUILD_TESTS=ON -DFLASHJIT_BUILD_PYTHON=OFF
	cmake --build $(BUILD_DIR) -j $(JOBS)

install:
	$(PYTHON) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps .

# ctest's CUDA compile tests need NVRTC: the wheel that setup installs.
NVRTC_ENV = FLASHJIT_NVRTC="$$($(PYTHON) $(CURDIR)/python/flashjit/_nvrtc.py)" FLASHJIT_REQUIRE_NVRTC=1

test: setup build-cpp install
	@status=0; \
	(cd $(BUILD_DIR) && $(NVRTC_ENV) ctest --output-on-failure -j $(JOBS)) || status=1; \
	$(PYTHON) -m pytest tests/python -q || status=1; \
	exit $$status

test-cpp: build-cpp
	cd $(BUILD_DIR) && FLASHJIT_NVRTC="$$($(PYTHON) $(CURDIR)/python/flashjit/_nvrtc.py)" ctest --output-on-failure -j $(JOBS)

test-python: install
	$(PYTHON) -m pytest tests/python -q

demo: setup install
	$(PYTHON) -m flashjit info
	$(PYTHON) -m flashjit bench --quick --out build/demo

format:
	clang-format -i $$(git ls-files '*.cpp' '*.hpp' '*.h')

clean:
	rm -rf build
