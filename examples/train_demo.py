"""Train the built-in `demo` model: a small DeiT-style ViT on scikit-learn's digits (offline).

Writes timm's local format (config.json + model.safetensors) and a card.json into --out
(default: the package's assets/demo folder). Rerunning reproduces the shipped accuracy.

    python examples/train_demo.py --out src/vitcompress/assets/demo
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models import save_for_hf

from vitcompress.data import demo_split_indices, load_data

ARCH = "deit_tiny_patch16_224"
MODEL_ARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 8, "num_heads": 4, "num_classes": 10}
SIZE = 32


def pixels_config(mean: list[float], std: list[float]) -> dict:
    return {
        "input_size": [3, SIZE, SIZE],
        "interpolation": "bilinear",
        "mean": mean,
        "std": std,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


def tensors(split: str, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split through the model's own eval preprocessing, as one tensor."""
    data = load_data("demo", split=split, data_config=cfg)
    items = [data.dataset[i] for i in range(len(data))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def augment(x: torch.Tensor, background: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Random translation by up to `pad` pixels, filling with the (normalised) background."""
    b, c, h, w = x.shape
    canvas = background.view(1, c, 1, 1).expand(b, c, h + 2 * pad, w + 2 * pad).clone()
    canvas[:, :, pad : pad + h, pad : pad + w] = x
    dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    return canvas[:, :, dy : dy + h, dx : dx + w]


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "src/vitcompress/assets/demo"))
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    # Mean/std of the training pixels (grayscale digits, replicated to RGB).
    raw = tensors("train", pixels_config([0.0] * 3, [1.0] * 3))[0]
    mean, std = raw.mean().item(), raw.std().item()
    cfg = pixels_config([mean] * 3, [std] * 3)
    x_train, y_train = tensors("train", cfg)
    x_test, y_test = tensors("test", cfg)
    background = torch.full((3,), (0.0 - mean) / std)

    model = timm.create_model(ARCH, pretrained=False, **MODEL_ARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, 3 * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
    )
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            loss = F.cross_entropy(model(augment(x_train[idx], background)), y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        if (epoch + 1) % 5 == 0 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f} test top-1 {evaluate(model, x_test, y_test):.4f} ({time.time() - start:.0f}s)")

    top1 = evaluate(model, x_test, y_test)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.pretrained_cfg = {**model.pretrained_cfg, **cfg, "num_classes": 10, "tag": "vitcompress_demo"}
    save_for_hf(model, out, model_args=MODEL_ARGS, safe_serialization=True)
    card = {
        "name": "vitcompress-demo",
        "architecture": ARCH,
        "model_args": MODEL_ARGS,
        "params": sum(p.numel() for p in model.parameters()),
        "dataset": "scikit-learn digits (load_digits): 1,797 8x8 grayscale images, 10 classes, "
        f"fixed split seed {0}: {len(demo_split_indices()['train'])} train / {len(demo_split_indices()['test'])} test; "
        f"upscaled to {SIZE}x{SIZE} RGB",
        "test_top1": round(top1, 4),
        "test_images": len(x_test),
        "recipe": f"from scratch, {args.epochs} epochs, AdamW lr {args.lr} wd 0.05, batch {args.batch_size}, "
        "3 warm-up epochs then cosine, label smoothing 0.1, random translation +-2 px, "
        f"seed {args.seed}, {args.threads} CPU threads",
        "train_seconds": round(time.time() - start),
        "script": "examples/train_demo.py",
    }
    (out / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps(card, indent=1))


if __name__ == "__main__":
    main()
