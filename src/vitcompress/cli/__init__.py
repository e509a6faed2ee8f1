"""`vitcompress` command line. Thin: each command parses, calls a library function, prints."""

from __future__ import annotations

import importlib

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
    app()


__all__ = ["app", "main"]
