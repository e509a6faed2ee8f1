"""Compress a timm ViT on a dataset with the Python API, one stage at a time.

This is what `vitcompress compress` does, spelled out. The whole thing is also one call:

    from vitcompress.pipeline import compress
    result = compress("deit_small", "2x", data="path/to/images", config=FinetuneConfig(epochs=1))

Run it on the offline demo (a few minutes on 2 CPU cores), or on your own model and images:

    python examples/compress_with_python_api.py
    python examples/compress_with_python_api.py --model local-dir:/path/to/timm-model \\
        --data /path/to/dataset --budget 2x --epochs 1 --out my-model.safetensors
"""

from __future__ import annotations

import argparse

import torch

from vitcompress.analyze import analyze
from vitcompress.bench import evaluate_top1
from vitcompress.convert import convert
from vitcompress.data import load_train_val
from vitcompress.export import export, load
from vitcompress.finetune import FinetuneConfig, finetune
from vitcompress.geometry import input_size
from vitcompress.models import load_model
from vitcompress.plan import make_plan
from vitcompress.timing import compare_speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="alias, timm name, hf-hub:ORG/NAME, local-dir:PATH or demo")
    parser.add_argument("--data", default="demo", help="image folder, parquet/arrow data, HF dataset id or demo")
    parser.add_argument("--budget", default="2x", help="target speed-up (2x) or cost share (50%%)")
    parser.add_argument("--epochs", type=float, default=3.0, help="fine-tuning epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default="compressed.safetensors")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # 1. The original model (the teacher) and its data: a training split and a held-out one.
    teacher, spec = load_model(args.model)
    train, val = load_train_val(args.data, spec.data_config)

    # 2. Which layers have input-independent attention (static candidates), and low-rank attention.
    analysis = analyze(teacher, train, samples=256, model_id=args.model, data_source=args.data)

    # 3. A plan meeting the budget: static-attention layers and token-aggregation stages.
    plan = make_plan(teacher, analysis, args.budget)
    print(f"plan: static attention in blocks {plan.static_layers}, "
          f"token aggregation {[(r.before_block, r.scales) for r in plan.reductions]}")

    # 4. Swap the modules in; static attention starts from the measured mean attention.
    student = convert(teacher, plan, analysis.attention_means)

    # 5. Distillation fine-tuning (label CE + logit KD + dynamic attention guidance).
    augment = "shift" if args.data == "demo" else "flip-shift"  # a mirrored digit is another digit
    config = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, augment=augment, workdir="compress-work")
    result = finetune(student, teacher, train, val, config)

    # 6. Measure, export to one file, and reload it with nothing else.
    teacher_top1 = evaluate_top1(teacher, val)
    speed = compare_speed(teacher, student.eval(), input_size(student)).to_dict()  # as `compress` measures it
    metadata = {"model": spec.to_dict(), "data_config": spec.data_config, "plan": plan.to_dict(),
                "teacher_top1": teacher_top1, "student_top1": result.val_top1, "speedup": speed}
    export(student, args.out, metadata, force=True)
    model = load(args.out)
    top1 = evaluate_top1(model, val)
    print(f"teacher top-1 {teacher_top1:.4f}, student top-1 {top1:.4f}, "
          f"speed-up {speed['speedup']:.2f}x ({speed['threads']} threads, batch {speed['batch_size']}); wrote {args.out}")


if __name__ == "__main__":
    main()
