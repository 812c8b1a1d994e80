# Two entry points, each self-contained on a fresh machine with Python 3.11:
#   make demo   set up .venv and run the main job (featup precompute) on shards of sample photos, offline
#   make test   set up .venv and run the whole test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-out

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch and torchvision are pinned in pyproject.toml; pip takes them from the machine's local wheels when present.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[pipeline,test,demo]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/featup demo --out $(DEMO_OUT)

test: $(VENV)/.installed
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/python bench/bench_jbu.py
	$(BIN)/python bench/bench_jbu_memory.py
	$(BIN)/python bench/bench_precompute.py
	$(BIN)/python bench/bench_reader.py
	$(BIN)/python bench/bench_training.py
	$(BIN)/python bench/bench_quality.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
