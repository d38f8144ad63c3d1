# The two commands a fresh machine needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements/ci.txt setup.py | cksum | cut -d' ' -f1)
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-unit test-all chaos test-slurm test-multinode install lint bench clean gpu-check

# One venv for every target, installed once (again only when the pins change), quietly: its log
# is $(VENV)/install.log, shown when the install fails.
$(STAMP): requirements/ci.txt setup.py
	@echo "make: installing the pinned environment into $(VENV) (about a minute)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@# one pip command, torch pinned in it: takes the CPU torch on disk instead of a CUDA build
	@{ $(PY) -m pip install -q -r requirements/ci.txt && \
	   $(PY) -m pip install -q --no-deps --no-build-isolation -e . ; } > $(VENV)/install.log 2>&1 || \
	  { tail -n 25 $(VENV)/install.log; echo "make: the install failed (log: $(VENV)/install.log); retry with: make install"; exit 1; }
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	@PYTHON=$(PY) bash launch/demo.sh

# the fast suite; `make test-all` adds the heavy groups (pytest marker `heavy`)
test: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m "not heavy and not slurm and not multinode" tests

# tests/unit alone: no ranks, no launchers (about a minute)
test-unit: $(STAMP)
	$(PY) -m pytest -q --durations=10 -m "not heavy and not slurm and not multinode" tests/unit

# the fault battery: damaged checkpoints, full disks, signals, overflowing gradients, bad data
chaos: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m chaos tests

# slurm/train.sbatch on a real one-node Slurm cluster, brought up and down around the tests
# (cluster.sh exits 3 when no cluster can run on this machine: then it says why and skips)
test-slurm: $(STAMP)
	@conf=$$(bash slurm/testing/cluster.sh up); up=$$?; \
	  if [ $$up -eq 3 ]; then echo "make test-slurm skipped (see above)"; exit 0; fi; \
	  if [ $$up -ne 0 ]; then exit $$up; fi; \
	  eval "$$conf"; $(PY) -m pytest -q --durations=15 -m slurm tests; \
	  rc=$$?; bash slurm/testing/cluster.sh down; exit $$rc

# two hosts on this machine (network namespaces, a two-node Slurm, sshd for the deepspeed launcher):
# multi-node sbatch, torchrun and deepspeed runs, requeue, node loss (root; cluster.sh says why not)
test-multinode: $(STAMP)
	@conf=$$(bash slurm/testing/cluster.sh up --nodes 2); up=$$?; \
	  if [ $$up -eq 3 ]; then echo "make test-multinode skipped (see above)"; exit 0; fi; \
	  if [ $$up -ne 0 ]; then exit $$up; fi; \
	  eval "$$conf"; $(PY) -m pytest -q --durations=15 -m multinode tests; \
	  rc=$$?; bash slurm/testing/cluster.sh down --nodes 2; exit $$rc

# everything a GPU measures, one report (gpu-check/report.md and .json; tests/gpu_check.py). On
# the GPU machine it runs with that machine's python3 (no venv: the wheels of
# ../shared/gpu/make-wheels.sh on PYTHONPATH); DRY_RUN=1: every part at tiny sizes on the CPU.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_OUT ?= gpu-check
gpu-check:
	$(GPU_PY) tests/gpu_check.py --out $(GPU_CHECK_OUT) $(if $(DRY_RUN),--dry-run) \
	  $(if $(BASELINE),--baseline $(BASELINE))

test-all: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m "not slurm and not multinode" tests

# ruff formats and lints the Python (settings in pyproject.toml); bash -n and shellcheck the scripts
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	bash -n launch/*.sh slurm/*.sbatch
	@if command -v shellcheck >/dev/null; then shellcheck launch/*.sh slurm/*.sbatch slurm/testing/*.sh .ci/run; \
	  else echo "shellcheck not installed: skipped"; fi

bench: $(STAMP)
	$(PY) -m kernels.bench

clean:
	rm -rf $(VENV) runs *.egg-info .cache
