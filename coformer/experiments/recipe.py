"""Recipe files: every stage of an experiment in one TOML file, for ``coformer run``.

A recipe names the backbone and its source, the data set, the devices and links, and the
settings of each stage it runs: ``[profile]`` (optional), ``[search]`` (optional; without it the
policy is the proportional default), ``[calibrate]`` and ``[bench]`` (optional). Relative paths
(``source``, a data set's file, a devices file, ``out``) are relative to the recipe file. The
schema, with every key, is in ``docs/recipe.md``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from coformer import defaults
from coformer.dataset_uri import parse_dataset_uri

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: The recipe format this version of coformer reads.
RECIPE_FORMAT_VERSION = 1

#: Keys each section may set, with their defaults (``None``: the stage's own default).
SECTIONS: dict[str, dict[str, Any]] = {
    "model": {"backbone": defaults.BACKBONE, "source": None, "max_length": 64, "img_size": 56},
    "data": {"uri": None},
    "devices": {"names": list(defaults.DEVICES), "file": None, "link_mbps": None},
    "profile": {"shapes": 50, "repeats": 5, "warmup": 2, "statistic": "median", "cpu_quota": {}, "workers": {},
                "threads": None, "seed": 0},
    "search": {"strategy": defaults.SEARCH_STRATEGY, "trials": 30, "delta": 0.5, "proxy": "probe",
               "topology": "coordinator", "val_docs": 64, "train_docs": 160, "seed": 0},
    "calibrate": {"aggregator": defaults.AGGREGATOR, "layers": None, "compressed": True, "seed": 0, "booster": {}},
    "bench": {"workers": [], "testbed": False, "link_mbps": [2.0, 1000.0], "requests": 20, "warmup": 3,
              "batch_size": 1, "max_seconds": 120.0, "accuracy_limit": None, "cores": 1.0},
}
#: Sections a recipe may leave out; the stage is then skipped (``search``: the proportional policy is used).
OPTIONAL_STAGES = ("profile", "search", "bench")


class RecipeError(ValueError):
    """A recipe that cannot be read; the message names the file, the section and key, and the fix."""


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: one settings dict per section (defaults filled in), and where its outputs go."""

    path: Path
    out: Path
    model: dict[str, Any]
    data: dict[str, Any]
    devices: dict[str, Any]
    calibrate: dict[str, Any]
    profile: dict[str, Any] | None = None
    search: dict[str, Any] | None = None
    bench: dict[str, Any] | None = None
    stages: tuple[str, ...] = field(default=())

    @property
    def device_spec(self) -> str:
        """The devices as every stage takes them: a devices file, or comma-separated built-in names."""
        return self.devices["file"] or ",".join(self.devices["names"])

    @property
    def device_names(self) -> list[str]:
        """The devices' names, in order."""
        from coformer.spec import resolve_devices

        return [d.name for d in resolve_devices(self.device_spec)]


def _relative_to(base: Path, value: str | None) -> str | None:
    """``value`` as a path relative to the recipe's directory when it names something there, else unchanged."""
    if not value or Path(value).is_absolute():
        return value
    candidate = base / value
    return str(candidate) if candidate.exists() else value


def _data_uri(base: Path, uri: str | None) -> str | None:
    """A data set URI whose location (``csv:PATH?…``) is made relative to the recipe's directory."""
    if not uri:
        return uri
    name, location, _ = parse_dataset_uri(uri)
    if location is None or Path(location).is_absolute() or not (base / location).exists():
        return uri
    head, _, query = uri.partition("?")
    return f"{name}:{base / location}" + (f"?{query}" if query else "")


def _section(path: Path, doc: dict[str, Any], name: str) -> dict[str, Any] | None:
    """One section with its defaults filled in; unknown keys are an error naming the known ones."""
    if name not in doc:
        return None
    given = doc[name]
    if not isinstance(given, dict):
        raise RecipeError(f"{path}: [{name}] must be a table, got {type(given).__name__}")
    known = SECTIONS[name]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise RecipeError(f"{path}: [{name}] has unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return {**known, **given}


def _check_booster(path: Path, booster: dict[str, Any]) -> None:
    from coformer.offline.booster import BoosterConfig

    known = {f.name for f in fields(BoosterConfig)} - {"seed"}
    unknown = sorted(set(booster) - known)
    if unknown:
        raise RecipeError(f"{path}: [calibrate.booster] has unknown key(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(known))}")


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file; every problem is a :class:`RecipeError` naming the file (and line)."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}") from exc
    version = doc.pop("format_version", None)
    if version != RECIPE_FORMAT_VERSION:
        raise RecipeError(f"{path}: format_version is {version!r}; this coformer reads recipes of format_version "
                          f"{RECIPE_FORMAT_VERSION} (docs/recipe.md shows the schema)")
    out = doc.pop("out", None)
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise RecipeError(f"{path}: unknown section(s) {', '.join(unknown)}; known: out, format_version, "
                          f"{', '.join(SECTIONS)}")
    base = path.parent
    model, data, devices, calibrate = (_section(path, doc, name) or {**SECTIONS[name]}
                                       for name in ("model", "data", "devices", "calibrate"))
    profile, search, bench = (_section(path, doc, name) for name in OPTIONAL_STAGES)
    _check_booster(path, calibrate["booster"])
    if search is not None and calibrate["layers"] is not None:
        raise RecipeError(f"{path}: [calibrate] layers applies to the proportional policy, but [search] plans the "
                          f"policy (which fixes each sub-model's layers); remove one of them")
    if bench is not None and bool(bench["testbed"]) == bool(bench["workers"]):
        raise RecipeError(f"{path}: [bench] needs exactly one of testbed = true (root) or workers = [URI, ...]")
    model["source"] = _relative_to(base, model["source"])
    data["uri"] = _data_uri(base, data["uri"])
    devices["file"] = _relative_to(base, devices["file"])
    present = {"profile": profile, "search": search, "calibrate": calibrate, "bench": bench}
    return Recipe(path=path, out=base / (out or path.stem), model=model, data=data, devices=devices,
                  calibrate=calibrate, profile=profile, search=search, bench=bench,
                  stages=tuple(name for name, given in present.items() if given is not None))
