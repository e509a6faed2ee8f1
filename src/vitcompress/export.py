"""The compressed model as one ``.safetensors`` file, ``load`` to rebuild it, and ONNX export.

The file holds the weights and, under the safetensors metadata key ``vitcompress``, one JSON object:
``format_version``, ``vitcompress_version``, ``model`` (the base model's ``ModelSpec``: timm
architecture and kwargs), ``data_config``, ``plan``, and what was measured (``teacher_top1``,
``student_top1``, ``speedup``, ...). ``load`` needs nothing else: it builds the stock timm model
with random weights, applies the plan with ``convert`` and loads the weights strictly. No network.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from vitcompress._io import atomic_path
from vitcompress._version import __version__
from vitcompress.errors import CheckpointFormatError, VitcompressError
from vitcompress.geometry import input_size as geometry_input_size

FORMAT_VERSION = 1
METADATA_KEY = "vitcompress"
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header: above it, not safetensors at all
# The header of a vitcompress file (tensor table + metadata) is kilobytes; a bigger one is refused
# before it is parsed, so that a hostile file cannot make us parse (or keep) megabytes of JSON.
METADATA_LIMIT = 8 * 1024 * 1024


def vitcompress_version() -> str:
    """The installed distribution's version, else (running from a source tree) ``_version.__version__``."""
    try:
        from importlib.metadata import version

        return version("vitcompress")
    except Exception:  # not installed
        return __version__


def state_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict safetensors can write: CPU, contiguous, and no two entries sharing memory
    (safetensors refuses shared storage; a shared entry is copied, which ``load_state_dict`` accepts)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in state.items():
        t = value.detach().cpu().contiguous()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ident in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[key] = t
    return out


def check_writable(path: str | os.PathLike, force: bool, what: str = "output") -> None:
    """Refuse to replace an existing file unless ``force``; call it before long work, too."""
    target = Path(path)
    if target.exists() and target.is_dir():
        raise VitcompressError(f"{what} {target} is a folder: give a file path")
    if target.exists() and not force:
        raise VitcompressError(f"{what} {target} already exists: pass --force to overwrite it, or choose another path")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the folders up to here will be created
    if not folder.is_dir():
        raise VitcompressError(f"{what} {target}: {folder} is a file, not a folder: choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise VitcompressError(f"{what} {target}: the folder {folder} is not writable: choose another path or fix its permissions")


def export(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, Any], force: bool = False) -> Path:
    """Write ``model``'s weights and ``metadata`` to ``path`` (atomically) and return the path.

    ``metadata`` must hold ``model`` (``ModelSpec.to_dict()``) and ``plan`` (``Plan.to_dict()``),
    which ``load`` needs; anything else JSON-serialisable is kept (top-1, speed-up, ...).
    ``format_version`` and ``vitcompress_version`` are added.
    """
    from safetensors.torch import save_file

    missing = [k for k in ("model", "plan") if k not in metadata]
    if missing:
        raise VitcompressError(f"export metadata lacks {', '.join(missing)}: the file could not be reloaded")
    check_writable(path, force)
    meta = {"format_version": FORMAT_VERSION, "vitcompress_version": vitcompress_version(), **dict(metadata)}
    try:
        text = json.dumps(meta)
    except TypeError as exc:
        raise VitcompressError(f"export metadata is not JSON-serialisable ({exc})") from None
    with atomic_path(path) as tmp:
        save_file(state_tensors(model.state_dict()), str(tmp), metadata={METADATA_KEY: text})
    return Path(path)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The vitcompress metadata of an exported file, after checking that the file is whole.

    Raises CheckpointFormatError for a missing, foreign, truncated or newer-format file.
    """
    header = _read_header(Path(path))
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        raise CheckpointFormatError(
            f"{path} is a safetensors file but not a vitcompress model (no '{METADATA_KEY}' metadata): "
            "export one with `vitcompress compress`"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointFormatError(f"{path}: its vitcompress metadata is not valid JSON; re-export the model") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int):
        raise CheckpointFormatError(f"{path}: its vitcompress metadata has no format version; re-export the model")
    if version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path} has format version {version}, newer than this vitcompress reads ({FORMAT_VERSION}; "
            f"written by vitcompress {meta.get('vitcompress_version', '?')}): upgrade vitcompress"
        )
    return meta


def _read_header(path: Path) -> dict[str, Any]:
    """Parse the safetensors header ourselves, so that each kind of bad file gets a clear message."""
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFormatError(f"{path} is not a safetensors file (only {size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > _HEADER_LIMIT:
            raise CheckpointFormatError(f"{path} is not a safetensors file (its first bytes are not a safetensors header)")
        if length > METADATA_LIMIT:
            raise CheckpointFormatError(
                f"{path}: its safetensors header is {length / 2**20:.1f} MB, more than the {METADATA_LIMIT / 2**20:.0f} MB "
                "a vitcompress model needs: refusing to parse it (export the model again with `vitcompress compress`)"
            )
        raw = f.read(length)
    if len(raw) < length:
        raise CheckpointFormatError(
            f"{path} is truncated ({size} bytes, its header alone needs {8 + length}): copy or export it again"
        )
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointFormatError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path} is not a safetensors file (its header is not a JSON object)")
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + length + end:
        raise CheckpointFormatError(
            f"{path} is truncated ({size} bytes, {8 + length + end} expected): copy or export it again"
        )
    return header


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a compressed model from a file written by ``export``, offline; eval mode.

    The returned module carries the file's metadata as ``model.vitcompress_metadata``.
    Raises CheckpointFormatError if the file is not ours, is truncated or too new.
    """
    from safetensors.torch import load_file

    from vitcompress.convert import convert
    from vitcompress.models import ModelSpec, build_model
    from vitcompress.plan_types import Plan

    meta = read_metadata(path)
    try:
        spec = ModelSpec.from_dict(meta["model"])
        plan = Plan.from_dict(meta["plan"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointFormatError(f"{path}: incomplete vitcompress metadata ({exc!r}); re-export the model") from None
    model = convert(build_model(spec), plan, inplace=True)
    try:
        state = load_file(str(path), device=str(device))
    except Exception as exc:
        raise CheckpointFormatError(f"{path}: the weights cannot be read ({exc}); copy or export it again") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointFormatError(f"{path}: the weights do not fit the described model ({first}); re-export it") from None
    model.to(device).eval()
    model.vitcompress_metadata = meta
    return model


# ---- ONNX ------------------------------------------------------------------------------------
def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_size: Optional[tuple[int, int, int]] = None,
    opset: int = 17,
    force: bool = False,
    check: bool = True,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Write ``model`` as an ONNX graph (input ``images`` [batch, C, H, W], output ``logits``,
    dynamic batch axis) and, when ``check`` and onnxruntime is installed, compare it with PyTorch
    on random inputs of batch 1 and 3.

    Returns ``{"path", "max_abs_diff" (None if not checked), "checked_batches"}``; raises
    VitcompressError if the graph's outputs differ from PyTorch's by more than ``tolerance``.
    """
    check_writable(path, force, "ONNX output")
    c, h, w = input_size or geometry_input_size(model)
    model = model.eval()
    example = torch.randn(2, c, h, w, device=_device_of(model))
    with atomic_path(path) as tmp:
        _torch_onnx_export(model, example, Path(tmp), opset)
    result: dict[str, Any] = {"path": str(path), "max_abs_diff": None, "checked_batches": []}
    if check:
        diff, batches = _check_onnx(model, Path(path), (c, h, w))
        result.update(max_abs_diff=diff, checked_batches=batches)
        if diff is not None and diff > tolerance:
            raise VitcompressError(
                f"the ONNX graph in {path} differs from PyTorch by {diff:.2e} (> {tolerance:g}): "
                "please report this with the model name"
            )
    return result


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _torch_onnx_export(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """The TorchScript-based exporter: quick and stable for these plain graphs (no dynamo needed)."""
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings say nothing actionable here
        try:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )
        except ImportError as exc:
            raise VitcompressError(f"ONNX export needs the onnx package ({exc}): pip install 'vitcompress[onnx]'") from None


def _check_onnx(model: nn.Module, path: Path, input_size: tuple[int, int, int]) -> tuple[Optional[float], list[int]]:
    try:
        import onnxruntime as ort
    except ImportError:
        return None, []
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    batches = [1, 3]
    for b in batches:
        x = torch.randn(b, *input_size, generator=g)
        with torch.no_grad():
            expected = model(x.to(_device_of(model))).float().cpu().numpy()
        got = session.run(["logits"], {"images": x.numpy()})[0]
        worst = max(worst, float(abs(got - expected).max()))
    return worst, batches


__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "check_writable",
    "export",
    "export_onnx",
    "load",
    "read_metadata",
    "state_tensors",
    "vitcompress_version",
]
