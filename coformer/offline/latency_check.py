"""Predicted T (a ``coformer plan`` document) against end-to-end latency measured by ``coformer bench``.

The plan stores, per device, the predicted compute t1 and the bytes its link carries per
request; T at any link rate r is therefore max_n(t0_n + t1_n + bytes_n·8/r) + t3 (t0: the
runtime's fixed cost per call, when the device was profiled through its worker), re-evaluated at each
rate the bench measured and compared with CoFormer's median there.
"""

from __future__ import annotations

from typing import Any, Mapping

#: Target of issue 12: predicted vs measured end-to-end median within 20%.
TOLERANCE = 0.20


def predicted_T_ms(predicted: Mapping[str, Any], rate_mbps: float) -> float:
    """T (ms) of a plan's ``predicted`` components with every link at ``rate_mbps``."""
    devices = predicted.get("devices")
    if not isinstance(devices, list) or any(d.get("wire_bytes") is None for d in devices):
        raise ValueError("the plan's 'predicted' entry has no per-device wire_bytes; it was written before the "
                         "latency model became the runtime's — re-run `coformer plan`")
    worst = max(d.get("t0_ms", 0.0) + d["t1_ms"] + d["wire_bytes"] * 8 / (rate_mbps * 1e6) * 1000.0
                for d in devices)
    return worst + float(predicted["t3_ms"])


def compare(plan_doc: Mapping[str, Any], bench_doc: Mapping[str, Any], *, method: str = "coformer",
            tolerance: float = TOLERANCE) -> list[dict[str, Any]]:
    """One row per benched rate: predicted T, measured median, measured / predicted and whether within tolerance."""
    if "predicted" not in plan_doc:
        raise ValueError("not a `coformer plan` document: no 'predicted' entry (pass OUT/plan.json of `coformer plan`)")
    runs = [r for r in bench_doc.get("runs", []) if r.get("method") == method]
    if not runs:
        raise ValueError(f"the bench document has no runs of method {method!r}; was it written by `coformer bench`?")
    rows = []
    for r in sorted(runs, key=lambda r: r["rate_mbps"]):
        pred = predicted_T_ms(plan_doc["predicted"], float(r["rate_mbps"]))
        measured = float(r["latency_ms"]["median"])
        ratio = measured / pred
        rows.append({"rate_mbps": r["rate_mbps"], "link": r.get("link"), "predicted_ms": pred,
                     "measured_median_ms": measured, "ratio": ratio, "within": abs(ratio - 1.0) <= tolerance})
    return rows
