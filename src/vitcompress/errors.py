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


class TrainingDivergedError(VitcompressError):
    """Fine-tuning met a NaN or infinite loss or gradient; the last good checkpoint is kept."""


class FolderInUseError(VitcompressError):
    """Another live vitcompress run holds the lock of the folder this run would write into."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT), with a message saying what was kept and how to continue.

    A ``KeyboardInterrupt`` so that everything that handles a Ctrl-C still does; the CLI prints
    the message on one line and exits with code 130."""
