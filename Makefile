# ibtpo: `make run` and `make test` do all the set-up they need (a .venv in this folder).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Never reach a model or data hub: everything is created locally or shipped in a package.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# Prefect keeps its state in the checkout unless told otherwise; a loaded machine needs time.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db

.PHONY: install run test test-faults test-all bench bench-table lock clean

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ibtpo run configs/experiments/tiny_ibtpo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -m faults

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

# Speed benchmarks first, then the equal-budget comparison (about 32 min), whose JSON line ends the output.
bench: $(STAMP)
	$(BIN)/python bench/rollout.py --json bench/results/rollout.json
	$(BIN)/python bench/tree_score.py --json bench/results/tree_score.json
	$(BIN)/python bench/paper_table1.py --json bench/results/paper_table1_tiny.json

bench-table: $(STAMP)
	$(BIN)/python bench/paper_table1.py --json bench/results/paper_table1_tiny.json

lock: $(STAMP)
	@{ sed -n '1,3p' requirements.lock; $(BIN)/python -m pip freeze --exclude-editable \
	   | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf runs mlflow.db .prefect
