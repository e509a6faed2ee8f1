"""Every file and folder name vitcompress writes, and the one output-folder rule.

Stages find each other's files through these names only: ``analyze`` writes ``analysis.json`` in
``vitcompress-out/<model>/``, ``plan`` reads it from there, ``compress`` writes ``plan.json``, the
fine-tuning folder and ``model.safetensors`` beside it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

OUTPUT_ROOT = Path("vitcompress-out")
ANALYSIS_JSON = "analysis.json"
MEANS_FILE = "attention_means.safetensors"
PLOT_FILE = "analysis.png"
PLAN_JSON = "plan.json"
MODEL_FILE = "model.safetensors"
WORKDIR_NAME = "finetune"
RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.safetensors"


def model_slug(model_id: str) -> str:
    """A folder name for a model id: ``deit_small``, ``org_name`` (hf-hub), the folder's name
    (local-dir)."""
    name = model_id.strip()
    if name.startswith("local-dir:"):
        name = Path(name[len("local-dir:") :].rstrip("/")).name
    elif name.startswith("hf-hub:"):
        name = name[len("hf-hub:") :]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def output_dir_for(model_id: str, root: str | os.PathLike = OUTPUT_ROOT) -> Path:
    """``<root>/<model slug>``: where every stage writes for this model, so stages find each other."""
    return Path(root) / model_slug(model_id)


__all__ = [
    "ANALYSIS_JSON", "CHECKPOINT_FILE", "MEANS_FILE", "MODEL_FILE", "OUTPUT_ROOT", "PLAN_JSON", "PLOT_FILE",
    "RUN_FILE", "WORKDIR_NAME", "model_slug", "output_dir_for",
]  # fmt: skip
