"""`vitcompress` command line. Thin: each command parses, calls a library function, prints."""

from __future__ import annotations

import importlib

import typer
from rich.markup import escape

from vitcompress.cli._app import app

# Each module registers its commands on `app` when imported.
_COMMAND_MODULES = [
    "vitcompress.cli.models",
    "vitcompress.cli.plan",
    "vitcompress.cli.bench",
    "vitcompress.cli.analyze",
    "vitcompress.cli.compress",
]
for _name in _COMMAND_MODULES:
    importlib.import_module(_name)


def main() -> None:
    """Run the CLI. A usage error (bad option value, missing argument) is one ``error:`` line, exit 2."""
    import sys

    from vitcompress.cli._common import err, usage_error_line

    # Typer carries its own copy of click: its ClickException is the base of UsageError/BadParameter.
    click_exception = typer.BadParameter.__mro__[2]
    try:
        code = app(standalone_mode=False)
    except click_exception as exc:  # type: ignore[misc]
        if type(exc).__name__ == "NoArgsIsHelpError":  # `vitcompress` alone: the help, as before
            exc.show()
        else:
            err.print(f"[bold red]error:[/] {escape(usage_error_line(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("interrupted", highlight=False)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
