# The two commands a fresh machine needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements/ci.txt setup.py | cksum | cut -d' ' -f1)
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-all chaos install lint bench clean

$(STAMP): requirements/ci.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	# one pip command, torch pinned in it: takes the CPU torch on disk instead of a CUDA build
	$(PY) -m pip install -q -r requirements/ci.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	PYTHON=$(PY) bash launch/demo.sh

# the fast suite; `make test-all` adds the heavy groups (pytest marker `heavy`)
test: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m "not heavy" tests

# the fault battery: damaged checkpoints, full disks, signals, overflowing gradients, bad data
chaos: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m chaos tests

test-all: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

lint:
	bash -n launch/*.sh slurm/*.sbatch
	command -v shellcheck >/dev/null && shellcheck launch/*.sh slurm/*.sbatch || echo "shellcheck not installed: skipped"

bench: $(STAMP)
	$(PY) -m kernels.bench

clean:
	rm -rf $(VENV) runs *.egg-info
