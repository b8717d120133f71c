"""Core value types: model shapes, sub-model specs, policies, device profiles; constraints C1–C6.

Notation follows the seed paper: a teacher of shape {L, d, h, D} is decomposed into N
sub-models C_n = (l_n, d_n, h_n[1..l_n], D_n[1..l_n]).

(About 430 lines, over the layout's 400: the value types and the constraint checks that read
them change together, and every layer imports them from this one bottom module.)
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

GB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """The decomposable dimensions of a teacher: {L, d, h[1..L], D[1..L]}.

    ``head_group`` is the number of query heads that must stay together (grouped-query
    attention shares one key/value head between them); heads are assigned in whole groups.
    ``channel_group`` is the number of embedding channels that must stay together: a Swin's
    last-stage channels map ``C_last / C_s`` to one stage-``s`` channel, so sub-models are dealt
    whole groups of ``C_last / C_1`` and stay disjoint in every stage (C2 per stage).
    """

    layers: int
    embed_dim: int
    heads: tuple[int, ...]
    mlp: tuple[int, ...]
    head_dim: int
    head_group: int = 1
    channel_group: int = 1

    def __post_init__(self) -> None:
        if len(self.heads) != self.layers or len(self.mlp) != self.layers:
            raise ValueError(
                f"ModelShape: heads ({len(self.heads)}) and mlp ({len(self.mlp)}) need one entry "
                f"per layer ({self.layers})"
            )
        if self.channel_group < 1 or self.embed_dim % self.channel_group:
            raise ValueError(f"ModelShape: channel_group {self.channel_group} must divide embed_dim {self.embed_dim}")

    @property
    def uniform_layers(self) -> bool:
        """Whether every layer has the same heads and MLP width (then which layers a sub-model keeps
        does not change its sizes or costs)."""
        return len(set(self.heads)) <= 1 and len(set(self.mlp)) <= 1

    def full_spec(self) -> SubModelSpec:
        """The spec that keeps every unit: it must reproduce the teacher exactly."""
        return SubModelSpec(self.layers, self.embed_dim, self.heads, self.mlp)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelShape:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "heads": tuple(data["heads"]), "mlp": tuple(data["mlp"])})


@dataclass(frozen=True)
class SubModelSpec:
    """C_n: layers kept, embedding channels kept, heads and MLP neurons kept per kept layer."""

    layers: int
    embed_dim: int
    heads: tuple[int, ...]
    mlp: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        object.__setattr__(self, "mlp", tuple(int(m) for m in self.mlp))
        if self.layers < 1:
            raise ValueError(f"SubModelSpec: needs at least one layer, got {self.layers}")
        if self.embed_dim < 1:
            raise ValueError(f"SubModelSpec: embed_dim must be positive, got {self.embed_dim}")
        if len(self.heads) != self.layers or len(self.mlp) != self.layers:
            raise ValueError(
                f"SubModelSpec: heads ({len(self.heads)}) and mlp ({len(self.mlp)}) need one "
                f"entry per kept layer ({self.layers})"
            )
        if any(h < 1 for h in self.heads) or any(m < 1 for m in self.mlp):
            raise ValueError("SubModelSpec: every kept layer needs at least one head and one MLP neuron")

    @property
    def mean_heads(self) -> float:
        """Mean heads per layer (a latency-predictor input)."""
        return sum(self.heads) / self.layers

    @property
    def mean_mlp(self) -> float:
        """Mean MLP width per layer (a latency-predictor input)."""
        return sum(self.mlp) / self.layers

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"layers": self.layers, "embed_dim": self.embed_dim,
                "heads": list(self.heads), "mlp": list(self.mlp)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubModelSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(int(data["layers"]), int(data["embed_dim"]), tuple(data["heads"]), tuple(data["mlp"]))

    @classmethod
    def uniform(cls, layers: int, embed_dim: int, heads: int, mlp: int) -> SubModelSpec:
        """A spec with the same heads and MLP width in every layer."""
        return cls(layers, embed_dim, (heads,) * layers, (mlp,) * layers)


@dataclass(frozen=True)
class UnitSelection:
    """Which teacher units one sub-model keeps, by index (the result of unit assignment).

    ``layers`` are teacher layer indices in ascending order; ``heads[k]`` and ``mlp[k]`` are
    indices into teacher layer ``layers[k]``; ``channels`` index the embedding dimension.
    """

    layers: tuple[int, ...]
    channels: tuple[int, ...]
    heads: tuple[tuple[int, ...], ...]
    mlp: tuple[tuple[int, ...], ...]

    @property
    def spec(self) -> SubModelSpec:
        """The sizes this selection has."""
        return SubModelSpec(len(self.layers), len(self.channels),
                            tuple(len(h) for h in self.heads), tuple(len(m) for m in self.mlp))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"layers": list(self.layers), "channels": list(self.channels),
                "heads": [list(h) for h in self.heads], "mlp": [list(m) for m in self.mlp]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnitSelection:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(data["layers"]), tuple(data["channels"]),
                   tuple(tuple(h) for h in data["heads"]), tuple(tuple(m) for m in data["mlp"]))

    @classmethod
    def full(cls, shape: ModelShape) -> UnitSelection:
        """Keep every unit of ``shape``."""
        return cls(tuple(range(shape.layers)), tuple(range(shape.embed_dim)),
                   tuple(tuple(range(h)) for h in shape.heads),
                   tuple(tuple(range(m)) for m in shape.mlp))


@dataclass(frozen=True)
class DeviceProfile:
    """What one device offers: memory (Φ), compute rate, power, and its per-request FLOPs budget (Ω).

    ``flops_budget_g`` is Ω_n in GFLOPs per inference; by default the work the device can do
    in ``latency_budget_ms``.
    """

    name: str
    memory_gb: float
    gflops: float
    power_w: float
    latency_budget_ms: float = 100.0
    flops_budget_g: float | None = None
    link_mbps: float = 1000.0

    @property
    def memory_bytes(self) -> int:
        """Φ_n in bytes."""
        return int(self.memory_gb * GB)

    @property
    def flops_budget(self) -> float:
        """Ω_n in FLOPs per inference."""
        if self.flops_budget_g is not None:
            return self.flops_budget_g * 1e9
        return self.gflops * 1e9 * self.latency_budget_ms / 1000.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


#: The seed paper's devices (Table VII).
BUILTIN_DEVICES: dict[str, DeviceProfile] = {
    d.name: d
    for d in (
        DeviceProfile("jetson-nano", memory_gb=4, gflops=235.8, power_w=10),
        DeviceProfile("jetson-tx2", memory_gb=8, gflops=665.6, power_w=15),
        DeviceProfile("orin-nano", memory_gb=4, gflops=640.0, power_w=10),
        DeviceProfile("rpi4b", memory_gb=8, gflops=13.5, power_w=7.3),
    )
}


def load_devices(source: str | Path) -> list[DeviceProfile]:
    """Device profiles from a TOML or JSON file: ``[[device]]`` tables / a ``devices`` list.

    Each entry needs ``name``, ``memory_gb``, ``gflops`` and ``power_w``; the other
    :class:`DeviceProfile` fields are optional.
    """
    path = Path(source)
    text = path.read_text()
    data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    entries = data.get("device") or data.get("devices") if isinstance(data, dict) else data
    if not entries:
        raise ValueError(f"{path}: no devices found; expected [[device]] tables or a 'devices' list")
    known = set(DeviceProfile.__dataclass_fields__)
    devices = []
    for i, entry in enumerate(entries):
        unknown = set(entry) - known
        missing = {"name", "memory_gb", "gflops", "power_w"} - set(entry)
        if unknown or missing:
            raise ValueError(
                f"{path}: device #{i} "
                + (f"has unknown fields {sorted(unknown)} " if unknown else "")
                + (f"lacks {sorted(missing)} " if missing else "")
                + f"(fields: {sorted(known)})"
            )
        devices.append(DeviceProfile(**entry))
    return devices


def strongest_index(devices: Sequence[DeviceProfile]) -> int:
    """Index of the device with the most compute (GFLOPS; the first on a tie): where a single model runs."""
    if not devices:
        raise ValueError("no devices: a policy needs at least one")
    return max(range(len(devices)), key=lambda i: devices[i].gflops)


def resolve_devices(names_or_file: str | Sequence[str]) -> list[DeviceProfile]:
    """Built-in device names (comma-separated or a list) or a path to a TOML/JSON file."""
    if isinstance(names_or_file, str):
        if Path(names_or_file).suffix in {".toml", ".json"}:
            return load_devices(names_or_file)
        names_or_file = [n.strip() for n in names_or_file.split(",") if n.strip()]
    devices = []
    for name in names_or_file:
        if name not in BUILTIN_DEVICES:
            raise ValueError(
                f"unknown device {name!r}; built-in devices: {', '.join(BUILTIN_DEVICES)} "
                f"(or pass a .toml/.json file of device profiles)"
            )
        devices.append(BUILTIN_DEVICES[name])
    return devices


@dataclass
class Policy:
    """A decomposition policy C = {C_1..C_N} and the device each sub-model runs on."""

    specs: list[SubModelSpec]
    devices: list[DeviceProfile]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.specs) != len(self.devices):
            raise ValueError(f"Policy: {len(self.specs)} specs but {len(self.devices)} devices")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"specs": [s.to_dict() for s in self.specs],
                "devices": [d.to_dict() for d in self.devices], "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        """Inverse of :meth:`to_dict`."""
        return cls([SubModelSpec.from_dict(s) for s in data["specs"]],
                   [DeviceProfile(**d) for d in data["devices"]], dict(data.get("meta", {})))


@dataclass(frozen=True)
class Violation:
    """One broken constraint: which, where, by how much."""

    constraint: str
    message: str
    device: str | None = None
    excess: float = 0.0

    def __str__(self) -> str:
        return f"{self.constraint}: {self.message}"


class ConstraintError(ValueError):
    """A policy breaks one or more of C1–C6; ``violations`` lists each."""

    def __init__(self, violations: Sequence[Violation]):
        self.violations = list(violations)
        lines = "\n  ".join(str(v) for v in self.violations)
        super().__init__(f"policy is infeasible ({len(self.violations)} violation(s)):\n  {lines}")


def _who(devices: Sequence[DeviceProfile] | None, n: int) -> str:
    return f"sub-model {n} on {devices[n].name!r}" if devices else f"sub-model {n}"


def check_structure(
    specs: Sequence[SubModelSpec], shape: ModelShape, devices: Sequence[DeviceProfile] | None = None,
    layer_maps: Sequence[Sequence[int]] | None = None,
) -> list[Violation]:
    """C1–C4: layers, embedding channels, heads and MLP neurons never exceed the teacher's.

    ``layer_maps[n]`` names the teacher layer each position of spec ``n`` runs on (see
    :func:`coformer.assignment.layer_maps`); C3/C4 are then checked per *teacher* layer, summed
    over the sub-models that keep it. Without maps, position ``k`` stands for teacher layer ``k``
    (exact for teachers whose layers are all alike).
    """
    out: list[Violation] = []
    for n, s in enumerate(specs):
        if s.layers > shape.layers:
            out.append(Violation("C1", f"{_who(devices, n)} has {s.layers} layers > L={shape.layers} "
                                 f"by {s.layers - shape.layers}", _name(devices, n), s.layers - shape.layers))
        if any(h % shape.head_group for h in s.heads):
            out.append(Violation("C3", f"{_who(devices, n)} has head counts {list(s.heads)} that are not "
                                 f"multiples of the key/value group size {shape.head_group}", _name(devices, n)))
        if s.embed_dim % shape.channel_group:
            out.append(Violation("C2", f"{_who(devices, n)} keeps {s.embed_dim} embedding channels, not a multiple "
                                 f"of the channel group {shape.channel_group} (groups keep sub-models disjoint in "
                                 f"every stage)", _name(devices, n)))
    total_d = sum(s.embed_dim for s in specs)
    if total_d > shape.embed_dim:
        parts = " + ".join(str(s.embed_dim) for s in specs)
        out.append(Violation("C2", f"embedding channels {parts} = {total_d} > d={shape.embed_dim} "
                             f"by {total_d - shape.embed_dim}", None, total_d - shape.embed_dim))
    if layer_maps is None:  # positions past L are C1's problem, already reported
        layer_maps = [range(min(s.layers, shape.layers)) for s in specs]
        label = "layer"
    else:
        label = "teacher layer"
        for n, (s, m) in enumerate(zip(specs, layer_maps, strict=True)):
            if len(m) != s.layers:
                raise ValueError(f"layer map of sub-model {n} has {len(m)} entries for {s.layers} layers")
    for j in range(shape.layers):
        present = [(n, s, list(m).index(j)) for n, (s, m) in enumerate(zip(specs, layer_maps)) if j in m]
        if not present:
            continue
        th = sum(s.heads[k] for _, s, k in present)
        tm = sum(s.mlp[k] for _, s, k in present)
        if th > shape.heads[j]:
            parts = " + ".join(f"{s.heads[k]} ({_name(devices, n) or n})" for n, s, k in present)
            out.append(Violation("C3", f"{label} {j + 1}: heads {parts} = {th} > h={shape.heads[j]} "
                                 f"by {th - shape.heads[j]}", None, th - shape.heads[j]))
        if tm > shape.mlp[j]:
            parts = " + ".join(f"{s.mlp[k]} ({_name(devices, n) or n})" for n, s, k in present)
            out.append(Violation("C4", f"{label} {j + 1}: MLP neurons {parts} = {tm} > D={shape.mlp[j]} "
                                 f"by {tm - shape.mlp[j]}", None, tm - shape.mlp[j]))
    return out


def _name(devices: Sequence[DeviceProfile] | None, n: int) -> str | None:
    return devices[n].name if devices else None


@dataclass(frozen=True)
class SubModelCost:
    """Measured cost of one sub-model on one input: FLOPs, parameters, memory."""

    flops: float
    params: int
    memory_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def check_resources(costs: Sequence[SubModelCost], devices: Sequence[DeviceProfile]) -> list[Violation]:
    """C5 (FLOPs ≤ Ω_n) and C6 (memory ≤ Φ_n) for each sub-model on its device."""
    out: list[Violation] = []
    for n, (c, d) in enumerate(zip(costs, devices, strict=True)):
        if c.flops > d.flops_budget:
            over = c.flops - d.flops_budget
            out.append(Violation("C5", f"{_who(devices, n)} needs {c.flops / 1e9:.3f} GFLOPs > budget "
                                 f"Ω={d.flops_budget / 1e9:.3f} GFLOPs by {over / 1e9:.3f} GFLOPs",
                                 d.name, over))
        if c.memory_bytes > d.memory_bytes:
            over = c.memory_bytes - d.memory_bytes
            out.append(Violation("C6", f"{_who(devices, n)} needs {c.memory_bytes / 2**20:.1f} MiB > "
                                 f"memory Φ={d.memory_bytes / 2**20:.1f} MiB by {over / 2**20:.1f} MiB",
                                 d.name, over))
    return out


def validate(
    specs: Sequence[SubModelSpec],
    shape: ModelShape,
    devices: Sequence[DeviceProfile] | None = None,
    costs: Iterable[SubModelCost] | None = None,
    layer_maps: Sequence[Sequence[int]] | None = None,
) -> None:
    """Raise :class:`ConstraintError` listing every violated constraint, or return quietly
    (``layer_maps``: see :func:`check_structure`)."""
    violations = check_structure(specs, shape, devices, layer_maps)
    if costs is not None and devices is not None:
        violations += check_resources(list(costs), devices)
    if violations:
        raise ConstraintError(violations)


def selection_problems(shape: ModelShape, sel: UnitSelection) -> list[str]:
    """What is wrong with ``sel`` for a teacher of ``shape`` (empty when it is valid).

    Indices must be distinct, ascending, in range and non-empty, with one heads/mlp entry per
    kept layer.
    """

    def ok(idx: Sequence[int], n: int) -> bool:
        return len(idx) > 0 and list(idx) == sorted(set(idx)) and all(0 <= i < n for i in idx)

    problems = []
    if not ok(sel.layers, shape.layers):
        problems.append(f"layers {list(sel.layers)} must be distinct ascending indices in [0, {shape.layers})")
    if not ok(sel.channels, shape.embed_dim):
        problems.append(f"channels must be distinct ascending indices in [0, {shape.embed_dim})")
    if len(sel.heads) != len(sel.layers) or len(sel.mlp) != len(sel.layers):
        problems.append("heads and mlp need one entry per selected layer")
        return problems
    for j, hs, ms in zip(sel.layers, sel.heads, sel.mlp):
        if not 0 <= j < shape.layers:
            continue
        if not ok(hs, shape.heads[j]):
            problems.append(f"layer {j}: heads {list(hs)} must be distinct ascending indices in [0, {shape.heads[j]})")
        if not ok(ms, shape.mlp[j]):
            problems.append(f"layer {j}: MLP neurons must be distinct ascending indices in [0, {shape.mlp[j]})")
    return problems


def check_selection(shape: ModelShape, sel: UnitSelection, teacher: str = "this") -> None:
    """Raise ``ValueError`` listing every problem of ``sel`` (see :func:`selection_problems`)."""
    problems = selection_problems(shape, sel)
    if problems:
        raise ValueError(f"invalid unit selection for {teacher} teacher: " + "; ".join(problems))
