#!/usr/bin/env bash
# The pretrained-model lab (BENCHMARKS.md §P2): SmolLM2-135M-Instruct on two-step word problems.
#
#   bash benchmarks/pretrained_lab.sh OUT      # about 2.5 hours on 2 CPU cores
#
# 1. the problems (train, val, test, and one-step warmup records: benchmarks/word_problems.py);
# 2. a supervised warm start on the one-step warmup records, which teaches the answer format
#    (`#### N`) and the form of a worked line, not the two-step problems trained on afterwards;
# 3. the probe on the warmed model: can the privileged teacher help it here;
# 4. self-distillation, SFT and GRPO from the warmed model at equal samples (128: 8 steps of 16),
#    LoRA r=16, each at the learning rate it did best with on the validation records, 3 seeds;
# 5. GRPO again, its rate chosen over three validation seeds at the two rates step 4's one seed put
#    first (a method this noisy needs them; BENCHMARKS.md §P2 reports this run's GRPO row);
# 6. the controls: self-distillation shown another problem's reference (shuffled), or none
#    (noref), at self-distillation's chosen rate.
# The data, the warm start and the probe are reused when they exist.
set -euo pipefail
OUT=${1:?usage: bash benchmarks/pretrained_lab.sh OUT}
LR=${LR:-1e-3}  # the controls' rate: self-distillation's choice in step 4 (read it from $OUT/lab/table.md)
WARMUP_STEPS=${WARMUP_STEPS:-1}  # 1,1,1,2: a quarter of the warm start two-step, §P3's warm start (§P3 lists its own commands)
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
here=$(cd "$(dirname "$0")" && pwd)
[ -f "$OUT/data/test.jsonl" ] || python "$here/word_problems.py" --out "$OUT/data" --steps 2 --warmup-steps "$WARMUP_STEPS"
[ -d "$OUT/warm/model" ] || handrail train --model smollm2 --method sft --data "$OUT/data/warmup.jsonl" \
    --rollouts 400 --out "$OUT/warm" lr=3e-5 eval_n=0 checkpoint_every=0 threads=1
[ -f "$OUT/probe.json" ] || handrail probe --model "$OUT/warm/model" --data "$OUT/data/test.jsonl" --n 64 \
    --json --html "$OUT/probe.html" max_new_tokens=64 threads=1 > "$OUT/probe.json.part" \
    && mv "$OUT/probe.json.part" "$OUT/probe.json"
common=(--data "$OUT/data/train.jsonl" --rollouts 128 --seeds 3 eval_data="$OUT/data/test.jsonl" score=lenient
        eval_points=1 jobs=2)
handrail compare --model "$OUT/warm/model" --methods self-distill,sft,grpo --out "$OUT/lab" "${common[@]}" \
    val_data="$OUT/data/val.jsonl" sweep=lr=1e-4,3e-4,1e-3,3e-3 train=lora_r=16,max_new_tokens=64,eval_n=64
handrail compare --model "$OUT/warm/model" --methods grpo --out "$OUT/grpo" "${common[@]}" \
    val_data="$OUT/data/val.jsonl" sweep=lr=3e-4,1e-3 sweep_seeds=3 train=lora_r=16,max_new_tokens=64,eval_n=64
handrail compare --model "$OUT/warm/model" --methods self-distill --out "$OUT/controls" "${common[@]}" \
    scenarios=shuffled,noref train=lora_r=16,max_new_tokens=64,eval_n=64,lr=$LR
