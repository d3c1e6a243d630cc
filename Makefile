# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-output
SPAM := You are a winner you have been specially selected to receive $$1000 cash or a $$2000 award.
HAM := Hey, just wanted to check if we're still on for dinner tonight? Let me know!

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

# torch is pinned and installed first: this takes the CPU wheel on the build machines,
# where an unpinned torch would pull several GB of CUDA libraries.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(BIN)/spam-gpt prepare --out $(DEMO_DIR)/data
	$(BIN)/spam-gpt train --preset tiny --data $(DEMO_DIR)/data --output $(DEMO_DIR)/tiny
	$(BIN)/spam-gpt classify --model $(DEMO_DIR)/tiny/model "$(SPAM)" "$(HAM)"

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
