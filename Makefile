# dirsync developer tasks.  Every target sets itself up from nothing:
# the virtualenv in .venv is created on demand and `pip install -e '.[test]'`
# re-runs only when pyproject.toml is newer than the install stamp.

PYTHON     ?= python3
VENV       := .venv
VPY        := $(VENV)/bin/python
STAMP      := $(VENV)/.install-stamp
DIRSYNC    := $(VENV)/bin/dirsync
DEMO       := .demo
MASTER     := sample_dirs/master
PYTEST_ARGS ?=
BENCH_ARGS  ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

.PHONY: all venv demo test test-fast bench golden clean

all: test

venv: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Also re-install once dirsync/__init__.py appears/changes: an editable
# install made before the package existed maps no modules; and when a C
# source changes (the install compiles each in place: dirsync/*.c).
$(STAMP): pyproject.toml $(wildcard dirsync/__init__.py dirsync/*.c) | $(VPY)
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

demo: venv
	rm -rf $(DEMO)
	mkdir -p $(DEMO)
	cp -a sample_dirs/replica $(DEMO)/replica
	@# git cannot store empty directories; give the master one here
	mkdir -p $(MASTER)/data/cache
	@echo "== dirsync plan (stale replica) =="
	$(DIRSYNC) plan --init $(MASTER) $(DEMO)/replica
	@echo "== dirsync sync =="
	$(DIRSYNC) sync -v --init $(MASTER) $(DEMO)/replica
	@echo "== dirsync verify =="
	$(DIRSYNC) verify $(MASTER) $(DEMO)/replica
	@echo "demo done: $(MASTER) -> $(DEMO)/replica synced and verified"

test: venv
	$(VPY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: venv
	$(VPY) -m pytest -q -m "not ssh and not slow and not watch" $(PYTEST_ARGS)

golden: venv
	DIRSYNC_REGEN_GOLDEN=1 $(VPY) -m pytest -q tests/test_golden_plans.py
	git diff --stat tests/golden

bench: venv
	$(VPY) bench/run.py $(BENCH_ARGS)

bench-twoway: venv
	$(VPY) bench/twoway.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO) build dist *.egg-info .pytest_cache .hypothesis
	rm -rf $(MASTER)/data/cache $(MASTER)/.dirsync
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
