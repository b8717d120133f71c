"""The interface a transport plugin implements, and the wire encodings every transport shares.

A transport connects the coordinator to one worker by URI (``SCHEME://ADDRESS``; the scheme
selects the transport registered under it). What a plugin registers is a :class:`Transport`
(``connect(uri)``) or, as before, a bare ``factory(uri)`` callable, which is a connect-only
transport. A transport that can also *serve* a worker to other processes subclasses
:class:`coformer.online.serve.ServingTransport` (serving needs the worker's state, which lives in
the online layer). Tensors cross the wire as safetensors bytes or raw fp16 bytes with shape and
dtype — never pickle.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from coformer.backbone import Batch

_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class TransportError(RuntimeError):
    """A worker could not be reached or answered with an error."""


class BadRequestError(ValueError):
    """A request was malformed; the worker rejected it and stays up."""


class ModelNotLoadedError(TransportError):
    """The worker does not hold the sub-model asked for (e.g. it restarted empty); load it again."""


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class SubModelArtifact:
    """What a worker needs to run one sub-model: its JSON config and safetensors weights."""

    config: dict[str, Any]
    weights: bytes
    sha256: str

    @classmethod
    def from_parts(cls, config: dict[str, Any], weights: bytes) -> SubModelArtifact:
        """Build an artifact, computing the weights' hash."""
        return cls(config, weights, sha256(weights))


@dataclass
class InferResult:
    """One worker's answer: fp16 features, how long it computed, and how long tensors took to (de)serialise.

    ``serialize_ms`` counts both ends of one call (client encode + decode, worker decode +
    encode); an in-process transport passes tensors by reference and reports 0. The rest of a
    call's round trip beyond ``compute_ms + serialize_ms`` is the RPC itself (and, off
    loopback, the wire).
    """

    features: torch.Tensor
    compute_ms: float
    meta: dict[str, Any] = field(default_factory=dict)
    serialize_ms: float = 0.0


def encode_batch(batch: Batch) -> bytes:
    """A batch of named tensors as safetensors bytes."""
    return st_save({k: v.contiguous() for k, v in batch.items()})


def decode_batch(data: bytes) -> Batch:
    """Inverse of :func:`encode_batch`; malformed bytes raise :class:`BadRequestError`."""
    try:
        return dict(st_load(data))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise BadRequestError(f"input is not a valid safetensors batch: {exc}") from exc


def encode_features(x: torch.Tensor) -> tuple[bytes, list[int], str]:
    """Features as fp16 bytes, shape and dtype name."""
    h = x.detach().to(torch.float16).contiguous().cpu()
    return h.numpy().tobytes(), list(h.shape), "float16"


def decode_features(data: bytes, shape: list[int], dtype: str) -> torch.Tensor:
    """Inverse of :func:`encode_features`; inconsistent sizes raise :class:`BadRequestError`."""
    if dtype not in _DTYPES:
        raise BadRequestError(f"unsupported feature dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    t = _DTYPES[dtype]
    expected = int(np.prod(shape)) * torch.empty((), dtype=t).element_size()
    if expected != len(data):
        raise BadRequestError(f"feature bytes ({len(data)}) do not match shape {shape} of {dtype} ({expected})")
    return torch.frombuffer(bytearray(data), dtype=t).reshape(shape)


class WorkerClient(ABC):
    """A connection from the coordinator to one worker."""

    def __init__(self, uri: str):
        self.uri = uri

    @abstractmethod
    def load(self, artifact: SubModelArtifact, *, timeout: float = 60.0, memory_limit_bytes: int | None = None) -> bool:
        """Make the worker hold ``artifact``; returns ``True`` if it already had it (nothing resent).

        ``memory_limit_bytes`` (the plan's memory for that device, where known) lowers the
        worker's own budget for this load; a model over it is refused before allocation.
        """

    @abstractmethod
    def infer(self, model_sha256: str, batch: Batch, *, timeout: float = 10.0) -> InferResult:
        """Run the loaded sub-model on ``batch``; raises :class:`TransportError` on failure or deadline."""

    @abstractmethod
    def health(self, *, timeout: float = 2.0) -> dict[str, Any]:
        """Liveness and what the worker holds."""

    def info(self, *, timeout: float = 2.0) -> dict[str, Any]:
        """Versions and capabilities of the worker (defaults to :meth:`health`)."""
        return self.health(timeout=timeout)

    def close(self) -> None:
        """Release the connection."""


class Transport(ABC):
    """What a transport plugin registers under its URI scheme: how to reach a worker.

    Register an instance: ``register("myscheme", MyTransport())``. A registered transport is
    also the connect factory the registry calls (``transport(uri=...)``), so code written
    against bare factories keeps working. To serve workers as well (``coformer worker
    --transport NAME``), subclass :class:`coformer.online.serve.ServingTransport` instead.
    """

    @abstractmethod
    def connect(self, uri: str) -> WorkerClient:
        """A client connected to the worker that ``uri`` names."""

    def __call__(self, uri: str) -> WorkerClient:
        """The same as :meth:`connect`: a transport is the ``factory(uri)`` the registry calls."""
        return self.connect(uri)


class FactoryTransport(Transport):
    """A transport registered the older way, as a bare ``factory(uri)`` callable: it connects, it cannot serve."""

    def __init__(self, factory: Callable[..., WorkerClient]):
        self.factory = factory

    def connect(self, uri: str) -> WorkerClient:
        """Call the registered factory with ``uri``."""
        return self.factory(uri=uri)


def as_transport(registered: Callable[..., WorkerClient]) -> Transport:
    """The :class:`Transport` a plugin registered: itself, or a bare factory wrapped as a connect-only one."""
    return registered if isinstance(registered, Transport) else FactoryTransport(registered)


def get_transport(name: str) -> Transport:
    """The transport registered under ``name`` (its URI scheme); an unknown name raises listing the known ones."""
    from coformer.registry import get

    return as_transport(get("transport", name).factory)


def scheme_of(uri: str) -> str:
    """The URI scheme that selects a transport (``scheme://device0`` → ``scheme``)."""
    scheme = urlparse(uri).scheme
    if not scheme:
        raise ValueError(f"worker URI {uri!r} has no scheme; use SCHEME://ADDRESS with a registered transport "
                         f"(`coformer plugins` lists them), e.g. the URI `coformer worker` prints")
    return scheme


def split_hostport(address: str) -> tuple[str, int]:
    """``"127.0.0.1:50051"`` / ``"[::1]:50051"`` → (host, port); raises a clear ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} must be HOST:PORT, e.g. 127.0.0.1:50051 (port 0 picks a free one)")
    return host, int(port)


def join_hostport(host: str, port: int) -> str:
    """Inverse of :func:`split_hostport`: an IPv6 literal gets its brackets (``[::1]:50051``)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP literal or a name) refers only to this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except OSError:
            return False
