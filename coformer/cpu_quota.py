"""CPU shares as cgroup v1 ``cpu`` quotas: the profiler's ``--cpu-quota`` and the testbed's emulated devices."""

from __future__ import annotations

from pathlib import Path

CGROUP_CPU_ROOT = Path("/sys/fs/cgroup/cpu")
# One scheduler tick at HZ=250: the kernel notices an exhausted quota only at a tick, so a shorter
# period overshoots (2.8 ms: a 0.96-core device 1.37x too slow on a 14 ms request) and a longer one
# lets requests that fit in one period's quota run at full speed (10 ms: a 0.35-core device ran a
# 5.6 ms request at 0.41 of its ideal slowdown, 4 ms: 0.69). examples/cfs_period.py, BENCHMARKS 2026-12-02.
CFS_PERIOD_US = 4_000
MIN_QUOTA_US = 1_000  # the kernel's lower bound for cpu.cfs_quota_us


def cfs_limit(cores: float, period_us: int = CFS_PERIOD_US) -> tuple[int, int]:
    """``(cfs_quota_us, cfs_period_us)`` for a share of ``cores`` CPUs.

    The period is ``period_us`` unless the quota would fall below the kernel's 1 ms floor; then
    the period grows so the quota is exactly 1 ms and the share is kept.
    """
    if not cores > 0:
        raise ValueError(f"a CPU share must be positive, got {cores}")
    period = max(period_us, round(MIN_QUOTA_US / cores))
    return max(MIN_QUOTA_US, round(period * cores)), period
