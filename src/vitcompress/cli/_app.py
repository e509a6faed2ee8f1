"""The Typer application object that every command module registers on."""

import typer

app = typer.Typer(
    name="vitcompress",
    help=(
        "Make pretrained Vision Transformers faster (arXiv:2310.07664): static attention (DGSSA) in "
        "early layers, token aggregation (GLAD) in late layers.\n\n"
        "Pipeline: analyze -> plan -> compress (convert + fine-tune + export) -> bench. "
        "With no model named, commands use the built-in offline `demo` model."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
