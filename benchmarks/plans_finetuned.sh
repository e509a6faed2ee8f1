#!/usr/bin/env bash
# The "Plans at 2x and 2.5x on this machine" table of docs/RESULTS.md: eight plans of the CIFAR-10
# teacher, each fine-tuned for compress's default 1 epoch (two processes, one per core, ~20 min
# on a 2-core Intel VM), then timed in one interleaved bench run.
#   bash benchmarks/plans_finetuned.sh [OUT]        (default /tmp/plans-finetuned)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-/tmp/plans-finetuned}
planned="$here/results/planner-1000"  # the planner's own choices on that machine (vitcompress plan, 1 thread)
first=(--plan tome-every2-2x="$planned/intel-auto-2x.plan.json"
       --plan glad-b3='{"reductions":[{"before_block":3,"scales":[4,1]}]}'
       --plan tome-every2-2.5x="$planned/intel-auto-2.5x.plan.json"
       --plan glad-b2='{"reductions":[{"before_block":2,"scales":[4,1]}]}')
second=(--plan tome-every3-2x='{"merge_r":[21,0,0,21,0,0,11,0,0,6,0,0]}'
        --plan static01-glad-b3='{"static_layers":[0,1],"reductions":[{"before_block":3,"scales":[4,1]}]}'
        --plan glad-b2-b10='{"reductions":[{"before_block":2,"scales":[4,1]},{"before_block":10,"scales":[2,1]}]}'
        --plan tome-decreasing-amd2x='{"merge_r":[10,8,8,7,7,5,4,4,2,2,1,0]}')
python "$here/plans_finetuned.py" "${first[@]}" --out "$out" &
python "$here/plans_finetuned.py" "${second[@]}" --out "$out"
wait
python "$here/plans_finetuned.py" --time-only "${first[@]}" "${second[@]}" --out "$out"
