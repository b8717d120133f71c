"""Plan directories: ``plan.json`` + one safetensors file per sub-model + aggregator; sha256-verified.

Layout::

    plan.json                 policy, selections, backbone, figures, versions, file hashes
    submodel_0.safetensors    ... one per sub-model
    aggregator.safetensors    aggregator weights (incl. task head and student heads)

Nothing is pickled: configs are JSON and weights are safetensors.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import save_file
from safetensors.torch import save as st_save

from coformer.admission import (
    AdmissionError,
    admit,
    build_on_meta,
    check_config_sanity,
    compare_to_weights,
    materialise,
    safetensors_header,
)
from coformer.aggregator import Aggregator
from coformer.backbone import SubModel
from coformer.heads import ClassifierHead, StudentHead
from coformer.plan_document import PACKAGED, read_plan_document, stamp
from coformer.transport import SubModelArtifact, sha256


class ArtifactError(ValueError):
    """A plan directory is missing a file, or a file's hash does not match ``plan.json``."""


def _versions() -> dict[str, str]:
    # the installed distribution's version (= coformer.__version__): the bottom layer does not import the package facade
    return {"coformer": metadata.version("coformer"), "torch": torch.__version__, "python": platform.python_version()}


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone so tied/shared tensors are written as independent entries safetensors accepts
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def submodel_artifact(model: SubModel) -> SubModelArtifact:
    """Serialise a sub-model to the bytes a worker loads."""
    return SubModelArtifact.from_parts(model.config, st_save(_state(model)))


@dataclass
class Plan:
    """A loaded plan directory."""

    path: Path
    meta: dict[str, Any]
    artifacts: list[SubModelArtifact]
    aggregator: Aggregator
    figures: dict[str, Any] = field(default_factory=dict)

    def submodels(self) -> list[SubModel]:
        """Rebuild the sub-models locally (for in-process runs and tests), each admitted before allocation."""
        out = []
        for n, art in enumerate(self.artifacts):
            factory = _submodel_factory(art.config)
            admit(factory, art.weights, what=f"sub-model {n}")
            out.append(materialise(factory, art.weights))
        return out


def _submodel_factory(config: dict[str, Any]) -> Callable[[], SubModel]:
    from coformer.registry import create

    check_config_sanity(config)
    backbone = create("backbone", config["backbone"])
    return lambda: backbone.build_submodel(config)


def save_plan(
    path: str | Path,
    *,
    submodels: Sequence[SubModel],
    aggregator: Aggregator,
    task_head: ClassifierHead,
    student_heads: Sequence[StudentHead] | None,
    meta: dict[str, Any],
) -> Path:
    """Write a packaged plan directory (stage ``packaged``); returns its path. ``meta`` holds policy, backbone, figures etc."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    sub_entries = []
    for n, m in enumerate(submodels):
        name = f"submodel_{n}.safetensors"
        save_file(_state(m), str(out / name))
        files[name] = sha256((out / name).read_bytes())
        sub_entries.append({"file": name, "config": m.config, "feature_dim": m.feature_dim})
    save_file(_state(aggregator), str(out / "aggregator.safetensors"))
    files["aggregator.safetensors"] = sha256((out / "aggregator.safetensors").read_bytes())
    doc = {
        "versions": _versions(),
        **meta,
        "submodels": sub_entries,
        "aggregator": {"file": "aggregator.safetensors", "config": aggregator.config,
                       "task_head": task_head.config,
                       "student_heads": [h.config for h in student_heads] if student_heads else None},
        "sha256": files,
    }
    (out / "plan.json").write_text(json.dumps(stamp(doc, PACKAGED), indent=2, sort_keys=False))
    return out


def _read_verified(path: Path, name: str, expected: str) -> bytes:
    f = path / name
    if not f.exists():
        raise ArtifactError(f"{f} is missing; the plan directory is incomplete — re-run `coformer plan`/`demo`")
    data = f.read_bytes()
    actual = sha256(data)
    if actual != expected:
        raise ArtifactError(
            f"{f}: sha256 {actual} does not match plan.json ({expected}); the file is corrupted or "
            f"was replaced — restore it or re-create the plan"
        )
    return data


def load_plan(path: str | Path) -> Plan:
    """Read a plan directory, verifying every file's sha256 against ``plan.json``.

    Every config is checked against its weights (tensor names, shapes, dtypes) on the meta
    device, and the aggregator against the memory budget, before anything is allocated; a
    mismatch raises :class:`ArtifactError` naming the file and tensor.
    """
    from coformer.registry import create

    root = Path(path)
    plan_file = root / "plan.json"
    if not plan_file.exists():
        raise ArtifactError(f"{plan_file} not found: {root} is not a plan directory")
    meta = read_plan_document(root, needs=PACKAGED)  # a search result names the stage it lacks, no KeyError
    hashes = meta["sha256"]
    artifacts = []
    for n, entry in enumerate(meta["submodels"]):
        data = _read_verified(root, entry["file"], hashes[entry["file"]])
        try:  # the config must describe exactly these weights; nothing is allocated to check it
            header = safetensors_header(data)
            compare_to_weights(build_on_meta(_submodel_factory(entry["config"]), max_tensors=len(header)), header,
                               f"{entry['file']}")
        except AdmissionError as exc:
            raise ArtifactError(f"{root}: {exc}") from exc
        artifacts.append(SubModelArtifact(entry["config"], data, hashes[entry["file"]]))
    agg_meta = meta["aggregator"]
    _read_verified(root, agg_meta["file"], hashes[agg_meta["file"]])
    cfg = agg_meta["config"]

    def build_aggregator() -> Aggregator:
        task_head = ClassifierHead.from_config(agg_meta["task_head"])
        students = ([StudentHead.from_config(c) for c in agg_meta["student_heads"]]
                    if agg_meta["student_heads"] else None)
        return create("aggregator", cfg["name"], feature_dims=cfg["feature_dims"], embed_dim=cfg["embed_dim"],
                      task_head=task_head, student_heads=students, **cfg.get("options", {}))

    agg_file = root / agg_meta["file"]
    try:
        check_config_sanity(agg_meta)
        admit(build_aggregator, agg_file, what=agg_meta["file"])
    except AdmissionError as exc:
        raise ArtifactError(f"{root}: {exc}") from exc
    aggregator = materialise(build_aggregator, agg_file)
    return Plan(root, meta, artifacts, aggregator.eval(), meta.get("figures", {}))
