#!/usr/bin/env bash
# Same-seed AXPO runs under both rollout engines (issue #15): one SFT'ed tiny policy, then RL from
# it with rollout.engine=builtin and rollout.engine=vllm for each seed, single process, in the vLLM
# environment (.venv-vllm: both engines on the same transformers). Prints a per-run table of the
# RL diagnostics (means over the steps) and writes it to $OUT/summary.json.
#
#   bash benchmarks/engine_comparison.sh [OUT=/tmp/engine_cmp] [SEEDS="0 1"] [STEPS=4]
# Results and their reading: benchmarks/results/engine_comparison.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/engine_cmp}
SEEDS=${SEEDS:-"0 1"}
STEPS=${STEPS:-4}
. "${VLLM_VENV:-.venv-vllm}/bin/activate"
export OMP_NUM_THREADS=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false
COMMON=(--config configs/smoke.yaml trainer.tensorboard=false trainer.plots=false trainer.evaluate=false)

# The starting policy: copy pre-training + SFT on the tool demonstrations (smoke sizes, more SFT
# steps so that the policy calls tools at all), no RL.
if [ ! -f "$OUT/base/hf/config.json" ]; then
    python axpo/train.py "${COMMON[@]}" pretrain.steps=2 sft.steps=${SFT_STEPS:-30} rl.steps=0 --output-dir "$OUT/base"
fi
for seed in $SEEDS; do
    for engine in builtin vllm; do
        run="$OUT/rl_${engine}_s${seed}"
        [ -f "$run/metrics.jsonl" ] && grep -q "\"step\": $STEPS" "$run/metrics.jsonl" && continue
        rm -rf "$run"
        python axpo/train.py "${COMMON[@]}" trainer.init_from="$OUT/base/hf" trainer.seed=$seed \
            rl.steps=$STEPS rl.questions_per_step=8 rollout.engine=$engine rollout.vllm_kv_cache_gib=0.25 \
            --output-dir "$run"
    done
done

python - "$OUT" $SEEDS <<'EOF'
import json, math, sys
from pathlib import Path
from axpo.metrics import read_metrics
out, seeds = Path(sys.argv[1]), sys.argv[2:]
keys = ["accuracy", "tool_use_rate", "trigger_rate", "prefixes_selected", "extra_rollouts",
        "resample_success_rate", "branch_tool_use_rate", "cut_entropy", "entropy", "truncated_rate",
        "rollout_time", "step_time"]
table = {}
for seed in seeds:
    for engine in ("builtin", "vllm"):
        rl = [r for r in read_metrics(out / f"rl_{engine}_s{seed}") if r["stage"] == "rl"]
        row = {}
        for k in keys:
            v = [r[k] for r in rl if k in r and r[k] is not None and not (isinstance(r[k], float) and math.isnan(r[k]))]
            row[k] = sum(v) / len(v) if v else float("nan")
        row["steps"] = len(rl)
        table[f"{engine} seed {seed}"] = row
(out / "summary.json").write_text(json.dumps(table, indent=1))
print("| run | " + " | ".join(keys) + " |")
print("|---|" + "---|" * len(keys))
for name, row in table.items():
    print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
EOF
