"""How faithfully a cgroup v1 CPU quota slows a request down, for several CFS periods (needs root).

The testbed emulates a slow device by giving its worker a share of one core
(``cpu.cfs_quota_us / cpu.cfs_period_us``). Ideally a request then takes ``1 / share`` times its
unthrottled time whatever its size. This script times single-threaded matmul requests of several
sizes, arriving at random phases (5–30 ms apart, as requests do), unthrottled and under each
(share, period), and prints the slowdown against the ideal. It chose
:data:`coformer.cpu_quota.CFS_PERIOD_US`.

    sudo .venv/bin/python examples/cfs_period.py --shares 0.3543,0.9615 --periods 1000,2823,4000,5000,10000

Run it on a quiet machine: every figure is a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

from coformer.cpu_quota import CGROUP_CPU_ROOT, MIN_QUOTA_US

SIZES = (96, 160, 224, 320, 448)
CHILD = "--child"


def time_requests(repeats: int) -> dict[int, float]:
    """Median ms of 8 matmuls per request, per matrix size, with random gaps between requests."""
    import torch

    torch.set_num_threads(1)
    medians = {}
    for n in SIZES:
        a, b = torch.randn(n, n), torch.randn(n, n)
        times = []
        for _ in range(repeats):
            time.sleep(random.uniform(0.005, 0.03))
            start = time.perf_counter()
            for _ in range(8):
                a @ b
            times.append((time.perf_counter() - start) * 1e3)
        medians[n] = statistics.median(times)
    return medians


def run_under(quota_us: int, period_us: int, repeats: int) -> dict[int, float]:
    """Run :func:`time_requests` in a child process placed in a fresh cgroup with this quota."""
    group = CGROUP_CPU_ROOT / f"coformer-cfs-period-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text(str(period_us))
        (group / "cpu.cfs_quota_us").write_text(str(quota_us))
        child = subprocess.Popen([sys.executable, __file__, CHILD, str(repeats)], stdout=subprocess.PIPE,
                                 stdin=subprocess.PIPE, text=True)
        (group / "cgroup.procs").write_text(str(child.pid))
        out, _ = child.communicate("go\n")  # the child waits for this, so it starts inside the group
        return {int(k): v for k, v in json.loads(out).items()}
    finally:
        group.rmdir()


def main() -> None:
    """Parse the sweep, run it, print a markdown table of slowdown against 1/share."""
    if len(sys.argv) == 3 and sys.argv[1] == CHILD:
        sys.stdin.readline()
        print(json.dumps(time_requests(int(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shares", default="0.3543,0.9615", help="CPU shares to emulate")
    parser.add_argument("--periods", default="1000,2823,4000,5000,10000", help="CFS periods (µs) to try")
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    free = run_under(-1, 100_000, args.repeats)
    print("| share | period µs | " + " | ".join(f"{free[n]:.1f} ms request" for n in SIZES) + " |")
    print("|---|---|" + "---|" * len(SIZES))
    for share in (float(s) for s in args.shares.split(",")):
        for period in (int(p) for p in args.periods.split(",")):
            quota = round(period * share)
            if quota < MIN_QUOTA_US:
                continue
            got = run_under(quota, period, args.repeats)
            cells = [f"{got[n] / free[n] * share:.2f}" for n in SIZES]
            print(f"| {share} | {period} | " + " | ".join(cells) + " |")
    print("\ncells: measured slowdown x share (1.00 = the ideal 1/share slowdown)")


if __name__ == "__main__":
    main()
