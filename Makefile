# Bootstraps .venv on first use (pip upgraded first: the old resolver backtracks over boto3),
# then runs the pipeline or the tests from it.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test venv clean-outputs mutation

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/vift flow run --preset tiny

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

# Mutation testing of the verdict-critical modules ([tool.mutmut] in pyproject.toml); tens of
# minutes on 2 cores, so not part of `make test`. `mutmut results` / `mutmut browse` afterwards.
mutation: $(STAMP)
	$(BIN)/python -m pip install --quiet 'mutmut>=3.8,<4'
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2 || true
	$(BIN)/mutmut export-cicd-stats && cat mutants/mutmut-cicd-stats.json

clean-outputs:
	rm -rf data models reports fusion mlruns mlflow.db
