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

The names are imported on first use: `import vitcompress` itself loads neither torch nor timm.

Note: the stage functions share their module's name (``vitcompress.analyze`` is the function);
import helpers from the modules with ``from vitcompress.analyze import save_analysis``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from vitcompress._version import __version__
from vitcompress.errors import VitcompressError

# Public name -> (module, attribute). Imported on first use, so that `import vitcompress` (and the
# CLI's `--help` and `models`) does not import torch and timm.
_EXPORTS: dict[str, tuple[str, str]] = {
    "Analysis": ("vitcompress.analyze", "Analysis"),
    "AttentionRecorder": ("vitcompress.analyze", "AttentionRecorder"),
    "analyze": ("vitcompress.analyze", "analyze"),
    "load_analysis": ("vitcompress.analyze", "load_analysis"),
    "save_analysis": ("vitcompress.analyze", "save_analysis"),
    "bench": ("vitcompress.bench", "bench"),
    "evaluate_top1": ("vitcompress.bench", "evaluate_top1"),
    "convert": ("vitcompress.convert", "convert"),
    "ImageData": ("vitcompress.data", "ImageData"),
    "load_data": ("vitcompress.data", "load_data"),
    "load_train_val": ("vitcompress.data", "load_train_val"),
    "make_loader": ("vitcompress.data", "make_loader"),
    "export": ("vitcompress.export", "export"),
    "export_onnx": ("vitcompress.export", "export_onnx"),
    "load": ("vitcompress.export", "load"),
    "read_metadata": ("vitcompress.export", "read_metadata"),
    "FinetuneConfig": ("vitcompress.finetune", "FinetuneConfig"),
    "finetune": ("vitcompress.finetune", "finetune"),
    "count_flops": ("vitcompress.flops", "count_flops"),
    "ModelSpec": ("vitcompress.models", "ModelSpec"),
    "build_model": ("vitcompress.models", "build_model"),
    "load_model": ("vitcompress.models", "load_model"),
    "model_info": ("vitcompress.models", "model_info"),
    "DGSSA": ("vitcompress.modules", "DGSSA"),
    "GLAD": ("vitcompress.modules", "GLAD"),
    "compress": ("vitcompress.pipeline", "compress"),
    "continue_finetune": ("vitcompress.pipeline", "continue_finetune"),
    "Plan": ("vitcompress.plan_types", "Plan"),
    "Reduction": ("vitcompress.plan_types", "Reduction"),
    "load_plan": ("vitcompress.plan_types", "load_plan"),
    "parse_budget": ("vitcompress.plan_types", "parse_budget"),
    "save_plan": ("vitcompress.plan_types", "save_plan"),
    "plan": ("vitcompress.plan", "make_plan"),
    "compare_speed": ("vitcompress.timing", "compare_speed"),
}
# Stage functions named like their module: `vitcompress.analyze` stays the function even after the
# submodule `vitcompress.analyze` is imported (which would otherwise rebind the package attribute).
_STAGE_FUNCTIONS = frozenset({"analyze", "bench", "convert", "export", "finetune", "plan"})


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'vitcompress' has no attribute {name!r}")
    value = getattr(importlib.import_module(target[0]), target[1])
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _STAGE_FUNCTIONS and isinstance(value, types.ModuleType):
            return  # the import system binding the submodule: the name stays the stage function's
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # what the names above are, for type checkers and readers
    from vitcompress.analyze import Analysis, AttentionRecorder, analyze, load_analysis, save_analysis
    from vitcompress.bench import bench, evaluate_top1
    from vitcompress.convert import convert
    from vitcompress.data import ImageData, load_data, load_train_val, make_loader
    from vitcompress.export import export, export_onnx, load, read_metadata
    from vitcompress.finetune import FinetuneConfig, finetune
    from vitcompress.flops import count_flops
    from vitcompress.models import ModelSpec, build_model, load_model, model_info
    from vitcompress.modules import DGSSA, GLAD
    from vitcompress.pipeline import compress, continue_finetune
    from vitcompress.plan import make_plan as plan
    from vitcompress.plan_types import Plan, Reduction, load_plan, parse_budget, save_plan
    from vitcompress.timing import compare_speed

__all__ = ["__version__", "VitcompressError", *sorted(_EXPORTS)]
