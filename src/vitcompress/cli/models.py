"""`vitcompress models` and `vitcompress info`."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from vitcompress.cli._app import app
from vitcompress.cli._common import (
    CheckpointOpt,
    ModelArg,
    NumClassesOpt,
    RandomInitOpt,
    handle_errors,
    model_or_demo,
    out,
)
from vitcompress.hub import ALIASES, DEMO_DIR  # the alias table imports neither torch nor timm


@app.command("models")
@handle_errors
def models_command() -> None:
    """List the model aliases and the built-in demo model. Any timm ViT name works too."""
    table = Table(title="Models (any timm ViT name, hf-hub:ORG/NAME and local-dir:PATH work too)")
    table.add_column("name")
    table.add_column("resolves to")
    card = json.loads((DEMO_DIR / "card.json").read_text()) if (DEMO_DIR / "card.json").is_file() else {}
    demo_note = f"built-in, offline: {card.get('dataset', 'digits')}; test top-1 {card.get('test_top1', '?')}"
    table.add_row("demo", demo_note)
    for alias, name in ALIASES.items():
        table.add_row(alias, name)
    out.print(table)


@app.command("info")
@handle_errors
def info_command(
    model: ModelArg = None,
    checkpoint: CheckpointOpt = None,
    random_init: RandomInitOpt = False,
    num_classes: NumClassesOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show a model's geometry: parameters, tokens, prefix tokens, blocks, heads, data config."""
    from vitcompress.models import load_model, model_info

    name = model_or_demo(model)
    net, spec = load_model(name, checkpoint=checkpoint, random_init=random_init, num_classes=num_classes)
    info = model_info(net)
    if as_json:
        out.print_json(json.dumps({"model": name, "weights": spec.weights, **info.to_dict()}))
        return
    table = Table(title=f"{name}  ({spec.architecture}, weights: {spec.weights})", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("parameters", f"{info.params:,}"),
        ("blocks", str(info.depth)),
        ("heads", str(info.num_heads)),
        ("embed dim", str(info.embed_dim)),
        ("MLP hidden", str(info.mlp_hidden)),
        ("patch grid", f"{info.grid[0]} x {info.grid[1]}"),
        ("tokens", f"{info.num_tokens} ({info.num_prefix_tokens} prefix + {info.grid[0] * info.grid[1]} patch)"),
        ("prefix tokens", _prefix_description(info)),
        ("layer scale", "yes" if info.layer_scale else "no"),
        ("global pool", info.global_pool),
        ("classes", str(info.num_classes)),
        ("data config", json.dumps(info.data_config)),
    ]
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


def _prefix_description(info) -> str:  # type: ignore[no-untyped-def]
    parts = []
    if info.has_class_token:
        parts.append("class")
    if info.distilled:
        parts.append("distillation")
    if info.num_reg_tokens:
        parts.append(f"{info.num_reg_tokens} register")
    return f"{info.num_prefix_tokens} ({', '.join(parts) or 'none'})"
