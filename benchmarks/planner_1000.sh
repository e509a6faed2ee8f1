#!/usr/bin/env bash
# The planner table of docs/RESULTS.md: compress the shared CIFAR-10 teacher for each run (plan,
# 1,000 fine-tuning steps, test top-1, timing at batch 32 with 1 thread) and keep its JSON report.
#   bash benchmarks/planner_1000.sh OUT "auto 2x" "dgssa-glad 2x" "old 2x benchmarks/results/planner-1000/old-planner-2x.plan.json"
# Each run is "METHOD BUDGET [PLAN]": METHOD is the planner's --method; with a PLAN file that plan is
# fine-tuned instead (METHOD is then just its name in the report file). The old planner's plans
# (commit 08701e0, `vitcompress plan --analysis A --threads 1`, analysis proxy) are kept in
# benchmarks/results/planner-1000/. About 22 minutes per run on one core. Reports: OUT/<METHOD>-<BUDGET>.json (+ .log).
# STEPS=default runs `compress`'s default fine-tune (1 epoch) instead of 1,000 steps.
set -euo pipefail
steps=${STEPS:-1000}
if [ "$steps" = default ]; then length=(); else length=(--steps "$steps"); fi
out=$1; shift
mkdir -p "$out"
for run in "$@"; do
  read -r method budget plan <<<"$run"
  name="$method-$budget"
  if [ -n "${plan:-}" ]; then choice=(--plan "$plan"); else choice=(--method "$method"); fi
  python benchmarks/finetune_cifar10.py --threads 1 "${choice[@]}" --budget "$budget" "${length[@]}" \
    --no-progress --out-root "$out/work-$name" >"$out/$name.json" 2>"$out/$name.log"
done
