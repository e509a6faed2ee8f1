"""Resolve a model the way timm users name it, load its weights, and check it is supported.

Names: short aliases (``deit_small``), any timm ViT name (with an optional pretrained tag),
``hf-hub:ORG/NAME``, ``local-dir:PATH`` (timm's own local format: ``config.json`` +
``model.safetensors``) and ``demo`` (a small trained ViT shipped inside this package).
Pretrained weights come through timm's own mechanism (the Hugging Face hub cache); offline, the
error comes at once and says how to proceed.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from torch import nn

from vitcompress._io import read_json
from vitcompress.errors import ModelLoadError, UnsupportedModelError
from vitcompress.geometry import check_supported  # the one support check (re-exported here)
from vitcompress.hub import ALIASES, DEMO_DIR, DEMO_NAME, hub_mode, offline_reason

# timm modules whose models are VisionTransformer (or a subclass such as DeiT's distilled one).
_VIT_MODULES = {"vision_transformer", "deit"}
_CHECKPOINT_SUFFIXES = {".safetensors", ".pth", ".pt", ".bin", ".ckpt"}
_NESTED_KEYS = ("model", "state_dict", "model_state_dict", "module")


@dataclass
class ModelSpec:
    """Everything needed to rebuild the architecture offline (weights not included)."""

    model_id: str  # what the user named: "deit_small", "demo", "local-dir:/path", ...
    architecture: str  # the timm name to pass to timm.create_model
    model_args: dict[str, Any] = field(default_factory=dict)  # kwargs for timm.create_model
    data_config: dict[str, Any] = field(default_factory=dict)  # timm's resolved data config
    weights: str = "random"  # "pretrained", "checkpoint", or "random"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, JSON-safe

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        return cls(
            model_id=str(d["model_id"]),
            architecture=str(d["architecture"]),
            model_args=dict(d.get("model_args", {})),
            data_config=dict(d.get("data_config", {})),
            weights=str(d.get("weights", "random")),
        )


@dataclass
class ModelInfo:
    """What `vitcompress info` prints, and what later stages need to know about a ViT."""

    architecture: str
    params: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    num_prefix_tokens: int
    has_class_token: bool
    num_reg_tokens: int
    distilled: bool
    layer_scale: bool
    grid: tuple[int, int]
    num_tokens: int
    global_pool: str
    num_classes: int
    data_config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


# ---- names -----------------------------------------------------------------------------------
def resolve_name(name: str) -> str:
    """Map an alias or ``demo`` to what timm.create_model understands; other names pass through."""
    if name == DEMO_NAME:
        return f"local-dir:{DEMO_DIR}"
    return ALIASES.get(name, name)


def _check_timm_name(name: str) -> None:
    """Fail early, before any download, on unknown or non-ViT timm names."""
    if timm.is_model(name):
        arch = name.split(".", 1)[0]
        module = _model_module(arch).rsplit(".", 1)[-1]
        if module not in _VIT_MODULES:
            raise UnsupportedModelError(
                f"model '{name}' is not supported: it is a timm '{module}' model, "
                "and vitcompress compresses timm VisionTransformer models (DeiT, ViT, DeiT-III)"
            )
        return
    candidates = list(ALIASES) + timm.list_models(["*vit*", "*deit*"])
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelLoadError(
        f"unknown model '{name}': not an alias (see `vitcompress models`), a timm model name, "
        f"hf-hub:ORG/NAME, local-dir:PATH or 'demo'.{hint}"
    )


def _model_module(arch: str) -> str:
    from timm.models import _registry

    return _registry._model_to_module.get(arch, "")  # noqa: SLF001 - no public accessor in older timm


def _local_dir_config(path: str) -> dict[str, Any]:
    folder = Path(path).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"local-dir:{path}: no config.json there; expected timm's local format "
            "(config.json + model.safetensors, as written by timm.models.save_for_hf)"
        )
    config = read_json(config_file, "expected timm's local format (timm.models.save_for_hf)")
    if "architecture" not in config:
        raise ModelLoadError(f"local-dir:{path}: config.json has no 'architecture' entry")
    return config


def _architecture_and_args(timm_name: str, extra_args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The timm architecture name and kwargs that rebuild this model with no network."""
    if timm_name.startswith("local-dir:"):
        config = _local_dir_config(timm_name[len("local-dir:") :])
        args = dict(config.get("model_args", {}))
        for key in ("num_classes", "global_pool"):
            if key in config and key not in args:
                args[key] = config[key]
        return config["architecture"], {**args, **extra_args}
    if timm_name.startswith("hf-hub:"):
        from timm.models._hub import load_model_config_from_hf

        _, arch, args = _hub_call(timm_name, lambda: load_model_config_from_hf(timm_name[len("hf-hub:") :]))
        return arch, {**(args or {}), **extra_args}
    return timm_name, dict(extra_args)


def _hub_call(model_name: str, fn: Any) -> Any:
    """Run a hub download; offline or unreachable, fail at once with what to do instead."""
    with hub_mode() as online:
        try:
            return fn()
        except Exception as exc:  # huggingface_hub raises many types; we only reword them
            if online and not _is_missing_file(exc):
                raise ModelLoadError(f"could not download weights for '{model_name}': {exc}") from None
            why = offline_reason() if not online else "the weights were not found on the hub"
            raise ModelLoadError(
                f"cannot get pretrained weights for '{model_name}': {why}, and they are not in the "
                "local Hugging Face cache. Pass local weights with --checkpoint PATH, copy the model "
                "into the cache (HF_HOME) on a machine with network, or use --random-init for timing."
            ) from None


def _is_missing_file(exc: Exception) -> bool:
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    return isinstance(exc, (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, FileNotFoundError))


# ---- checkpoints -----------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read local weights: safetensors, or a weights-only torch file (never unpickles objects)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}: check the path given to --checkpoint")
    if path.suffix not in _CHECKPOINT_SUFFIXES:
        raise ModelLoadError(
            f"checkpoint {path}: unknown file type '{path.suffix}'; use .safetensors, .pth, .pt or .bin"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise ModelLoadError(f"checkpoint {path} is not a readable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelLoadError(
                f"checkpoint {path} could not be loaded weights-only ({type(exc).__name__}); "
                "it may hold pickled objects: re-save it as a plain state dict or as .safetensors"
            ) from None
    return _unwrap_state_dict(state, path)


def _unwrap_state_dict(state: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"model": {...}}, {"state_dict": {"model": ...}}, ...
        if isinstance(state, Mapping) and not _is_tensor_dict(state):
            nested = next((state[k] for k in _NESTED_KEYS if k in state and isinstance(state[k], Mapping)), None)
            if nested is None:
                break
            state = nested
    if not isinstance(state, Mapping) or not _is_tensor_dict(state):
        raise ModelLoadError(
            f"checkpoint {path} holds no state dict (expected tensors, optionally under "
            f"{', '.join(repr(k) for k in _NESTED_KEYS)})"
        )
    # Strip wrappers added by DDP and torch.compile.
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    return cleaned


def _is_tensor_dict(d: Mapping[str, Any]) -> bool:
    return len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


def apply_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load weights strictly; the error names the first tensor that does not fit."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise ModelLoadError(f"checkpoint {source} does not fit the model: tensor '{key}' is missing")
        if tuple(state[key].shape) != tuple(tensor.shape):
            hint = " (pass --num-classes to match the checkpoint's classifier)" if key.startswith("head") else ""
            raise ModelLoadError(
                f"checkpoint {source} does not fit the model: tensor '{key}' has shape "
                f"{tuple(state[key].shape)} in the checkpoint but {tuple(tensor.shape)} in the model{hint}"
            )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ModelLoadError(
            f"checkpoint {source} does not fit the model: unexpected tensor '{unexpected[0]}'"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    model.load_state_dict(state, strict=True)


# ---- loading ---------------------------------------------------------------------------------
def load_model(
    name: str = DEMO_NAME,
    *,
    checkpoint: str | Path | None = None,
    random_init: bool = False,
    num_classes: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """Build a supported timm ViT in eval mode and describe how to rebuild it.

    Weights come from ``checkpoint`` if given, else from timm's pretrained mechanism (the hub
    cache; ``demo`` and ``local-dir:`` read their folder), unless ``random_init``.
    """
    if not name or not name.strip():
        raise ModelLoadError("empty model name: give an alias, a timm name, hf-hub:ORG/NAME or local-dir:PATH")
    timm_name = resolve_name(name.strip())
    if not timm_name.startswith(("local-dir:", "hf-hub:")):
        _check_timm_name(timm_name)
    extra_args = dict(model_kwargs or {})
    if num_classes is not None:
        extra_args["num_classes"] = num_classes

    pretrained = checkpoint is None and not random_init
    if timm_name.startswith("local-dir:"):
        _local_dir_config(timm_name[len("local-dir:") :])  # clear error before timm's own
    create = lambda: timm.create_model(timm_name, pretrained=pretrained, **extra_args)  # noqa: E731
    try:
        if pretrained and not timm_name.startswith("local-dir:"):
            model = _hub_call(name, create)
        elif timm_name.startswith("hf-hub:"):
            model = _hub_call(name, create)  # the config still comes from the hub (or its cache)
        else:
            model = create()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"could not build '{name}': {exc}") from None

    check_supported(model, name)
    if checkpoint is not None:
        apply_state_dict(model, read_state_dict(checkpoint), str(checkpoint))
    architecture, model_args = _architecture_and_args(timm_name, extra_args)
    spec = ModelSpec(
        model_id=name,
        architecture=architecture,
        model_args=model_args,
        data_config=resolve_data_config(model),
        weights="checkpoint" if checkpoint is not None else ("random" if random_init else "pretrained"),
    )
    return model.eval(), spec


# Constructor arguments of timm's VisionTransformer that take classes or devices, not data: a
# model description read from a file may not set them (nor any argument the class does not take).
_NOT_DATA_ARGS = {"self", "embed_layer", "embed_norm_layer", "block_fn", "mlp_layer", "attn_layer", "device", "dtype"}
_LAYER_NAME_ARGS = {"norm_layer", "act_layer"}  # timm looks these names up in its own tables
_LAYER_NAME = re.compile(r"^[a-z0-9_]+$")


def check_spec(spec: ModelSpec) -> None:
    """Refuse a model description (e.g. read from a file's metadata) that is not plainly a timm ViT
    built from data: the architecture must be a registered timm ViT name (no ``hf-hub:``/``local-dir:``,
    no dotted path: nothing is downloaded, read or imported because a file says so) and every
    argument one that timm's VisionTransformer takes as plain data."""
    from timm.models.vision_transformer import VisionTransformer

    arch = spec.architecture
    why = ""
    if not isinstance(arch, str) or ":" in arch or "/" in arch or not timm.is_model(arch):
        why = "not a timm model name"
    elif _model_module(arch.split(".", 1)[0]).rsplit(".", 1)[-1] not in _VIT_MODULES:
        why = "not a timm Vision Transformer"
    if why:
        raise UnsupportedModelError(
            f"the model description names architecture {arch!r}, {why}: refusing to build it "
            "(vitcompress rebuilds only timm VisionTransformer models; the file was not written by vitcompress, or was altered)"
        )
    allowed = set(inspect.signature(VisionTransformer.__init__).parameters) - _NOT_DATA_ARGS
    for key, value in spec.model_args.items():
        if key not in allowed:
            raise UnsupportedModelError(
                f"the model description of {arch!r} sets {key!r}, which is not a VisionTransformer setting: refusing to "
                "build it (the file was not written by vitcompress, or was altered)"
            )
        if key in _LAYER_NAME_ARGS and value is not None and not (isinstance(value, str) and _LAYER_NAME.match(value)):
            raise UnsupportedModelError(f"the model description of {arch!r} sets {key} to {value!r}: only a timm layer "
                                        "name such as 'gelu' is accepted")


def build_model(spec: ModelSpec) -> nn.Module:
    """The architecture of ``spec`` with random weights, offline (used to reload exports).

    ``spec`` is checked first (``check_spec``): a description read from a file cannot make this
    download, read or import anything."""
    check_spec(spec)
    try:
        model = timm.create_model(spec.architecture, pretrained=False, **spec.model_args)
    except Exception as exc:
        raise ModelLoadError(f"could not rebuild '{spec.architecture}' with {spec.model_args}: {exc}") from None
    check_supported(model, spec.model_id)
    return model.eval()


def resolve_data_config(model: nn.Module) -> dict[str, Any]:
    """timm's preprocessing for this model: input size, interpolation, mean/std, crop."""
    from timm.data import resolve_model_data_config

    cfg = dict(resolve_model_data_config(model))
    # timm keeps the pretrained config's size when a model is built with another img_size.
    img_size = getattr(model.patch_embed, "img_size", None)
    if img_size is not None:
        cfg["input_size"] = [int(cfg["input_size"][0]), *(int(s) for s in img_size)]
    return json.loads(json.dumps(cfg))  # tuples -> lists


# ---- geometry ------------------------------------------------------------------------------
def model_info(model: nn.Module) -> ModelInfo:
    """Geometry of a supported ViT: tokens, prefix tokens, blocks, heads, data config."""
    check_supported(model)
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    num_prefix = int(model.num_prefix_tokens)
    first = model.blocks[0]
    return ModelInfo(
        architecture=str(getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)),
        params=sum(p.numel() for p in model.parameters()),
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(first.attn.num_heads),
        mlp_hidden=int(first.mlp.fc1.out_features),
        num_prefix_tokens=num_prefix,
        has_class_token=model.cls_token is not None,
        num_reg_tokens=int(getattr(model, "num_reg_tokens", 0)),
        distilled=getattr(model, "dist_token", None) is not None,
        layer_scale=not isinstance(first.ls1, nn.Identity),
        grid=(grid[0], grid[1]),
        num_tokens=num_prefix + grid[0] * grid[1],
        global_pool=str(model.global_pool),
        num_classes=int(model.num_classes),
        data_config=resolve_data_config(model),
    )
