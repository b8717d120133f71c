"""Predicted T of a ``coformer plan`` against CoFormer's median end-to-end latency in a ``coformer bench`` run.

    .venv/bin/python examples/predicted_vs_measured.py PLAN_DIR/plan.json BENCH_DIR/bench.json

Prints one row per link rate (predicted, measured, measured/predicted) and exits 1 if any rate
is outside the 20% target. Needs a quiet machine for the bench figures to mean anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from coformer.offline.latency_check import TOLERANCE, compare


def main() -> int:
    """Print the comparison; non-zero exit when a rate misses the tolerance."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan", type=Path, help="plan.json written by `coformer plan`")
    ap.add_argument("bench", type=Path, help="bench.json written by `coformer bench`")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE)
    args = ap.parse_args()
    rows = compare(json.loads(args.plan.read_text()), json.loads(args.bench.read_text()), tolerance=args.tolerance)
    print(f"{'rate Mb/s':>10} {'predicted ms':>13} {'measured ms':>12} {'ratio':>6}  within ±{args.tolerance:.0%}")
    for r in rows:
        print(f"{r['rate_mbps']:>10g} {r['predicted_ms']:>13.2f} {r['measured_median_ms']:>12.2f} "
              f"{r['ratio']:>6.2f}  {'yes' if r['within'] else 'NO'}")
    return 0 if all(r["within"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
