"""The plan document (``plan.json``): one versioned schema for every stage of the flow.

``coformer plan`` writes a *searched* document (a policy and its predicted Ψ); ``coformer
calibrate`` (and ``coformer demo``) write a *packaged* one (the same policy with sub-model,
aggregator and head weights and their sha256). Each carries ``format_version`` and ``stage``;
readers say which stage they need. The schema is documented in ``docs/plan-format.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Bump when a field changes meaning or a required field is added; docs/plan-format.md says what each holds.
FORMAT_VERSION = 2
SEARCHED = "searched"
PACKAGED = "packaged"
#: Stages in flow order; a later stage's document holds everything an earlier one does.
STAGES = (SEARCHED, PACKAGED)
#: The command that turns a document of the previous stage into one of this stage.
_ADDED_BY = {
    SEARCHED: "`coformer plan --out DIR ...`",
    PACKAGED: "`coformer calibrate --plan DIR --data DATASET --out PACKAGED_DIR ...`",
}


class PlanDocumentError(ValueError):
    """``plan.json`` is missing, unreadable, of another format version, or of an earlier stage than needed."""


class PlanNotFoundError(PlanDocumentError, FileNotFoundError):
    """The directory has no ``plan.json``."""


def stamp(doc: dict[str, Any], stage: str) -> dict[str, Any]:
    """``doc`` with ``format_version`` and ``stage`` first (the fields every reader checks)."""
    if stage not in STAGES:
        raise ValueError(f"unknown plan stage {stage!r}; stages: {', '.join(STAGES)}")
    rest = {k: v for k, v in doc.items() if k not in ("format_version", "stage", "format")}
    return {"format_version": FORMAT_VERSION, "stage": stage, **rest}


def write_plan_document(directory: str | Path, doc: dict[str, Any], stage: str) -> Path:
    """Write ``directory/plan.json`` stamped with the format version and ``stage``; returns the file."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "plan.json"
    path.write_text(json.dumps(stamp(doc, stage), indent=2))
    return path


def _version_of(doc: dict[str, Any]) -> int:
    if "format_version" in doc:
        return int(doc["format_version"])
    return int(doc.get("format", 0))  # format 1 packaged documents; unversioned search results are 0


def check_plan_document(doc: dict[str, Any], source: str, *, needs: str = SEARCHED) -> dict[str, Any]:
    """``doc`` if it is of this format version and at least stage ``needs``; else a clear error."""
    if needs not in STAGES:
        raise ValueError(f"unknown plan stage {needs!r}; stages: {', '.join(STAGES)}")
    try:
        version = _version_of(doc)
    except (TypeError, ValueError):
        raise PlanDocumentError(f"{source}: format_version {doc.get('format_version')!r} is not a number") from None
    if version != FORMAT_VERSION:
        age = "older" if version < FORMAT_VERSION else "newer"
        fix = ("re-create it with this coformer (`coformer plan`, then `coformer calibrate`)" if age == "older"
               else "upgrade coformer to read it")
        raise PlanDocumentError(f"{source} is plan format version {version}, {age} than the version this coformer "
                                f"reads ({FORMAT_VERSION}); {fix}")
    stage = doc.get("stage")
    if stage not in STAGES:
        raise PlanDocumentError(f"{source}: unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    if STAGES.index(stage) < STAGES.index(needs):
        missing = STAGES[STAGES.index(stage) + 1: STAGES.index(needs) + 1]
        steps = "; then ".join(f"{s} with {_ADDED_BY[s]}" for s in missing)
        raise PlanDocumentError(f"{source} is a {stage!r} plan: it has no {' or '.join(repr(s) for s in missing)} "
                                f"stage yet (no weights to load). Add it: {steps}")
    return doc


def read_plan_document(directory: str | Path, *, needs: str = SEARCHED) -> dict[str, Any]:
    """``directory/plan.json``, checked by :func:`check_plan_document`."""
    path = Path(directory) / "plan.json"
    if not path.exists():
        raise PlanNotFoundError(f"{path} not found: pass a directory written by {_ADDED_BY[needs]}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PlanDocumentError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
    if not isinstance(doc, dict):
        raise PlanDocumentError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return check_plan_document(doc, str(path), needs=needs)
