"""The version of vitcompress, in a module that imports nothing (``export`` and the package read it)."""

__version__ = "0.1.0"
