#!/usr/bin/env bash
# One prepared GPU check: one IB-TPO iteration end to end of a Qwen3-architecture model with the
# real vocabulary (bench/check_model.py: random weights, so responses run to the length cap, the
# update's worst case) through the vLLM engine and a DeepSpeed update with the GPU configs'
# settings (configs/experiments/gpu_check.yaml). Prints peak GPU memory per GPU (sampled by
# nvidia-smi), stop reasons, the first mini-batch's rollout/trainer ratio, the time split, and
# writes them as JSON ($OUT/gpu_check.json, else bench/results/gpu_check.json).
#
# Usage (repository root):  bash bench/gpu_check.sh
#   GPU_CHECK_CPU=1: the same script on a machine without a GPU (the hf engine, a two-layer model
#   of the same vocabulary, short responses): what tests/test_gpu_check.py runs, so it cannot rot.
#   RESPONSE_TOKENS, PROMPTS, HIDDEN, LAYERS, NUM_GPUS override the sizes.
# Uses the Python in $PYTHON (default: .venv/bin/python if present, else python3). On a GPU where
# vllm is not importable it runs `pip install -e .[gpu]` first (needs the package index).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
out_dir=${OUT:-bench/results}
mkdir -p "$out_dir"
state=$(mktemp -d)
smi_pid=""
trap '[ -n "$smi_pid" ] && kill "$smi_pid" 2>/dev/null; rm -rf "$state"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME="$state/prefect"
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 MLFLOW_TRACKING_URI="sqlite:///$state/mlflow.db"

sets=()
if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
  device=cpu
  resp=${RESPONSE_TOKENS:-24}; prompts=${PROMPTS:-4}; hidden=${HIDDEN:-32}; layers=${LAYERS:-2}
  gpus=${NUM_GPUS:-1}
  sets+=(--set engine.name=hf --set engine.device=cpu --set engine.dtype=float32
         --set 'engine.options={}' --set algo.update.deepspeed_config=configs/deepspeed/zero0_cpu.yaml
         --set algo.score.entropy_estimator=token_entropy --set threads=1)
else
  device=cuda
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || {
    echo "gpu_check: no NVIDIA GPU visible (nvidia-smi failed); GPU_CHECK_CPU=1 runs it on CPU"
    exit 2; }
  resp=${RESPONSE_TOKENS:-8192}; prompts=${PROMPTS:-16}; hidden=${HIDDEN:-1024}; layers=${LAYERS:-8}
  gpus=${NUM_GPUS:-$(nvidia-smi --list-gpus | wc -l)}
  if ! "$PY" -c "import vllm, ibtpo_core" 2>/dev/null; then
    echo "gpu_check: installing the GPU extra (vllm) ..."
    "$PY" -m pip install --quiet -e ".[gpu]"
  fi
  # peak memory per GPU over the whole run, every 0.5 s (vLLM runs in a process of its own)
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 \
    > "$state/smi.csv" & smi_pid=$!
fi
"$PY" - <<'PY'
import torch, transformers, deepspeed
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), deepspeed {deepspeed.__version__}, "
      f"transformers {transformers.__version__}, "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
PY

t0=$(date +%s)
"$PY" bench/check_model.py "$state/model" --hidden "$hidden" --layers "$layers"
t_model=$(( $(date +%s) - t0 ))
t0=$(date +%s)
"$PY" -m ibtpo run configs/experiments/gpu_check.yaml \
  --set model.path="$state/model" --set output_dir="$state/run" --set stage_cache_dir="$state/stages" \
  --set rl.rollout.max_new_tokens="$resp" --set rl.rollout.prompts_per_iteration="$prompts" \
  --set algo.update.num_processes="$gpus" "${sets[@]}" > "$state/run.log" 2>&1 || {
    echo "gpu_check: the run failed; its log ends:"; tail -40 "$state/run.log"; exit 1; }
t_run=$(( $(date +%s) - t0 ))

"$PY" - "$state" "$out_dir" "$start" "$device" "$resp" "$t_model" "$t_run" <<'PY'
import collections, glob, json, os, sys, time
state, out_dir, start, device, resp, t_model, t_run = sys.argv[1:8]
run = f"{state}/run"
result = json.load(open(f"{run}/result.json"))
folder = os.path.realpath(f"{run}/iterations")
def manifest(kind):
    return json.load(open(glob.glob(f"{folder}/it0000-{kind}-*/manifest.json")[0]))["metrics"]
sample, update = manifest("sample"), manifest("policy")
trees = json.load(open(glob.glob(f"{folder}/it0000-sample-*/trees.json")[0]))
stops = collections.Counter()
lengths = []
for t in trees:
    nodes = t["nodes"]
    parents = {n.get("parent") for n in nodes}
    for i, n in enumerate(nodes):
        if i and i not in parents:  # a leaf: its path's length, and how it ended
            stops["eos" if n.get("final") else "length"] += 1
            depth, j = 0, i
            while j:
                depth += len(nodes[j]["tokens"]); j = nodes[j]["parent"]
            lengths.append(depth)
peak = {}
if os.path.exists(f"{state}/smi.csv"):
    for line in open(f"{state}/smi.csv"):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[1].isdigit():
            peak[parts[0]] = max(peak.get(parts[0], 0), int(parts[1]) / 1024)
out = {
    "device": device, "response_tokens_cap": int(resp),
    "peak_gpu_memory_gb": {f"gpu{k}": round(v, 2) for k, v in sorted(peak.items())} or None,
    "stop_reasons": dict(stops), "mean_response_tokens": sum(lengths) / max(1, len(lengths)),
    "first_mini_batch": {k: update.get(f"mismatch/{k}") for k in
                         ("ratio_mean", "ratio_max", "clipfrac", "is_weight_mean",
                          "is_capped_frac")},
    "time_s": {"create_model": int(t_model), "run": int(t_run),
               "sample_trees": sample.get("timing_s/sample_trees"),
               "update_policy": update.get("timing_s/update_policy"),
               "total": round(time.time() - float(start), 1)},
    "decoded_tokens": sample.get("tree/decoded_tokens"),
    "decoded_tokens_per_s": sample["tree/decoded_tokens"] / sample["timing_s/sample_trees"],
    "update_tokens": update.get("num_tokens"), "world_size": update.get("world_size"),
    "accuracy_after": result["accuracy_after"],
}
path = os.path.join(out_dir, "gpu_check.json")
json.dump(out, open(path, "w"), indent=1)
print("| what | value |\n|---|---|")
for k, v in out.items():
    print(f"| {k} | {v} |")
print(f"written: {path}")
PY
