# Two entry points, each self-contained on a fresh machine with Python 3.11:
#   make demo   set up .venv and run the main job (featup precompute) on shards of sample photos, offline
#   make test   set up .venv and run the whole test suite
#   make docs   build the documentation site (mkdocs, into site/); make docs-serve serves it on localhost:8000
# Both install the one resolved set in constraints.txt; `make lock` regenerates it after a change to pyproject.toml.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-out
CONSTRAINTS := constraints.txt
LOCK_TOOLS := $(VENV)/lock-tools
PIP_TOOLS := pip-tools==7.6.2
LOCK_OPTS := --all-extras --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links --output-file=$(CONSTRAINTS)

.PHONY: demo test coverage bench docs docs-serve lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Every dependency at its version in constraints.txt: one candidate each, nothing for pip to backtrack through.
# torch and torchvision are pinned there (and in pyproject.toml); pip takes them from the machine's local wheels when present.
# Then every module is byte-compiled once, on all cores (pip's own --compile does the ~19k files one at a time: install
# 3.6 instead of 2.2 min here). Python writes no .pyc at import where PYTHONDONTWRITEBYTECODE is set, as on this machine
# kind: without these, every process (each Ray actor, each CLI run) compiled torch's sources again, 14 s to
# import the stack instead of 6. Files only a newer Python parses (torch ships py312-only tests) are skipped quietly.
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-compile -c $(CONSTRAINTS) -e '.[pipeline,test,demo,docs]'
	$(BIN)/python -c "import compileall, sysconfig; \
	  [compileall.compile_dir(d, quiet=2, workers=0) for d in (sysconfig.get_path('purelib'), 'featup', 'pipeline', 'jobs')]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/featup demo --out $(DEMO_OUT)

test: $(VENV)/.installed
	$(BIN)/python -m pytest

# Line coverage of featup/, pipeline/ and jobs/, CLI subprocesses and Ray workers included (pyproject's [tool.coverage]):
# a summary on screen and an HTML report in coverage-html/.
coverage: $(VENV)/.installed
	rm -rf .coverage .coverage.* coverage-html
	$(BIN)/python -m pytest --cov --cov-report=term:skip-covered --cov-report=html:coverage-html

# --strict: a broken link, a missing page or an API reference that does not resolve fails the build (the test suite runs it too).
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

bench: $(VENV)/.installed
	$(BIN)/python bench/bench_jbu.py
	$(BIN)/python bench/bench_jbu_memory.py
	$(BIN)/python bench/bench_precompute.py
	$(BIN)/python bench/bench_reader.py
	$(BIN)/python bench/bench_training.py
	$(BIN)/python bench/bench_quality.py

# Resolve every extra of pyproject.toml into constraints.txt, for Linux x86-64 and Python 3.11 (run it on such a machine:
# pip-compile resolves for the interpreter it runs on), through this machine's pip configuration (PyPI plus the local
# indexes and wheels, so torch stays the local build). Existing pins are kept where still allowed; LOCK_ARGS=--upgrade
# moves every pin to the newest allowed version, LOCK_ARGS='--upgrade-package NAME' one of them.
lock:
	test -x $(LOCK_TOOLS)/bin/pip-compile || ($(PYTHON) -m venv $(LOCK_TOOLS) && $(LOCK_TOOLS)/bin/python -m pip install --quiet $(PIP_TOOLS))
	CUSTOM_COMPILE_COMMAND='make lock  (= $(PIP_TOOLS): pip-compile $(LOCK_OPTS) pyproject.toml)' \
		$(LOCK_TOOLS)/bin/pip-compile --quiet $(LOCK_OPTS) $(LOCK_ARGS) pyproject.toml

clean:
	rm -rf $(VENV) $(DEMO_OUT) site .pytest_cache .coverage .coverage.* coverage-html
