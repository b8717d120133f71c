"""An emulated cluster on one machine: ``coformer worker`` processes in network namespaces over shaped links.

(About 420 lines, over the layout's 400: creating and tearing down namespaces, links, cgroups and
workers share their naming and state file, and teardown must undo exactly what set-up made.)

Each worker gets

* its own network namespace, joined to the host by a veth pair with private 10.x addresses
  (traffic stays between this machine's own namespaces);
* a link shaped with ``tc qdisc … tbf rate R`` on *both* ends (coordinator → worker on the
  host end, worker → coordinator inside the namespace); this kernel has no netem;
* a cgroup v1 ``cpu`` group (``/sys/fs/cgroup/cpu/coformer-<name>``) whose
  ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` follow the chosen device profiles' GFLOPS ratios,
  scaled so the strongest device gets ``cores`` CPUs, with torch threads matched to its quota.
  The CFS period is one scheduler tick (:data:`~coformer.cpu_quota.CFS_PERIOD_US`, 4 ms): with
  a longer one a request that needs less CPU than one period's quota runs at full speed (at 10 ms a
  0.35-core "Nano" ran a 5.6 ms request at 0.41 of its ideal slowdown), so slow devices were not
  slow per request; a shorter one overshoots, as quotas are enforced at ticks. Requests under
  about one tick of CPU still run at full speed: the emulation's floor.

Workers serve with any transport that can (``transport``, default :data:`coformer.defaults.TRANSPORT`);
the transport says which URI reaches each one. Everything created is recorded in a JSON state file *as it is created*, so :func:`down`
removes every namespace, veth, qdisc, cgroup and process even after a failed :func:`up`.
All of it needs root and ``ip netns``; :func:`unavailable_reason` says why not, when not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from coformer.cpu_quota import CGROUP_CPU_ROOT, cfs_limit
from coformer.defaults import TRANSPORT
from coformer.online.serve import serving_transport
from coformer.spec import BUILTIN_DEVICES, DeviceProfile

DEFAULT_STATE = Path("/run/coformer/testbed.json")
WORKER_PORT = 50051


class TestbedError(RuntimeError):
    """The testbed could not be set up or torn down; the message names the failing step."""

    __test__ = False  # not a pytest test class


def unavailable_reason() -> str | None:
    """Why the testbed cannot run here (not root, no ``ip``/``tc``, no netns, no cgroup v1 cpu), or ``None``."""
    if os.geteuid() != 0:
        return "the emulated testbed needs root (network namespaces, tc and cgroups)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    if not (CGROUP_CPU_ROOT / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {CGROUP_CPU_ROOT}"
    return None


def parse_rate(rate: str | float | int) -> str:
    """Normalise a link rate to tc syntax: ``100`` / ``"100"`` / ``"100mbit"`` → ``"100mbit"``."""
    text = str(rate).strip().lower()
    if text.replace(".", "", 1).isdigit():
        text += "mbit"
    for unit in ("gbit", "mbit", "kbit"):
        if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).isdigit():
            return text
    raise ValueError(f"link rate {rate!r} not understood; use e.g. 2mbit, 100mbit, 1gbit or a number of Mbit/s")


def rate_bits(rate: str) -> float:
    """Bits per second of a tc rate string."""
    scale = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3}
    unit = next(u for u in scale if rate.endswith(u))
    return float(rate[: -len(unit)]) * scale[unit]


def cpu_limits(devices: Sequence[DeviceProfile], cores: float = 1.0) -> list[tuple[int, int]]:
    """Per device ``(quota_us, period_us)`` in the ratio of the devices' GFLOPS; strongest = ``cores`` CPUs."""
    if cores <= 0:
        raise ValueError(f"cores must be positive, got {cores}")
    top = max(d.gflops for d in devices)
    return [cfs_limit(cores * d.gflops / top) for d in devices]


@dataclass
class TestbedWorker:
    """One emulated device: namespace, veth pair, shaping, cgroup and worker process."""

    __test__ = False

    name: str
    device: str
    gflops: float
    rate: str
    namespace: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str
    port: int
    cgroup: str
    quota_us: int
    period_us: int
    threads: int
    pid: int | None = None
    log: str = ""
    created: list[str] = field(default_factory=list)
    transport: str = TRANSPORT

    @property
    def uri(self) -> str:
        """The worker's URI, as its transport forms it (reachable from the host namespace)."""
        return serving_transport(self.transport).worker_uri(self.ns_ip, self.port)


@dataclass
class Testbed:
    """A set of emulated devices and the file recording them."""

    __test__ = False

    state_file: Path
    prefix: str
    workers: list[TestbedWorker] = field(default_factory=list)

    @property
    def uris(self) -> list[str]:
        """The workers' URIs, in device order."""
        return [w.uri for w in self.workers]

    def save(self) -> None:
        """Write the state file (called after every step, so a failure can still be undone)."""
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        doc = {"prefix": self.prefix, "workers": [asdict(w) for w in self.workers]}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, state_file: str | Path) -> Testbed:
        """Read a state file written by :func:`up`."""
        path = Path(state_file)
        if not path.exists():
            raise TestbedError(f"no testbed state at {path}; run `coformer testbed up` first (or pass --state)")
        doc = json.loads(path.read_text())
        return cls(path, doc["prefix"], [TestbedWorker(**w) for w in doc["workers"]])


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise TestbedError(f"`{' '.join(cmd)}` failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


#: Two full-size Ethernet frames: tbf drops a packet larger than its bucket, so one frame is the floor.
MIN_TBF_BURST_BYTES = 2 * 1514


def tbf_burst_bytes(rate: str) -> int:
    """The tbf bucket for ``rate``: one 10 ms timer tick of traffic, at least two full-size frames.

    A full bucket passes its bytes at line rate, so a bigger one leaves small requests unshaped
    (a 16 KiB bucket let every request under 16 KiB cross a "2 Mbit/s" link in well under 1 ms).
    """
    return max(MIN_TBF_BURST_BYTES, int(rate_bits(rate) / 8 / 100))


def tbf_qdisc(rate: str) -> list[str]:
    """The ``tc qdisc`` arguments that shape a link to ``rate`` (both ends of every testbed link)."""
    return ["tbf", "rate", rate, "burst", str(tbf_burst_bytes(rate)), "latency", "200ms"]


def _worker_cmd(w: TestbedWorker) -> list[str]:
    # the token, if any, travels in the environment (COFORMER_TOKEN), never on the command line
    return ["ip", "netns", "exec", w.namespace, sys.executable, "-c",
           "from coformer.cli import main; main()", "worker", "--transport", w.transport,
           "--listen", f"{w.ns_ip}:{w.port}", "--threads", str(w.threads), "--name", w.name]


def up(devices: Sequence[str | DeviceProfile], rates: Sequence[str | float], *, prefix: str = "cf",
       state_file: str | Path = DEFAULT_STATE, subnet: int = 213, cores: float = 1.0,
       token: str | None = None, port: int = WORKER_PORT, start_timeout: float = 120.0,
       transport: str = TRANSPORT) -> Testbed:
    """Create one namespace + shaped veth + cgroup + ``coformer worker`` per device; returns the testbed.

    ``rates`` gives one link rate per device (or one for all). Worker ``i`` listens on
    ``10.<subnet>.<i>.2:<port>`` and serves with ``transport``, which must be one that serves
    (:class:`~coformer.online.serve.ServeUnsupportedError` otherwise). On failure everything
    created so far is removed. (64 lines: set-up and its rollback stay in one function, so that a
    failure at any step removes exactly what the steps before it created.)
    """
    serving_transport(transport)
    reason = unavailable_reason()
    if reason:
        raise TestbedError(reason)
    named = [BUILTIN_DEVICES[d] if isinstance(d, str) and d in BUILTIN_DEVICES else d for d in devices]
    profiles = [d for d in named if isinstance(d, DeviceProfile)]
    unknown = [d for d in named if not isinstance(d, DeviceProfile)]
    if unknown:
        raise ValueError(f"unknown devices {unknown}; built-in devices: {', '.join(BUILTIN_DEVICES)}")
    if not profiles:
        raise ValueError("the testbed needs at least one device")
    tc_rates = [parse_rate(r) for r in rates]
    if len(tc_rates) == 1:
        tc_rates *= len(profiles)
    if len(tc_rates) != len(profiles):
        raise ValueError(f"{len(tc_rates)} link rates for {len(profiles)} devices; give one per device or one for all")
    if not (0 < subnet < 256) or len(profiles) > 250:
        raise ValueError("subnet must be 1..255 and at most 250 devices")
    state_path = Path(state_file)
    if state_path.exists():
        raise TestbedError(f"{state_path} already describes a running testbed; run `coformer testbed down` first")
    limits = cpu_limits(profiles, cores)
    bed = Testbed(state_path, prefix)
    try:
        for i, (dev, rate, (quota, period)) in enumerate(zip(profiles, tc_rates, limits)):
            name = f"{prefix}{i}"
            w = TestbedWorker(
                name=name, device=dev.name, gflops=dev.gflops, rate=rate, namespace=f"coformer-{name}",
                host_if=f"{name}h", ns_if=f"{name}n", host_ip=f"10.{subnet}.{i}.1", ns_ip=f"10.{subnet}.{i}.2",
                port=port, cgroup=str(CGROUP_CPU_ROOT / f"coformer-{name}"), quota_us=quota,
                period_us=period, threads=max(1, round(quota / period)), transport=transport,
            )
            if len(w.host_if) > 15:
                raise ValueError(f"prefix {prefix!r} is too long for interface names (max 12 characters)")
            bed.workers.append(w)
            _create_network(bed, w)
            _create_cgroup(bed, w)
        for w in bed.workers:
            _start_worker(bed, w, token)
        for w in bed.workers:
            _wait_listening(w, start_timeout)
            # join the cgroup only once started, so the (CPU-heavy) python/torch start-up is not throttled
            Path(w.cgroup, "cgroup.procs").write_text(str(w.pid))
            w.created.append("cgroup-member")
            bed.save()
    except BaseException as exc:
        if state_path.exists():
            try:
                down(state_path)
            except TestbedError as cleanup:
                exc.add_note(f"cleanup after the failed `up` was incomplete: {cleanup}")
        raise
    return bed


def _create_network(bed: Testbed, w: TestbedWorker) -> None:
    _run("ip", "netns", "add", w.namespace)
    w.created.append("netns")
    bed.save()
    _run("ip", "link", "add", w.host_if, "type", "veth", "peer", "name", w.ns_if)
    w.created.append("veth")
    bed.save()
    _run("ip", "link", "set", w.ns_if, "netns", w.namespace)
    _run("ip", "addr", "add", f"{w.host_ip}/30", "dev", w.host_if)
    _run("ip", "link", "set", w.host_if, "up")
    _run("ip", "-n", w.namespace, "addr", "add", f"{w.ns_ip}/30", "dev", w.ns_if)
    _run("ip", "-n", w.namespace, "link", "set", w.ns_if, "up")
    _run("ip", "-n", w.namespace, "link", "set", "lo", "up")
    _run("tc", "qdisc", "add", "dev", w.host_if, "root", *tbf_qdisc(w.rate))
    _run("ip", "netns", "exec", w.namespace, "tc", "qdisc", "add", "dev", w.ns_if, "root", *tbf_qdisc(w.rate))
    w.created.append("qdisc")
    bed.save()


def _create_cgroup(bed: Testbed, w: TestbedWorker) -> None:
    cg = Path(w.cgroup)
    cg.mkdir(exist_ok=False)
    w.created.append("cgroup")
    bed.save()
    (cg / "cpu.cfs_period_us").write_text(str(w.period_us))
    (cg / "cpu.cfs_quota_us").write_text(str(w.quota_us))


def _start_worker(bed: Testbed, w: TestbedWorker, token: str | None) -> None:
    log_dir = bed.state_file.parent / f"{bed.prefix}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    w.log = str(log_dir / f"{w.name}.log")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if token:
        env["COFORMER_TOKEN"] = token
    with open(w.log, "wb") as log:
        # a new session: the workers outlive `coformer testbed up`; `ip netns exec` execs, so pid is the worker's
        proc = subprocess.Popen(_worker_cmd(w), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    w.pid = proc.pid
    w.created.append("process")
    bed.save()


def _wait_listening(w: TestbedWorker, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = Path(w.log).read_text(errors="replace") if Path(w.log).exists() else ""
        if "listening on" in text:
            return
        if w.pid is None or not _alive(w.pid):
            raise TestbedError(f"worker {w.name} exited during start-up; its log ({w.log}):\n{text[-2000:]}")
        time.sleep(0.1)
    raise TestbedError(f"worker {w.name} did not start listening within {timeout:.0f}s; see {w.log}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of this process counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def _is_our_worker(w: TestbedWorker) -> bool:
    # guard against a recycled pid: the process must be the worker we started, by its --name
    try:
        argv = Path(f"/proc/{w.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"worker" in argv and w.name.encode() in argv


def _stop_process(w: TestbedWorker) -> None:
    if w.pid is None:
        return
    if _alive(w.pid) and _is_our_worker(w):
        _terminate(w.pid)
    try:  # reap it if it is our child (tests call up/down in one process)
        os.waitpid(w.pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _terminate(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    for _ in range(50):
        if not _alive(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    for _ in range(50):
        if not _alive(pid):
            return
        time.sleep(0.1)


def down(state_file: str | Path = DEFAULT_STATE) -> list[str]:
    """Remove everything :func:`up` recorded; returns what is still left (empty on success).

    Raises :class:`TestbedError` listing leftovers if something could not be removed; the state
    file is then kept so ``down`` can be retried.
    """
    bed = Testbed.load(state_file)
    for w in bed.workers:
        # remove only what this testbed recorded creating, never a same-named object it found
        if "process" in w.created:
            _stop_process(w)
        if "cgroup" in w.created and Path(w.cgroup).exists():
            try:
                Path(w.cgroup).rmdir()
            except OSError:
                time.sleep(0.5)  # the killed process may still be leaving the group
                Path(w.cgroup).rmdir()
        if "veth" in w.created:
            _run("tc", "qdisc", "del", "dev", w.host_if, "root", check=False)
            _run("ip", "link", "del", w.host_if, check=False)
        if "netns" in w.created:
            _run("ip", "netns", "del", w.namespace, check=False)
    leftovers = leftovers_of(bed)
    if leftovers:
        raise TestbedError(f"`down` left these behind: {', '.join(leftovers)}; state kept in {bed.state_file}")
    logs = {Path(w.log).parent for w in bed.workers if w.log}
    for w in bed.workers:
        if w.log:
            Path(w.log).unlink(missing_ok=True)
    for d in logs:
        if d.exists() and not any(d.iterdir()):
            d.rmdir()
    bed.state_file.unlink(missing_ok=True)
    return leftovers


def leftovers_of(bed: Testbed) -> list[str]:
    """Which of the testbed's namespaces, links, qdiscs, cgroups and processes still exist."""
    namespaces = set(_run("ip", "netns", "list", check=False).stdout.split())
    out = []
    for w in bed.workers:
        if "netns" in w.created and w.namespace in namespaces:
            out.append(f"netns {w.namespace}")
        if "veth" in w.created:
            for _ in range(20):  # veth removal after netns deletion is asynchronous
                if _run("ip", "link", "show", w.host_if, check=False).returncode != 0:
                    break
                time.sleep(0.1)
            else:
                out.append(f"link {w.host_if}")
            if "tbf" in _run("tc", "qdisc", "show", "dev", w.host_if, check=False).stdout:
                out.append(f"qdisc on {w.host_if}")
        if "cgroup" in w.created and Path(w.cgroup).exists():
            out.append(f"cgroup {w.cgroup}")
        if "process" in w.created and w.pid is not None and _alive(w.pid) and _is_our_worker(w):
            out.append(f"process {w.pid} ({w.name})")
    return out


def status(state_file: str | Path = DEFAULT_STATE, *, timeout: float = 2.0) -> list[dict[str, Any]]:
    """Per worker: device, link rate, quota, pid alive, and its health over its transport (or the error)."""
    import coformer

    bed = Testbed.load(state_file)
    rows = []
    for w in bed.workers:
        row: dict[str, Any] = {"name": w.name, "device": w.device, "uri": w.uri, "rate": w.rate,
                               "cpu": f"{w.quota_us / w.period_us:.3f}", "threads": w.threads, "pid": w.pid,
                               "alive": bool(w.pid and _alive(w.pid))}
        try:
            client = coformer.open_transport(w.uri)
            try:
                row["health"] = client.health(timeout=timeout)
            finally:
                client.close()
        except Exception as exc:  # noqa: BLE001 - status reports, never raises, per worker
            row["health"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
    return rows
