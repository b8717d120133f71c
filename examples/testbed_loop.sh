#!/usr/bin/env bash
# The paper's loop, run for real on the emulated testbed (needs root: namespaces, tc, cgroup v1 cpu).
#
#   1. profile: bring up the testbed; each emulated device is a `coformer worker` inside its own
#      network namespace and CPU-quota cgroup; `coformer profile --worker` times a pool of sub-model
#      shapes *on that worker* (the compute time it reports) and trains the device's latency
#      predictor, printing held-out MAPE (also in OUT/profiles/<device>-predictor-report.json)
#   2. plan:      `coformer plan` with those predictors (t1 = "predictor", not the FLOPs estimate),
#                 the probe accuracy proxy and the runtime's topology (a separate coordinator)
#   3. calibrate + package the planned policy: `coformer demo --plan` (deploys the plan's importance)
#   4. bench:     `coformer bench --testbed` brings the testbed up again with the plan's devices and
#                 the same --cores, at 2 Mb/s and 1 Gb/s
#   5. compare:   the plan's predicted T against the bench's measured medians (target within 20%)
#   6. calibrate + package the GFLOPS-proportional policy (`coformer demo --layers 2`, the README's)
#   7. bench it the same way, then one table of planned vs proportional vs compressed vs teacher
#
# Run it on a quiet machine (timings on a shared CPU are inflated):
#   sudo bash examples/testbed_loop.sh runs/testbed-loop
# Knobs (environment): DEVICES, CORES, SHAPES, REPEATS, STATISTIC, TRIALS, DELTA, PLAN_RATE, RATES, LAYERS, PY, OUT (or the first argument).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICES=${DEVICES:-jetson-nano,jetson-tx2,orin-nano}
CORES=${CORES:-1.0}
SHAPES=${SHAPES:-40}
# many repeats, averaged: under a quota a small request either fits in the current tick or waits a
# period, so a few repeats' median flips between the two
REPEATS=${REPEATS:-40}
STATISTIC=${STATISTIC:-mean}
TRIALS=${TRIALS:-30}
DELTA=${DELTA:-0.5}
PLAN_RATE=${PLAN_RATE:-2}
RATES=${RATES:-2,1000}
LAYERS=${LAYERS:-2}
PY=${PY:-.venv/bin/python}
OUT=${1:-${OUT:-runs/testbed-loop}}
STATE="$OUT/profile-testbed.json"

cf() { "$PY" -m coformer "$@"; }

reason=$("$PY" -c 'from coformer.experiments.testbed import unavailable_reason as r; print(r() or "")')
if [[ -n "$reason" ]]; then
  echo "testbed unavailable: $reason" >&2
  exit 2
fi
mkdir -p "$OUT/profiles"
trap 'cf testbed down --state "$STATE" >/dev/null 2>&1 || true' EXIT

echo "== 1. profile each device through its worker, under its testbed CPU quota"
cf testbed up --devices "$DEVICES" --cores "$CORES" --rate 1000mbit --state "$STATE"
IFS=, read -ra DEVS <<< "$DEVICES"
for i in "${!DEVS[@]}"; do
  dev=${DEVS[$i]}
  # the worker's URI as its transport forms it (the testbed records which transport serves it)
  uri=$("$PY" -c "import sys; from coformer.experiments.testbed import Testbed; print(Testbed.load(sys.argv[1]).uris[$i])" "$STATE")
  cf profile --device-name "$dev" --worker "$uri" --shapes "$SHAPES" --repeats "$REPEATS" --statistic "$STATISTIC" --out "$OUT/profiles/$dev.json"
done
cf testbed down --state "$STATE"
"$PY" - "$OUT/profiles" <<'PYEOF'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*-predictor-report.json")):
    r = json.loads(f.read_text())
    print(f"held-out MAPE {r['device']}: predictor {r['predictor']['mape_pct']:.1f}% "
          f"(FLOPs baseline {r['flops_baseline']['mape_pct']:.1f}%) on {r['held_out_shapes']} shapes")
PYEOF

echo "== 2. plan with the learned predictors"
cf plan --devices "$DEVICES" --predictors "$OUT/profiles" --link-mbps "$PLAN_RATE" --delta "$DELTA" \
  --trials "$TRIALS" --proxy probe --topology coordinator --out "$OUT/plan"

echo "== 3. calibrate and package the planned policy"
cf demo --plan "$OUT/plan" --out "$OUT/deployed" --json "$OUT/demo.json"

echo "== 4. bench on the testbed"
cf bench --plan "$OUT/deployed" --testbed --cores "$CORES" --link-mbps "$RATES" --out "$OUT/bench"

echo "== 5. predicted T vs measured"
"$PY" examples/predicted_vs_measured.py "$OUT/plan/plan.json" "$OUT/bench/bench.json" || true

echo "== 6. calibrate and package the proportional policy ($LAYERS layers per sub-model)"
cf demo --layers "$LAYERS" --out "$OUT/proportional" --json "$OUT/proportional.json"

echo "== 7. bench it on the testbed the same way; the table of planned vs proportional vs compressed vs teacher"
cf bench --plan "$OUT/proportional" --testbed --cores "$CORES" --link-mbps "$RATES" --out "$OUT/proportional-bench"
"$PY" examples/loop_table.py "$OUT"
