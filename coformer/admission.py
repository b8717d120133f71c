"""Admission before allocation: check a sub-model config against its weights, and its memory against a budget.

Nothing here allocates parameter memory. The sequence every path that builds from a config
follows (the worker's ``load``, :func:`coformer.artifacts.load_plan`, ``Plan.submodels``):

1. :func:`check_config_sanity` — bounded size and nesting, finite numbers, no negative integers;
2. :func:`build_on_meta` — the module built on the meta device (shapes only, no storage);
3. :func:`safetensors_header` + :func:`compare_to_weights` — every tensor name, shape and dtype
   of the module equals the weights' header, naming the first that differs;
4. :func:`footprint_bytes` + :func:`admit_memory` — the bytes the module will take, against the
   budget (``--max-memory-mb``; by default :func:`default_memory_budget`);
5. only then :func:`materialise`: the real module, filled tensor by tensor from the weights.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import torch
from torch import nn

from coformer.transport import BadRequestError

#: A module type: what :func:`materialise` builds is what its factory returns.
ModuleT = TypeVar("ModuleT", bound=nn.Module)

#: Safetensors' dtype names for the torch dtypes a sub-model can hold.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
#: Largest safetensors header accepted (the JSON table of tensor names, shapes and offsets).
MAX_HEADER_BYTES = 8 * 1024 * 1024
#: A sub-model config is a small JSON document: bounded scalars and nesting.
MAX_CONFIG_SCALARS = 200_000
MAX_CONFIG_DEPTH = 16
#: Largest config JSON text accepted, checked before parsing (a real one is a few KB).
MAX_CONFIG_JSON_BYTES = 1024 * 1024
#: Largest integer a config may hold (2**24: above any real vocabulary, context or width). It also
#: bounds what a builder can allocate in plain Python before any tensor exists (``"x" * n``).
MAX_CONFIG_INT = 2**24
#: Share of the machine's available memory a worker admits by default.
DEFAULT_BUDGET_SHARE = 0.5


class AdmissionError(BadRequestError):
    """A sub-model was refused before any parameter memory was allocated (config vs weights mismatch)."""


class MemoryBudgetError(AdmissionError):
    """A sub-model needs more memory than the worker's budget has left."""

    def __init__(self, message: str, needed_bytes: int, available_bytes: int):
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes


class LoadCancelledError(RuntimeError):
    """A load was cancelled (the worker is shutting down); nothing was kept."""


def mb(n: int | float) -> str:
    """Bytes as a MiB figure for messages."""
    x = n / 2**20
    return f"{x:.1f} MB" if x >= 10 else f"{x:.3g} MB"


def available_memory_bytes() -> int:
    """The machine's available memory (``MemAvailable``; total physical memory where that is unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_memory_budget() -> int:
    """The default worker budget: :data:`DEFAULT_BUDGET_SHARE` of the memory available now."""
    return int(available_memory_bytes() * DEFAULT_BUDGET_SHARE)


def warm_up() -> None:
    """Pay one-time costs now (torch's meta-device kernels, plugin imports), not in the first load.

    The first meta-device build in a process imports torch's meta registrations (seconds);
    a worker calls this before it announces itself, so a restarted worker reloads at once.
    """
    from coformer.registry import list_plugins

    list_plugins("backbone")
    with torch.device("meta"):
        nn.Embedding(2, 2)
        nn.LayerNorm(2)
        nn.Linear(2, 2)


def parse_config_json(text: str | bytes) -> Any:
    """Parse a config's JSON text after checking its size, so an oversized one never becomes Python objects."""
    if len(text) > MAX_CONFIG_JSON_BYTES:
        raise AdmissionError(f"config_json is {len(text):,} bytes, over the {MAX_CONFIG_JSON_BYTES:,} a sub-model "
                             f"config may take; send the SubModel.config, not data")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdmissionError(f"config_json is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise AdmissionError("config_json is nested too deeply") from exc


def check_config_sanity(config: Any) -> dict[str, Any]:
    """Refuse configs that are not JSON objects of bounded size with finite, non-negative numbers."""
    if not isinstance(config, dict):
        raise AdmissionError(f"a sub-model config must be a JSON object, got {type(config).__name__}")
    count = 0
    # (value, parent path, key, depth): the path string is only built for an error, and a
    # container is counted before it is pushed, so a huge list costs no per-item objects
    stack: list[tuple[Any, str, Any, int]] = [(config, "config", None, 0)]
    while stack:
        value, parent, key, depth = stack.pop()
        where = parent if key is None else (f"{parent}[{key}]" if isinstance(key, int) else f"{parent}.{key}")
        if depth > MAX_CONFIG_DEPTH:
            raise AdmissionError(f"{where}: nested deeper than {MAX_CONFIG_DEPTH} levels; not a sub-model config")
        count += 1
        if isinstance(value, (dict, list)):
            if count + len(value) > MAX_CONFIG_SCALARS:
                raise AdmissionError(f"config has over {MAX_CONFIG_SCALARS:,} values; not a sub-model config")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, where, k, depth + 1) for k, v in items)
        elif isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        elif isinstance(value, int):
            if value < 0 and not where.endswith(("_id", "_index", "token")):
                raise AdmissionError(f"{where} = {value}: dimensions and counts cannot be negative")
            if value > MAX_CONFIG_INT:
                raise AdmissionError(f"{where} = {value}: over {MAX_CONFIG_INT:,}, absurdly large for a "
                                     f"dimension or count; fix the config")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise AdmissionError(f"{where} = {value}: numbers in a config must be finite")
        else:
            raise AdmissionError(f"{where}: unexpected {type(value).__name__} in a JSON config")
    return config


def header_length(prefix: bytes) -> int | None:
    """Bytes the safetensors header occupies (8 + its JSON), from the first 8 bytes; ``None`` if fewer arrived."""
    if len(prefix) < 8:
        return None
    return 8 + struct.unpack("<Q", bytes(prefix[:8]))[0]


def safetensors_header(source: bytes | bytearray | memoryview | str | Path,
                       total: int | None = None) -> dict[str, dict[str, Any]]:
    """The tensor table of safetensors bytes or a file: ``{name: {"dtype", "shape", "data_offsets"}}``.

    Reads only the header; raises :class:`AdmissionError` for anything that is not a well-formed one.
    ``total`` is the full size when ``source`` is only the first part of a stream.
    """
    if isinstance(source, (str, Path)):
        have = Path(source).stat().st_size
        with open(source, "rb") as f:
            prefix = f.read(8)
            size = _header_size(prefix, have)
            raw = f.read(size)
    else:
        view = memoryview(source)
        have = len(view)
        size = _header_size(bytes(view[:8]), have)
        raw = bytes(view[8:8 + size])
    total = have if total is None else total
    try:
        table = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdmissionError(f"weights header is not valid JSON: {exc}") from exc
    if not isinstance(table, dict):
        raise AdmissionError("weights header must be a JSON object of tensors")
    table.pop("__metadata__", None)
    data_len = total - 8 - size
    for name, entry in table.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list) and entry.get("dtype") in _ITEM_BYTES
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2):
            raise AdmissionError(f"weights header entry {name!r} is malformed (needs dtype, shape, data_offsets)")
        if not all(isinstance(d, int) and d >= 0 for d in entry["shape"]):
            raise AdmissionError(f"weights tensor {name!r} has an invalid shape {entry['shape']}")
        start, end = entry["data_offsets"]
        expect = math.prod(entry["shape"]) * _ITEM_BYTES[entry["dtype"]]
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_len
                and end - start == expect):
            raise AdmissionError(f"weights tensor {name!r}: offsets {entry['data_offsets']} do not fit its "
                                 f"{entry['dtype']}{entry['shape']} in {data_len} data bytes")
    return table


def _header_size(prefix: bytes, total: int) -> int:
    if len(prefix) < 8:
        raise AdmissionError("weights are shorter than a safetensors header (8 bytes)")
    (size,) = struct.unpack("<Q", prefix)
    if size > MAX_HEADER_BYTES or 8 + size > total:
        raise AdmissionError(f"weights header claims {size} bytes; the file holds {total} (truncated or not safetensors)")
    return size


_guard = threading.local()


def _count_registration(kind: str) -> None:
    limits = getattr(_guard, "limits", None)
    if limits is None:
        return
    _guard.counts[kind] += 1
    if _guard.counts[kind] > limits[kind]:
        raise AdmissionError(f"the config builds over {limits[kind]:,} {kind}s but the weights hold "
                             f"{_guard.tensors:,} tensors; the config's dimensions are wrong")


def _on_parameter(module: nn.Module, name: str, param: Any) -> None:
    _count_registration("parameter")


def _on_module(module: nn.Module, name: str, submodule: Any) -> None:
    _count_registration("module")


_hooks_installed = False
_hooks_lock = threading.Lock()


def _install_hooks() -> None:
    global _hooks_installed
    with _hooks_lock:
        if not _hooks_installed:
            from torch.nn.modules import module as module_mod

            module_mod.register_module_parameter_registration_hook(_on_parameter)
            module_mod.register_module_module_registration_hook(_on_module)
            _hooks_installed = True


def build_on_meta(factory: Callable[[], nn.Module], what: str = "sub-model",
                  max_tensors: int | None = None) -> nn.Module:
    """Build ``factory()`` on the meta device: shapes without storage; errors become :class:`AdmissionError`.

    With ``max_tensors`` (the weights' tensor count) the build stops as soon as it registers more
    parameters than that, or far more modules, so an absurd layer count cannot cost time or memory.
    """
    if max_tensors is not None:
        _install_hooks()
        _guard.limits = {"parameter": 4 * max_tensors + 64, "module": 16 * max_tensors + 256}
        _guard.counts = {"parameter": 0, "module": 0}
        _guard.tensors = max_tensors
    try:
        with torch.device("meta"):
            return factory()
    except AdmissionError:
        raise
    except (Exception, RecursionError) as exc:  # noqa: BLE001 - any config the builder rejects is the caller's error
        raise AdmissionError(f"cannot build the {what} from its config: {type(exc).__name__}: {exc}") from exc
    finally:
        _guard.limits = None


def compare_to_weights(model: nn.Module, header: Mapping[str, Mapping[str, Any]], what: str = "sub-model") -> None:
    """Every state-dict tensor of ``model`` must appear in ``header`` with the same shape and dtype, and no more."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        entry = header.get(name)
        if entry is None:
            raise AdmissionError(f"{what}: the weights lack tensor {name!r} that the config's architecture has; "
                                 f"the config and weights do not belong together")
        if list(entry["shape"]) != list(tensor.shape):
            raise AdmissionError(f"{what}: tensor {name!r} is {entry['dtype']}{list(entry['shape'])} in the weights "
                                 f"but the config makes it {list(tensor.shape)}; fix the config")
        want = SAFETENSORS_DTYPES.get(tensor.dtype)
        if entry["dtype"] != want:
            raise AdmissionError(f"{what}: tensor {name!r} is {entry['dtype']} in the weights but the module "
                                 f"holds {want or tensor.dtype}")
    extra = sorted(set(header) - set(expected))
    if extra:
        raise AdmissionError(f"{what}: the weights carry {len(extra)} tensor(s) the config's architecture has not, "
                             f"e.g. {extra[0]!r}")


def footprint_bytes(model: nn.Module) -> int:
    """Bytes the module's parameters and buffers take once materialised (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


#: Python-side cost of a loaded module beyond its tensors' data, per submodule and per tensor
#: (measured on tiny BERT sub-models: ~230 KB resident for 121 KB of tensors, 33 modules, 53 tensors).
MODULE_OVERHEAD_BYTES = 2048
TENSOR_OVERHEAD_BYTES = 1024


def resident_bytes(model: nn.Module) -> int:
    """What keeping ``model`` loaded costs: its tensors plus the per-module and per-tensor object overhead.

    A worker's model cache counts this against its memory budget, so many small models cannot
    grow it past the budget through overhead that :func:`footprint_bytes` does not see.
    """
    modules = sum(1 for _ in model.modules())
    tensors = len(model.state_dict())
    return footprint_bytes(model) + MODULE_OVERHEAD_BYTES * modules + TENSOR_OVERHEAD_BYTES * tensors


def admit_memory(needed: int, budget: int, used: int, what: str = "sub-model",
                 hint: str = "start the worker with a larger --max-memory-mb, or give it a smaller sub-model") -> None:
    """Refuse ``needed`` bytes when ``budget - used`` is less, naming both figures."""
    available = max(0, budget - used)
    if needed > available:
        raise MemoryBudgetError(f"{what} needs {mb(needed)} but {mb(available)} of the {mb(budget)} budget is "
                                f"available; {hint}", needed, available)


def materialise(factory: Callable[[], ModuleT], weights: bytes | str | Path,
                cancel: threading.Event | None = None) -> ModuleT:
    """Build the real module and fill it from safetensors bytes or a file, one tensor at a time.

    Call only after admission. ``cancel`` is checked between tensors; when set the partial
    module is dropped and :class:`LoadCancelledError` raised.
    """
    from safetensors import safe_open
    from safetensors.torch import load as st_load

    model = factory()
    params = model.state_dict()
    if isinstance(weights, (str, Path)):
        with safe_open(str(weights), framework="pt") as f, torch.no_grad():
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if cancel is not None and cancel.is_set():
                    raise LoadCancelledError("load cancelled: the worker is shutting down")
                params[name].copy_(f.get_tensor(name))
    else:
        state = st_load(bytes(weights))
        model.load_state_dict(state, strict=True)
    if cancel is not None and cancel.is_set():
        raise LoadCancelledError("load cancelled: the worker is shutting down")
    return model.eval()


def admit(factory: Callable[[], nn.Module], weights: bytes | str | Path, *, budget: int | None = None,
          used: int = 0, what: str = "sub-model") -> int:
    """Run checks 2–4 (meta build, weights comparison, memory); returns the footprint in bytes."""
    header = safetensors_header(weights)
    meta = build_on_meta(factory, what, max_tensors=len(header))
    compare_to_weights(meta, header, what)
    need = footprint_bytes(meta)
    admit_memory(need, default_memory_budget() if budget is None else budget, used, what)
    return need
