"""Does the planner's process time a plan slower than a fresh one? One plan, the one timer, six times.

    python benchmarks/timing_gap.py        # the CIFAR-10 teacher's GLAD-before-block-3 [4, 1] plan, ~3 min

Times the plan against the original (batch 32, 1 thread, 6 s each) in a fresh process, after the
damage measurements the planner makes (22 whole GLAD plans on 256 training images), after
``gc.collect()``, after glibc's ``malloc_trim(0)``, and with the meter deleted.
"""
import ctypes
import gc
import sys
from pathlib import Path

import torch

from vitcompress.convert import convert
from vitcompress.damage import DamageMeter
from vitcompress.data import load_train_val
from vitcompress.geometry import input_size
from vitcompress.models import load_model
from vitcompress.pipeline import calibration_images
from vitcompress.plan_types import Plan, Reduction
from vitcompress.timing import compare_speed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier import DATA, TEACHER  # noqa: E402

torch.set_num_threads(1)
teacher, spec = load_model(f"local-dir:{TEACHER}"); teacher.eval()
size = input_size(teacher)
def glad(*stages):
    return Plan(static_layers=[], reductions=[Reduction(b, list(s)) for b, s in stages], num_blocks=12, num_prefix_tokens=1, grid=(8, 8))
plan = glad((3, (4, 1)))
def show(tag):
    student = convert(teacher, plan).eval()
    r = compare_speed(teacher, student, size, batch_size=32, threads=1, seconds=6.0)
    print(f"{tag}: {r.speedup:.3f}x ({r.speedup_q25:.2f}-{r.speedup_q75:.2f}) baseline {r.baseline_ms:.1f} ms model {r.model_ms:.1f} ms", flush=True)
show("fresh")
show("fresh again")
train, _ = load_train_val(str(DATA), spec.data_config)
meter = DamageMeter(teacher, calibration_images(train, 256))
for b in range(1, 12):
    meter.whole(glad((b, (4, 1))))
    meter.whole(glad((b, (2, 1))))
show("after 22 damage measurements")
gc.collect()
show("after gc.collect")
ctypes.CDLL("libc.so.6").malloc_trim(0)
show("after malloc_trim(0)")
del meter; gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
show("meter deleted, trimmed")
