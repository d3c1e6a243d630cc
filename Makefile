# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-output

SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: setup browser demo test lint mutation pictures clean

setup: $(VENV)/.installed

# torch is pinned and installed first: this takes the CPU wheel on the build machines,
# where an unpinned torch would pull several GB of CUDA libraries.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# prepare -> train on 2 Ray Train workers (MLflow, registry) -> score with Ray Data ->
# serve on Ray Serve and classify over HTTP; see spam_gpt/demo.py.
demo: setup
	$(BIN)/python -m spam_gpt.demo --out $(DEMO_DIR)

# Debian's Chromium and ChromeDriver, for the test that drives the web page.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  $(SUDO) apt-get install -y -q chromium chromium-driver || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver)

test: setup browser
	$(BIN)/python -m pytest

# Not part of `make test` (slow): every listed architectural slip must fail the parity tests,
# then mutmut's mutants of the loader and the model (see pyproject.toml, [tool.mutmut]).
mutation: setup
	$(BIN)/python -m pip install --quiet -e '.[test,mutation]'
	$(BIN)/python scripts/check_slips.py
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results --all true

# The README's pictures from a demo run: plots and a screenshot of the web page.
pictures: demo browser
	$(BIN)/python scripts/readme_pictures.py --demo-output $(DEMO_DIR) --out docs

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache mutants
