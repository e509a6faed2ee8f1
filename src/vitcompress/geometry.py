"""What shape a timm ViT is: the one support check, token grid, prefix count and input size.

``check_supported`` decides what vitcompress can compress (a stock timm ``VisionTransformer``);
``vit_geometry`` reads the sizes of a supported model, converted or not; ``input_size`` is the one
rule for the (channels, height, width) a model takes. Every stage asks here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from torch import nn

from vitcompress.errors import UnsupportedModelError, VitcompressError


@dataclass(frozen=True)
class VitGeometry:
    """Sizes of a ViT that plans, conversion and costs depend on."""

    depth: int
    grid: tuple[int, int]
    num_prefix_tokens: int
    embed_dim: int
    num_heads: int

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches


def check_supported(model: nn.Module, name: str = "model") -> None:
    """Raise UnsupportedModelError with the reason unless ``model`` is a stock timm ViT we can
    compress: a ``VisionTransformer`` of standard ``Block``/``Attention`` blocks, a fixed token
    count ('token' or 'avg' pooling, no dynamic image size, no patch dropout)."""
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    def refuse(why: str) -> None:
        raise UnsupportedModelError(f"'{name}' is not supported: {why}")

    if not isinstance(model, VisionTransformer):
        refuse(f"it is a {type(model).__name__}, not a timm VisionTransformer")
    if getattr(model, "global_pool", "token") == "map":
        refuse("attention-pool heads (global_pool='map') are not supported; use 'token' or 'avg'")
    if getattr(model, "dynamic_img_size", False):
        refuse("dynamic_img_size=True changes the token count per input; create it with a fixed img_size")
    if getattr(model.patch_embed, "grid_size", None) is None:
        refuse("its patch embedding has no fixed grid")
    if not isinstance(getattr(model, "patch_drop", nn.Identity()), nn.Identity):
        refuse("patch dropout changes the token count during training; create it with patch_drop_rate=0")
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(getattr(block, "attn", None)) is not Attention:
            refuse(
                f"block {i} is a {type(block).__name__} with {type(getattr(block, 'attn', None)).__name__}; only timm's "
                f"standard Block with Attention is supported (is the model already converted?)"
            )


def vit_geometry(model: nn.Module) -> VitGeometry:
    """The sizes of a timm ViT, stock or converted (blocks, patch grid, prefix tokens, width)."""
    blocks = getattr(model, "blocks", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0 or grid is None or not hasattr(model, "num_prefix_tokens"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a timm VisionTransformer (needs blocks, patch_embed.grid_size, "
            f"num_prefix_tokens): use a timm ViT/DeiT model"
        )
    if getattr(model, "dynamic_img_size", False):
        raise UnsupportedModelError(
            "compression needs a fixed token count: create the model without dynamic_img_size=True"
        )
    return VitGeometry(
        depth=len(blocks),
        grid=(int(grid[0]), int(grid[1])),
        num_prefix_tokens=int(model.num_prefix_tokens),
        embed_dim=int(getattr(model, "embed_dim", 0)),
        num_heads=int(getattr(blocks[0].attn, "num_heads", 0)),
    )


def input_size(model: nn.Module, data_config: Optional[Mapping[str, Any]] = None) -> tuple[int, int, int]:
    """(channels, height, width) ``model`` takes.

    The patch embedding first, because it is what the model actually runs at (timm keeps the
    pretrained config's 224 when a model is built with another ``img_size``); then ``data_config``
    (a timm data config, e.g. from an exported file's metadata), then the export metadata attached
    by ``vitcompress.load``, then timm's pretrained config.
    """
    pe = getattr(model, "patch_embed", None)
    img_size = getattr(pe, "img_size", None)
    in_chans = getattr(getattr(pe, "proj", None), "in_channels", None)
    if img_size is not None and in_chans is not None:
        return int(in_chans), int(img_size[0]), int(img_size[1])
    for cfg in (data_config, (getattr(model, "vitcompress_metadata", None) or {}).get("data_config"),
                getattr(model, "pretrained_cfg", None)):
        size = (cfg or {}).get("input_size")
        if size is not None and len(size) == 3:
            return int(size[0]), int(size[1]), int(size[2])
    raise VitcompressError(f"cannot tell the input size of {type(model).__name__}: pass input_size=(C, H, W)")


__all__ = ["VitGeometry", "check_supported", "input_size", "vit_geometry"]
