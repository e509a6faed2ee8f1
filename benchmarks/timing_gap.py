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
from vitcompress.cost import model_geometry
from vitcompress.damage import DamageMeter
from vitcompress.data import load_train_val
from vitcompress.geometry import input_size
from vitcompress.models import load_model
from vitcompress.pipeline import calibration_images
from vitcompress.plan_types import Plan, Reduction
from vitcompress.timing import compare_speed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier import DATA, TEACHER  # noqa: E402



def main() -> None:
    torch.set_num_threads(1)
    teacher, spec = load_model(f"local-dir:{TEACHER}")
    teacher.eval()
    geom, size = model_geometry(teacher), input_size(teacher)

    def glad(*stages: tuple[int, tuple[int, ...]]) -> Plan:
        return Plan(reductions=[Reduction(b, list(s)) for b, s in stages], num_blocks=geom.depth,
                    num_prefix_tokens=geom.num_prefix_tokens, grid=geom.grid)

    plan = glad((3, (4, 1)))

    def show(tag: str) -> None:
        r = compare_speed(teacher, convert(teacher, plan).eval(), size, batch_size=32, threads=1, seconds=6.0)
        print(f"{tag}: {r.speedup:.3f}x ({r.speedup_q25:.2f}-{r.speedup_q75:.2f}) baseline {r.baseline_ms:.1f} ms "
              f"model {r.model_ms:.1f} ms", flush=True)

    trim = ctypes.CDLL("libc.so.6").malloc_trim
    show("fresh")
    show("fresh again")
    train, _ = load_train_val(str(DATA), spec.data_config)
    meter = DamageMeter(teacher, calibration_images(train, 256))
    for b in range(1, geom.depth):
        meter.whole(glad((b, (4, 1))))
        meter.whole(glad((b, (2, 1))))
    show(f"after {2 * (geom.depth - 1)} damage measurements")
    gc.collect()
    show("after gc.collect")
    trim(0)
    show("after malloc_trim(0)")
    del meter
    gc.collect()
    trim(0)
    show("meter deleted, trimmed")


if __name__ == "__main__":
    main()
