"""Model files that ship inside other installed packages, and the error the ONNX converters raise.

The packages are located with ``importlib.util.find_spec``, never imported: some of them import
dependencies this project does not install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


class OnnxConversionError(ValueError):
    """The ONNX graph does not have the layout a converter expects; the message says what is off."""


def package_file(module: str, relpath: str | Path, install: str, *, what: str) -> Path:
    """``relpath`` inside the installed package ``module``; a missing package or file names ``install``.

    ``what`` says what needs the file (e.g. "the embedded ViT-S/14"), for the error message.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{what} needs the {module.replace('_', '-')!r} package: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall it ({install})")
    return path
