#!/usr/bin/env bash
# Is the planner deterministic, and does its measured speed-up agree with `bench`?
#   bash benchmarks/plan_repeat.sh [OUT] [BUDGET ...]      (default: /tmp/plan-repeat 2x; ~11 min per budget on 2 cores)
# For each budget: `vitcompress plan` on the CIFAR-10 teacher (1 thread, batch 32, separate output
# folders) three times: run 1 with an empty timing cache (OUT/cache, emptied first), run 2 as a
# user's rerun (reusing run 1's stored timings), run 3 with --retime (every timing afresh: how much
# the plan depends on a fresh timing); whether runs 2 and 3 agree with run 1, then the first plan
# converted (no fine-tune) and timed by `vitcompress bench` (batch 32, 1 thread, 60 rounds: its
# default 10 read 4-8% low). Prints one summary line per budget.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
shared=$(cd "$here/../../shared" && pwd)
out=${1:-/tmp/plan-repeat}; shift || true
budgets=${*:-2x}
model="local-dir:$shared/models/cifar10-vit12-d96"
data="$shared/data/cifar10"
mkdir -p "$out"
export VITCOMPRESS_CACHE="$out/cache"
rm -rf "$VITCOMPRESS_CACHE"
for budget in $budgets; do
  dir="$out/$budget"
  mkdir -p "$dir"
  for k in 1 2 3; do
    retime=(); [ "$k" = 3 ] && retime=(--retime)
    vitcompress plan "$model" --budget "$budget" --data "$data" --threads 1 --out "$dir/run$k" "${retime[@]}" \
      > "$dir/plan$k.txt" 2> "$dir/plan$k.err"
  done
  vitcompress compress "$model" --plan "$dir/run1/plan.json" --data "$data" --no-finetune --no-speed --force \
    -o "$dir/model.safetensors" --threads 1 > /dev/null 2> "$dir/compress.err"
  vitcompress bench "$dir/model.safetensors" --batch-size 32 --threads 1 --repeats 60 --json > "$dir/bench.json" 2> "$dir/bench.err"
  python - "$dir" "$budget" <<'PY'
import json, sys
d, budget = sys.argv[1], sys.argv[2]
plans = [json.load(open(f"{d}/run{k}/plan.json")) for k in (1, 2, 3)]
key = lambda p: (p["static_layers"], p["reductions"], p["merge_r"])
bench = json.load(open(f"{d}/bench.json"))
b = next(r["speedup"] for r in bench["measurements"] if r["batch_size"] == 32 and r["model"] != bench["baseline"])
s1, s2, s3 = (p["measured"]["speedup"] for p in plans)
reused = plans[1]["measured"]["timings"]
print(f"{budget}: rerun gives the same plan: {key(plans[0]) == key(plans[1])} ({reused['reused']} timings reused, "
      f"{reused['measured']} measured); --retime gives the same plan: {key(plans[0]) == key(plans[2])}"
      + ("" if key(plans[0]) == key(plans[2]) else f" (merge_r {plans[2]['merge_r']} reductions {plans[2]['reductions']})")
      + f"; planner {s1:.2f}x / {s2:.2f}x / {s3:.2f}x, bench {b:.2f}x ({100 * (s1 / b - 1):+.1f}%); plan: {plans[0]['method']} "
      f"static {plans[0]['static_layers']} reductions {plans[0]['reductions']} merge_r {plans[0]['merge_r']}")
PY
done
