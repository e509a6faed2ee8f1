"""Errors a user can fix. The CLI prints their message on one line and exits with code 2."""

from __future__ import annotations


class VitcompressError(Exception):
    """Base class: the message says what was wrong and how to fix it."""


class ModelLoadError(VitcompressError):
    """A model name, checkpoint or hub download could not be resolved."""


class UnsupportedModelError(VitcompressError):
    """The model is not a timm VisionTransformer this toolkit can compress."""


class DataError(VitcompressError):
    """A dataset could not be found, read or interpreted."""


class CheckpointFormatError(VitcompressError):
    """A file is not a vitcompress checkpoint, is truncated, or is too new."""
