#!/usr/bin/env bash
# The fine-tune recipe, tuned once on validation data: one plan of the CIFAR-10 teacher (the
# planner's 2x choice, GLAD before blocks 3 and 11) fine-tuned for 781 steps (compress's default
# epoch on CIFAR-10) with one recipe change per row; choices on a 5,000-image validation slice held
# out of the training split, test top-1 reported only. Two processes, one per core (~80 min on 2 cores).
#   bash benchmarks/recipe_sweep.sh [OUT] [PLAN]   (default /tmp/recipe-sweep, the 2x floor plan)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-/tmp/recipe-sweep}
plan=${2:-$here/results/planner-1000/intel-floor-auto-2x.plan.json}
common=(--steps 781 --val-images 5000 --threads 1 --out "$out")
run() {  # run NAME [--set FIELD=VALUE ...]
  local name=$1; shift
  [ -f "$out/rows-$name.json" ] || python "$here/plans_finetuned.py" --plan "$name=$plan" "${common[@]}" "$@" 2> "$out/$name.err"
}
mkdir -p "$out"
( run base; run lr1e-4 --set lr=1e-4; run lr5e-4 --set lr=5e-4; run lr1e-3 --set lr=1e-3; run kd-only --set ce_weight=0
  run feat-last1 --set feat_weight=1 --set feat_at=last-block; run feat-last3 --set feat_weight=3 --set feat_at=last-block ) &
( run ce-only --set kd_weight=0; run kd-t1 --set kd_temperature=1; run feat1 --set feat_weight=1
  run module-lr10 --set module_lr_scale=10; run warmup0 --set warmup_steps=0; run epochs2 --steps 1562 ) &
wait
python - "$out" "$here" <<'PY'
import glob, json, sys
out, here = sys.argv[1], sys.argv[2]
sys.path.insert(0, here)
from frontier import DATA, TEACHER, load_setup
from vitcompress._io import write_text_atomic
from vitcompress.bench import evaluate_top1
rows = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/rows-*.json"))]
teacher, _, _, val, test = load_setup(f"local-dir:{TEACHER}", str(DATA), rows[0]["val_images"])
lines = ["| recipe | change | val top-1 free | val top-1 after | test top-1 after | minutes |", "|---|---|---|---|---|---|",
         f"| original (teacher) | - | {100 * evaluate_top1(teacher, val):.2f}% | - | {100 * evaluate_top1(teacher, test):.2f}% | - |"]
for r in sorted(rows, key=lambda r: -r["val_top1"]):
    change = ", ".join(f"{k}={v}" for k, v in r["recipe"].items()) or "compress's default"
    change += "" if r["steps"] == 781 else f", {r['steps']} steps"
    lines.append(f"| {r['plan']} | {change} | {100 * r['val_top1_free']:.2f}% | {100 * r['val_top1']:.2f}% | "
                 f"{100 * r['top1']:.2f}% | {r['seconds'] / 60:.1f} |")
write_text_atomic(f"{out}/recipe.md", "\n".join(lines) + "\n")
print("\n".join(lines))
PY
