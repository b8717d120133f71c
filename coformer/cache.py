"""The one cache directory CoFormer writes to (fine-tuned teachers, converted models, importance)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$COFORMER_CACHE``, else ``$XDG_CACHE_HOME/coformer`` (``~/.cache/coformer``)."""
    env = os.environ.get("COFORMER_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "coformer"
