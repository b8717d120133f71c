"""Which data set a stage runs on: ``--data NAME_OR_URI``, else the default its backbone's modality declares.

A data set plugin declares itself the default for a modality with a class attribute
``default_for_modality = "text"`` on its :class:`~coformer.data.DatasetSource`, so the core never
names one. Every stage (plan, profile, calibrate, demo, bench) resolves its data here.
"""

from __future__ import annotations

from typing import Any

from coformer.data import DatasetOptionError, RawDataset


def default_data_name(modality: str) -> str:
    """The registered data set that declares itself the default for backbones of ``modality``."""
    from coformer.registry import list_plugins

    names = sorted(info.name for info in list_plugins("dataset")
                   if getattr(info.factory, "default_for_modality", None) == modality)
    if not names:
        raise DatasetOptionError(f"no installed data set is the default for {modality!r} backbones; pass "
                                 f"--data NAME_OR_URI (e.g. csv:PATH?text=COL&label=COL)")
    if len(names) > 1:
        raise DatasetOptionError(f"data sets {', '.join(names)} all declare themselves the default for {modality!r} "
                                 f"backbones; pass --data NAME to choose one")
    return names[0]


def choose_dataset(data: str | None, modality: str, **default_options: Any) -> RawDataset:
    """Load ``data`` (a name or URI), or the modality's default with ``default_options`` when ``data`` is None.

    ``default_options`` (e.g. per-split caps for a quick demo) apply only to the default: a
    URI carries its own options.
    """
    from coformer import load_dataset

    if data:
        return load_dataset(data)
    return load_dataset(default_data_name(modality), **default_options)
