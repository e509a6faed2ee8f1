"""vitcompress: make pretrained timm Vision Transformers faster (arXiv:2310.07664).

The pipeline as Python calls, one per stage (the CLI is a thin layer over these):

    import vitcompress

    model, spec = vitcompress.load_model("deit_small")                 # models
    data = vitcompress.load_data("path/to/images", data_config=spec.data_config)
    analysis = vitcompress.analyze(model, data)                        # attention similarity / rank
    plan = vitcompress.plan(model, analysis, budget="2x")              # which layers, how many tokens
    student = vitcompress.convert(model, plan, analysis.attention_means)
    vitcompress.finetune(...)                                          # distillation from `model`
    vitcompress.export(student, "model.safetensors", metadata)         # one file, plan in metadata
    fast = vitcompress.load("model.safetensors")                       # offline rebuild
    vitcompress.bench({"original": model, "compressed": fast})         # speed / memory / FLOPs

`vitcompress.compress(...)` chains all of them, as `vitcompress compress` does.

Note: the stage functions share their module's name (``vitcompress.analyze`` is the function);
import helpers from the modules with ``from vitcompress.analyze import save_analysis``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from vitcompress.analyze import Analysis, AttentionRecorder, analyze, load_analysis, save_analysis
from vitcompress.bench import bench
from vitcompress.convert import convert
from vitcompress.data import ImageData, load_data, make_loader
from vitcompress.errors import VitcompressError
from vitcompress.export import export, export_onnx, load, read_metadata
from vitcompress.finetune import FinetuneConfig, finetune
from vitcompress.flops import count_flops
from vitcompress.models import ModelSpec, build_model, load_model, model_info
from vitcompress.modules import DGSSA, GLAD
from vitcompress.pipeline import compress, continue_finetune
from vitcompress.plan import Plan, Reduction, load_plan, parse_budget, save_plan
from vitcompress.plan import make_plan as plan

__all__ = [
    "__version__",
    "DGSSA",
    "GLAD",
    "Analysis",
    "AttentionRecorder",
    "FinetuneConfig",
    "ImageData",
    "ModelSpec",
    "Plan",
    "Reduction",
    "VitcompressError",
    "analyze",
    "bench",
    "build_model",
    "compress",
    "continue_finetune",
    "convert",
    "count_flops",
    "export",
    "export_onnx",
    "finetune",
    "load",
    "load_analysis",
    "load_data",
    "load_model",
    "load_plan",
    "make_loader",
    "model_info",
    "parse_budget",
    "plan",
    "read_metadata",
    "save_analysis",
    "save_plan",
]
