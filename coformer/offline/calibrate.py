"""The calibrate and package stages: a policy becomes a deployable plan directory.

:func:`calibrate_stage` decomposes a policy (a ``coformer plan`` search result, or the
proportional default) into sub-models, calibrates them by progressive boosting distillation
and trains the aggregator; :func:`package_stage` writes the packaged plan directory.
:func:`run_calibrate` is ``coformer calibrate``: prepare the teacher on a data set, then both.
``coformer demo`` is the same composition plus figures.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from coformer import defaults, registry
from coformer.aggregator import Aggregator
from coformer.artifacts import save_plan
from coformer.backbone import Backbone, SubModel
from coformer.offline.booster import BoosterConfig, calibrate, submodel_features, train_aggregator
from coformer.offline.compressed import COMPRESSED_DIR, compressed_policy, search_settings
from coformer.data import RawDataset
from coformer.offline.decompose import proportional_specs
from coformer.heads import ClassifierHead, StudentHead, head_input_dim
from coformer.offline.pipeline import (
    Teacher,
    accuracy,
    calibration_importance,
    decompose_policy,
    prepare_teacher,
    teacher_record,
)
from coformer.plan_document import PlanDocumentError, read_plan_document
from coformer.spec import ConstraintError, Policy, Violation, resolve_devices

DEFAULT_DEVICES = defaults.DEVICES


@dataclass
class Calibrated:
    """A policy's calibrated sub-models, their student heads, the trained aggregator and measured costs."""

    policy: Policy
    submodels: list[SubModel]
    students: list[StudentHead]
    aggregator: Aggregator
    costs: list[Any]
    test_features: list[torch.Tensor]
    val_features: list[torch.Tensor]
    importance: Any = None
    #: The search settings of the plan the policy came from (``None`` for the proportional default).
    search: dict[str, Any] | None = None


def searched_plan(plan_dir: str | Path) -> dict[str, Any]:
    """A plan directory's document (any stage) that carries a policy."""
    doc = read_plan_document(plan_dir)
    if "policy" not in doc:
        raise PlanDocumentError(f"{Path(plan_dir) / 'plan.json'} has no 'policy' entry; re-run `coformer plan`")
    return doc


def calibrate_policy(backbone: Backbone, teacher: Teacher, policy: Policy, config: BoosterConfig,
                     aggregator_name: str, *, importance: Any = None) -> Calibrated:
    """Decompose ``policy`` (by ``importance``, or importance scored on a calibration batch), calibrate
    its sub-models (booster) and train the aggregator on their features."""
    parts = decompose_policy(backbone, teacher, policy, importance=importance)
    hard = teacher.train_logits.argmax(-1)
    result = calibrate(backbone, teacher.model, parts.submodels, teacher.train, config=config, teacher_labels=hard)
    submodels, students = result.submodels, result.student_heads
    feats = {split: submodel_features(submodels, getattr(teacher, split)) for split in ("train", "val", "test")}
    task_head = backbone.task_head(teacher.model)
    aggregator: Aggregator = registry.create(
        "aggregator", aggregator_name, feature_dims=[m.feature_dim for m in submodels],
        embed_dim=head_input_dim(task_head), task_head=task_head, student_heads=students)
    train_aggregator(aggregator, feats["train"], teacher.train.labels, config=config, teacher_labels=hard)
    return Calibrated(policy, submodels, students, aggregator.eval(), parts.costs, feats["test"], feats["val"],
                      importance)


def proportional_policy(backbone: Backbone, teacher: Teacher, devices: Sequence[str] | str, *,
                        layers: int | None, importance: Any) -> Policy:
    """One sub-model per device, sized in proportion to its GFLOPS (``layers`` each, when given)."""
    shape = backbone.shape(teacher.model)
    if layers is not None and not 1 <= layers <= shape.layers:
        raise ConstraintError([Violation(
            "C1", f"every sub-model would keep {layers} layers but the teacher has {shape.layers}; "
                  f"choose --layers 1..{shape.layers}", None, float(max(layers - shape.layers, 1 - layers)))])
    profiles = resolve_devices(devices)
    specs = proportional_specs(shape, [d.gflops for d in profiles], layers=layers, importance=importance)
    return Policy(specs, profiles, {"source": "proportional to device GFLOPS" + (f", {layers} layers each"
                                                                               if layers else "")})


def calibrate_stage(backbone: Backbone, teacher: Teacher, *, config: BoosterConfig, plan: str | Path | None = None,
                    devices: Sequence[str] | str = DEFAULT_DEVICES, layers: int | None = None,
                    aggregator_name: str = defaults.AGGREGATOR) -> Calibrated:
    """Calibrate the policy of ``plan`` (a ``coformer plan`` directory) or the proportional default.

    A plan deploys exactly the units its search scored (its stored importance); plans without
    stored importance, and the proportional default, score importance on a calibration batch.
    """
    if plan is not None and layers is not None:
        raise ValueError("layers applies to the proportional policy; a plan directory already fixes each "
                         "sub-model's layers — pass one or the other")
    from coformer.offline.importance import plan_importance

    doc = searched_plan(plan) if plan is not None else None
    importance = plan_importance(doc) if doc is not None else None
    if importance is None:
        importance = calibration_importance(backbone, teacher)
    if plan is not None and doc is not None:
        policy, search = Policy.from_dict(doc["policy"]), search_settings(plan)
    else:
        policy, search = proportional_policy(backbone, teacher, devices, layers=layers, importance=importance), None
    cal = calibrate_policy(backbone, teacher, policy, config, aggregator_name, importance=importance)
    cal.search = search
    return cal


def plan_record(backbone_name: str, source: str | None, load_options: dict[str, Any], data: RawDataset,
                teacher: Teacher) -> dict[str, Any]:
    """What a packaged plan records about how it was made: backbone, source, data set URI, teacher."""
    return {"backbone": backbone_name, "source": source, "load_options": load_options, "classes": data.classes,
            "dataset": data.name, "teacher": teacher_record(teacher.path, backbone_name, data.name)}


def package_stage(out: str | Path, backbone: Backbone, teacher: Teacher, cal: Calibrated,
                  meta: dict[str, Any]) -> Path:
    """Write ``cal`` as a packaged plan directory (``plan.json`` stage ``packaged`` + safetensors)."""
    head = backbone.task_head(teacher.model)
    if not isinstance(head, ClassifierHead):
        raise TypeError(f"a plan packages a ClassifierHead as the task head; {backbone.name}'s is a "
                        f"{type(head).__name__} (load the teacher with num_labels=N)")
    return save_plan(out, submodels=cal.submodels, aggregator=cal.aggregator, task_head=head,
                     student_heads=cal.students,
                     meta={**meta, "policy": cal.policy.to_dict()})


def calibrate_compressed(backbone: Backbone, teacher: Teacher, cal: Calibrated, config: BoosterConfig,
                         aggregator_name: str, *, layers: int | None = None) -> Calibrated:
    """The single-model alternative to ``cal``: one sub-model for its strongest device, shaped by the same
    rule with N = 1 (the same search, or the proportional rule with the same ``layers``), calibrated with
    the same settings and the same unit importance."""
    policy = compressed_policy(backbone, teacher, cal.policy.devices, layers=layers, search=cal.search)
    return calibrate_policy(backbone, teacher, policy, config, aggregator_name, importance=cal.importance)


def text_or_image_options(backbone: Backbone, load_options: dict[str, Any] | None, *, max_length: int | None,
                          img_size: int | None) -> dict[str, Any]:
    """``load_options`` with the input size for the backbone's modality (tokens, or pixels per side)."""
    options = dict(load_options or {})
    if backbone.modality == "text" and max_length:
        options.setdefault("max_length", max_length)
    if backbone.modality == "image" and img_size:
        options.setdefault("img_size", img_size)
    return options


def run_calibrate(*, data: RawDataset, out: str | Path, backbone_name: str | None = None,
                  plan: str | Path | None = None, source: str | None = None,
                  devices: Sequence[str] | str = DEFAULT_DEVICES, aggregator_name: str = defaults.AGGREGATOR,
                  config: BoosterConfig | None = None, booster_overrides: dict[str, Any] | None = None,
                  max_length: int | None = None, img_size: int | None = None, layers: int | None = None,
                  seed: int = 0, progress: Callable[[str, int, int], None] | None = None,
                  compressed: bool = False) -> Path:
    """``coformer calibrate``: fit the teacher's head on ``data`` (cached), calibrate, package to ``out``.

    ``compressed`` also packages the single-model alternative (:func:`calibrate_compressed`) into
    ``out/compressed/``, which ``coformer bench`` runs beside CoFormer.

    Backbone, source and ``max_length`` default to what the plan recorded (``coformer plan``
    writes them); calibration runs on ``data`` (the command defaults it to the plan's ``dataset``).
    """
    doc = searched_plan(plan) if plan is not None else {}
    backbone_name = backbone_name or doc.get("backbone") or defaults.BACKBONE
    source = source or doc.get("source")
    backbone = registry.create("backbone", backbone_name)
    options = text_or_image_options(backbone, None, max_length=max_length or doc.get("max_length"),
                                    img_size=img_size)
    torch.manual_seed(seed)
    config = config or BoosterConfig.for_backbone(backbone, **{"seed": seed, **(booster_overrides or {})})
    teacher = prepare_teacher(backbone, data, source=source, seed=seed, load_options=options, progress=progress)
    cal = calibrate_stage(backbone, teacher, config=config, plan=plan, devices=devices, layers=layers,
                          aggregator_name=aggregator_name)
    record = plan_record(backbone_name, source, options, data, teacher)
    meta = {**record, "seed": seed,
            "booster": {k: str(v) for k, v in vars(config).items()}, "searched": _search_summary(doc),
            "figures": accuracy_figures(cal, teacher, aggregator_name)}
    shutil.rmtree(Path(out) / COMPRESSED_DIR, ignore_errors=True)  # never leave a stale one beside a new plan
    if compressed:
        alone = calibrate_compressed(backbone, teacher, cal, config, aggregator_name, layers=layers)
        with torch.inference_mode():
            alone_val = accuracy(alone.aggregator(alone.val_features), teacher.val.labels)
        package_stage(Path(out) / COMPRESSED_DIR, backbone, teacher, alone,
                      {**record, "figures": {"compressed": {"val_accuracy": round(alone_val, 2),
                                                            "device": alone.policy.devices[0].name}}})
    return package_stage(out, backbone, teacher, cal, meta)


def accuracy_figures(cal: Calibrated, teacher: Teacher, aggregator_name: str) -> dict[str, Any]:
    """Validation and test accuracy (%) of the teacher, each sub-model (its student head) and CoFormer."""
    def both(logits_of: Callable[[str], torch.Tensor]) -> dict[str, float]:
        with torch.inference_mode():
            return {"val_accuracy": round(accuracy(logits_of("val"), teacher.val.labels), 2),
                    "accuracy": round(accuracy(logits_of("test"), teacher.test.labels), 2)}

    features = {"val": cal.val_features, "test": cal.test_features}
    logits = {"val": teacher.val_logits, "test": teacher.test_logits}

    def student(n: int) -> Callable[[str], torch.Tensor]:
        return lambda split: cal.students[n](features[split][n])

    return {"teacher": both(lambda split: logits[split]),
            "submodels": [{"device": device.name, **both(student(n))} for n, device in enumerate(cal.policy.devices)],
            "coformer": {**both(lambda split: cal.aggregator(features[split])), "aggregator": aggregator_name}}


def _search_summary(doc: dict[str, Any]) -> dict[str, Any] | None:
    if not doc:
        return None
    return {k: doc[k] for k in ("strategy", "predicted", "delta", "validation") if k in doc}
