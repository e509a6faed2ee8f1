"""vitcompress: make pretrained timm Vision Transformers faster (arXiv:2310.07664).

The pipeline as Python calls, one per stage:

    model, spec = vitcompress.load_model("deit_small")
    data = vitcompress.load_data("path/to/images", data_config=spec.data_config)
"""

from __future__ import annotations

__version__ = "0.1.0"

from vitcompress.data import ImageData, load_data, make_loader
from vitcompress.errors import VitcompressError
from vitcompress.models import ModelSpec, build_model, load_model, model_info

__all__ = [
    "__version__",
    "ImageData",
    "ModelSpec",
    "VitcompressError",
    "build_model",
    "load_data",
    "load_model",
    "make_loader",
    "model_info",
]
