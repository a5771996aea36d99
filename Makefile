# Set-up and entry points. `make test` and `make demo` work on a fresh machine.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
EXTRAS  ?= dev,data,hf,tb,eval
STAMP   := $(VENV)/.megapeer-installed

.PHONY: venv test demo clean check-cuda

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# CPU torch 2.13.0 where no torch is present (an unpinned torch pulls a CUDA build).
$(STAMP): $(VPY) setup.py
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	@touch $(STAMP)

venv: $(STAMP)

# Two test files at a time (pytest-xdist; a file's tests stay on one worker, which keeps
# its module fixtures). TEST_WORKERS=0 runs them one by one.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

demo: $(STAMP)
	$(VPY) -m megapeer.demo

# Compile-check the CUDA sources for sm_90a with nvcc (no GPU, no CUDA torch needed).
check-cuda: $(STAMP)
	$(VPY) tools/check_cuda_sources.py

clean:
	rm -rf $(VENV) build *.egg-info
