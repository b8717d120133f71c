"""The ``compressed`` alternative: one sub-model sliced from the teacher for the strongest device alone.

What a user would pick instead of CoFormer, so it gets the same care as CoFormer's policy:

* its shape comes from the same rule as the CoFormer policy, with N = 1 device: the
  proportional sizing rule (with the same ``--layers``) for a proportional policy, or the same
  search strategy, δ, link rate, trial count and validation size for a ``coformer plan`` policy;
* it is calibrated with the same booster settings and epochs, and its head/aggregator is
  trained the same way (:func:`coformer.experiments.demo.calibrate_policy` does both);
* it is packaged as a one-sub-model plan directory ``<plan dir>/compressed/`` next to the plan,
  which ``coformer bench`` deploys alone on the strongest device's worker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from coformer.backbone import Backbone
from coformer.offline.decompose import proportional_specs
from coformer.offline.pipeline import Teacher
from coformer.spec import DeviceProfile, Policy, strongest_index

#: Where the compressed plan sits inside a plan directory.
COMPRESSED_DIR = "compressed"


def strongest_device(devices: Sequence[DeviceProfile]) -> DeviceProfile:
    """The device with the most compute (GFLOPS): where the teacher and ``compressed`` run alone."""
    return devices[strongest_index(devices)]


def search_settings(plan_dir: str | Path) -> dict[str, Any] | None:
    """The search that produced a ``coformer plan`` directory's policy, or None if it was not searched."""
    doc = json.loads((Path(plan_dir) / "plan.json").read_text())
    if "strategy" not in doc:
        return None
    trials = sum(1 for t in doc.get("trials", []) if t.get("feasible"))
    return {"strategy": doc["strategy"], "delta": doc.get("delta", 0.5), "link_mbps": doc.get("link_mbps"),
            "trials": max(1, trials), "val_docs": (doc.get("validation") or {}).get("val_docs"),
            "seed": doc.get("seed", 0)}


def compressed_policy(backbone: Backbone, teacher: Teacher, devices: Sequence[DeviceProfile], *,
                      layers: int | None = None, search: dict[str, Any] | None = None) -> Policy:
    """One sub-model for the strongest of ``devices``, shaped by the same rule as the CoFormer policy.

    ``search`` (from :func:`search_settings`) reruns that search with N = 1 on the teacher's
    validation split; without it the proportional rule gives the device the whole width, with
    ``layers`` of the teacher's layers (all when None).
    """
    device = strongest_device(devices)
    shape = backbone.shape(teacher.model)
    if search is None:
        specs = proportional_specs(shape, [device.gflops], layers=layers)
        note = "compressed: proportional rule, N = 1" + (f", {layers} layers" if layers else "")
        return Policy(specs, [device], {"source": note})
    import coformer
    from coformer.offline.evaluator import Evaluator
    from coformer.offline.profiler import reference_input

    val = teacher.val
    if search.get("val_docs"):
        val = val.subset(range(min(int(search["val_docs"]), len(val))))
    evaluator = Evaluator(backbone, teacher.model, [device], val=val, delta=float(search["delta"]),
                          link_mbps=search.get("link_mbps"), cost_batch=reference_input(backbone, teacher.model))
    strategy = coformer.create_search_strategy(search["strategy"], seed=int(search.get("seed", 0)))
    policy = strategy.search(evaluator, int(search["trials"])).best_policy
    policy.meta.update({"source": f"compressed: {search['strategy']} search, N = 1, {search['trials']} trials",
                        "strategy": search["strategy"]})
    return policy
