"""The bench's outputs: ``bench.json``, a markdown table of the main figures, and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from coformer.experiments.bench import METHODS


def markdown_table(doc: dict[str, Any]) -> str:
    """A markdown table of the main figures, one row per method and rate."""
    lines = ["| rate (Mb/s) | link | method | devices | median ms | p90 ms | speed-up | compute ms | wire ms (model) "
             "| overhead ms | overhead % | ser. + RPC ms (%) | KB/request | energy J (est.) | accuracy % "
             "| peak module MB/device |",
             "|" + "---|" * 16]
    for r in doc["runs"]:
        acc = doc["accuracy"][r["method"]]["accuracy"]
        mem = max(r["module_memory_bytes"].values()) / 2**20
        b = r["breakdown_ms"]
        lines.append(
            f"| {r['rate_mbps']:g} | {r['link']} | {r['method']} | {len(r['devices'])} | {r['latency_ms']['median']:.1f} "
            f"| {r['latency_ms']['p90']:.1f} | {r['speedup_vs_teacher']:.2f}× | {b['compute']:.1f} "
            f"| {b['wire_modelled']:.1f} | {b['overhead']:.1f} | {100 * r['overhead_share']:.0f} "
            f"| {b['serialize']:.2f} + {b['rpc']:.2f} ({100 * r['runtime_share']:.1f}%) "
            f"| {r['bytes_per_request'] / 1024:.1f} | {r['energy_j_estimate']:.3f} | {acc:.2f} | {mem:.1f} |")
    lines.append("")
    for k, v in doc["accuracy"].items():
        lines.append(f"- accuracy of {k}: {v['accuracy']:.2f}% ({v['source']})")
    for k, v in doc.get("skipped_methods", {}).items():
        lines.append(f"- {k}: not run ({v})")
    for k, v in doc["notes"].items():
        lines.append(f"- {k}: {v}")
    if "device_count" in doc:
        lines += ["", "| CoFormer devices | devices | rate (Mb/s) | median ms | p90 ms | KB/request "
                  "| energy J (est.) | accuracy % |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in doc["device_count"]:
            lines.append(f"| {len(r['devices'])} | {', '.join(r['devices'])} | {r['rate_mbps']:g} "
                         f"| {r['latency_ms']['median']:.1f} | {r['latency_ms']['p90']:.1f} "
                         f"| {r['bytes_per_request'] / 1024:.1f} | {r['energy_j_estimate']:.3f} | "
                         + (f"{r['accuracy']:.2f} |" if r.get("calibrated", True) else "n/a (uncalibrated plan) |"))
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], out: Path) -> list[Path]:
    """Stacked latency breakdown per method and rate, and accuracy vs latency; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
    rates = sorted({r["rate_mbps"] for r in runs})
    fig, axes = plt.subplots(1, len(rates), figsize=(4 * len(rates), 4), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        rows = [r for r in runs if r["rate_mbps"] == rate]
        names = [r["method"] for r in rows]
        bottom = [0.0] * len(rows)
        for part, color in (("compute", "tab:blue"), ("wire_modelled", "tab:orange"), ("overhead", "tab:gray")):
            vals = [max(0.0, r["breakdown_ms"][part]) for r in rows]
            ax.bar(names, vals, bottom=bottom, label=part.replace("_", " "), color=color)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(f"{rate:g} Mbit/s ({rows[0]['link']})")
        ax.set_ylabel("median latency (ms)")
        ax.set_yscale("log" if max(bottom) > 50 * max(min(bottom), 1e-3) else "linear")
        ax.tick_params(axis="x", rotation=30)
    axes[0][0].legend()
    fig.tight_layout()
    p1 = out / "latency_breakdown.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in METHODS:
        rows = [r for r in runs if r["method"] == name]
        if not rows:
            continue
        acc = doc["accuracy"][name]["accuracy"]
        ax.plot([r["latency_ms"]["median"] for r in rows], [acc] * len(rows), "o-", label=name)
        for r in rows:
            ax.annotate(f"{r['rate_mbps']:g}", (r["latency_ms"]["median"], acc), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("median end-to-end latency (ms, log); labels: link Mbit/s")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    fig.tight_layout()
    p2 = out / "accuracy_vs_latency.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]


def write_outputs(doc: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """``bench.json``, ``bench.md`` and the PNG plots in ``out``."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "bench.json").write_text(json.dumps(doc, indent=2, default=float))
    (path / "bench.md").write_text(markdown_table(doc))
    pngs = plot(doc, path)
    return {"json": path / "bench.json", "table": path / "bench.md", "breakdown": pngs[0], "accuracy": pngs[1]}
