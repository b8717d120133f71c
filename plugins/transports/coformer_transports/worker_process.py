"""Run ``coformer worker`` as a child process and watch it (tests, benchmarks, scripts).

Everything binds 127.0.0.1 unless told otherwise; every wait is bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def start_worker(*args: str, listen: str = "127.0.0.1:0", transport: str = "grpc", env: dict[str, str] | None = None,
                 startup_timeout_s: float = 60.0) -> tuple[subprocess.Popen[str], str]:
    """Start ``coformer worker --transport TRANSPORT --listen LISTEN ARGS…``; returns the process and its URI.

    Raises :class:`RuntimeError` with the worker's output if it does not announce itself in time.
    """
    cmd = [sys.executable, "-c", "from coformer.cli import main; main()", "worker", "--transport", transport,
           "--listen", listen, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    end = time.monotonic() + startup_timeout_s
    line = ""
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if "listening on" in line or not line:
            break
    if "listening on" not in line:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise RuntimeError(f"worker did not start: {line}{err}")
    return proc, line.split("listening on ")[1].split()[0]


def stop_worker(proc: subprocess.Popen[str], timeout_s: float = 10.0) -> int:
    """Kill a worker if it still runs and reap it; returns its exit code."""
    if proc.poll() is None:
        proc.kill()
    try:
        return proc.wait(timeout=timeout_s)
    finally:
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _status_field(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field} (not Linux?)")


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` now (Linux)."""
    return _status_field(pid, "VmRSS")


def peak_rss_bytes(pid: int) -> int:
    """Peak resident set size of process ``pid`` since it started (Linux ``VmHWM``)."""
    return _status_field(pid, "VmHWM")


def reset_peak_rss(pid: int) -> None:
    """Reset ``VmHWM`` of process ``pid`` to its current RSS, so :func:`peak_rss_bytes` covers what follows (Linux)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
