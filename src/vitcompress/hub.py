"""Where models come from: the short names people type, and the Hugging Face hub without hanging.

``ALIASES`` (short name -> timm name) and the built-in ``demo`` model's folder live here, in a
module that imports neither torch nor timm, so that ``vitcompress models`` answers at once.

huggingface_hub retries a failed request for about a minute before giving up. We probe the
endpoint once (a few seconds at most) and, when it cannot be reached or the user set
``HF_HUB_OFFLINE=1``, switch huggingface_hub and datasets to offline mode for the call, so they
answer from the local cache at once or fail at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

# The built-in demo model: timm's local format (config.json + model.safetensors) inside the package.
DEMO_NAME = "demo"
DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"

# Short names people type, mapped to timm's names.
ALIASES: dict[str, str] = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "deit_base_distilled": "deit_base_distilled_patch16_224",
    "deit3_small": "deit3_small_patch16_224",
    "deit3_base": "deit3_base_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


def offline_requested() -> bool:
    """True when the user asked for offline mode through the usual environment variables."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=None)
def _endpoint_reachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_available() -> bool:
    """Whether a hub download can be attempted: not offline by request, endpoint reachable."""
    if offline_requested():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return _endpoint_reachable(endpoint)


def offline_reason() -> str:
    if offline_requested():
        return "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)"
    return "the Hugging Face hub cannot be reached (no network)"


@contextlib.contextmanager
def hub_mode() -> Iterator[bool]:
    """Inside, huggingface_hub and datasets fail fast when the hub is unavailable.

    Yields whether the hub is available. When it is not, both libraries are switched to offline
    mode (they then use only the local cache) and switched back afterwards.
    """
    online = hub_available()
    if online:
        yield True
        return
    patched = []
    try:
        import huggingface_hub.constants as hf_constants

        patched.append((hf_constants, "HF_HUB_OFFLINE", hf_constants.HF_HUB_OFFLINE))
        hf_constants.HF_HUB_OFFLINE = True
        try:
            import datasets.config as ds_config

            patched.append((ds_config, "HF_HUB_OFFLINE", ds_config.HF_HUB_OFFLINE))
            ds_config.HF_HUB_OFFLINE = True
        except ImportError:  # pragma: no cover - datasets is a dependency
            pass
        yield False
    finally:
        for module, name, value in reversed(patched):
            setattr(module, name, value)
