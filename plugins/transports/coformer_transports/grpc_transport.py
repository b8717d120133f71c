"""``grpc://host:port``: workers on other machines (or network namespaces), over gRPC.

Server side: :class:`WorkerServer` wraps a transport-independent
:class:`~coformer.online.worker_state.WorkerState` in a thread-pool gRPC server.
Client side: :class:`GrpcClient`. Both are reached through :class:`GrpcTransport`, registered
for the ``grpc`` scheme: it connects, and it serves ``coformer worker --transport grpc``.

Security: TLS (server ``tls_cert``/``tls_key``; client ``?tls=1&ca=PATH`` in the URI or the
``COFORMER_TLS_CA`` environment variable) and a shared token sent as call metadata
(``COFORMER_TOKEN``), compared in constant time. Every call carries a deadline.

Errors map to gRPC status codes: ``INVALID_ARGUMENT`` for malformed requests and sub-models
refused at admission, ``RESOURCE_EXHAUSTED`` for messages or requests over a limit and models
over the memory budget, ``FAILED_PRECONDITION`` for a model the worker does not hold,
``UNAVAILABLE`` for a load cancelled by shutdown, ``UNAUTHENTICATED`` for a missing or wrong token. The client raises
:class:`GrpcBadRequestError` (a :class:`~coformer.transport.BadRequestError`) for the first
two and :class:`GrpcTransportError` (a :class:`~coformer.transport.TransportError`) otherwise,
each carrying the worker's message and the status ``code``.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import platform
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn
from urllib.parse import parse_qs, urlparse

import grpc
import torch
from google.protobuf.message import Message

from coformer.admission import (
    MAX_HEADER_BYTES,
    AdmissionError,
    LoadCancelledError,
    MemoryBudgetError,
    header_length,
    mb,
    parse_config_json,
    safetensors_header,
)
from coformer.backbone import Batch
from coformer.hookspecs import Register, hookimpl
from coformer.limits import RequestLimits, RequestTooLargeError
from coformer.online.worker_state import WorkerState
from coformer.online.serve import ServedWorker, ServeOptions, ServingTransport
from coformer.transport import (
    BadRequestError,
    InferResult,
    ModelNotLoadedError,
    SubModelArtifact,
    TransportError,
    WorkerClient,
    decode_batch,
    decode_features,
    encode_batch,
    encode_features,
    is_loopback,
    join_hostport,
    split_hostport,
)
from coformer_transports.proto import coformer_pb2 as pb

SERVICE = "coformer.v1.Worker"
#: Default send/receive limit on both sides: sub-model weights are tens of MB.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
#: Weights travel in chunks of at most this size (and below the message limit).
LOAD_CHUNK_BYTES = 4 * 1024 * 1024
TOKEN_METADATA_KEY = "x-coformer-token"

_METHODS: dict[str, tuple[type[Message], type[Message]]] = {
    "HasModel": (pb.HasModelRequest, pb.HasModelReply),
    "LoadModel": (pb.LoadModelRequest, pb.LoadModelReply),
    "Infer": (pb.InferRequest, pb.InferReply),
    "Health": (pb.HealthRequest, pb.HealthReply),
    "Info": (pb.InfoRequest, pb.InfoReply),
}


def _channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


# --------------------------------------------------------------------------- errors


class GrpcTransportError(TransportError):
    """A gRPC call failed (unreachable, deadline, unauthenticated, unknown model, worker fault)."""

    def __init__(self, message: str, code: grpc.StatusCode):
        super().__init__(message)
        self.code = code


class GrpcBadRequestError(BadRequestError):
    """The worker rejected the request as malformed or too large; it stays up."""

    def __init__(self, message: str, code: grpc.StatusCode):
        super().__init__(message)
        self.code = code


class GrpcModelNotLoadedError(GrpcTransportError, ModelNotLoadedError):
    """The worker does not hold the sub-model asked for (FAILED_PRECONDITION); load it again."""


@dataclass(frozen=True)
class _Malformed:
    """What the request deserializer returns for bytes that are not a valid message."""

    error: str


def _safe_deserializer(cls: type[Message]) -> Callable[[bytes], Message | _Malformed]:
    # grpc's own handling of a deserializer failure is an opaque INTERNAL status; catching it
    # here lets the handler answer INVALID_ARGUMENT with the parser's message instead.
    def deserialize(data: bytes) -> Message | _Malformed:
        try:
            return cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends: the caller's fault
            return _Malformed(f"{type(exc).__name__}: {exc}")

    return deserialize


# --------------------------------------------------------------------------- server


class WorkerServer(ServedWorker):
    """A running gRPC worker: a :class:`WorkerState` behind a thread-pool server.

    :meth:`drain` is the clean shutdown: stop accepting, cancel loads, give in-flight calls
    ``grace`` seconds, and report how many were cut.
    """

    def __init__(self, state: WorkerState, *, token: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_workers: int = 8,
                 max_inflight: int = 64, spool_dir: str | Path | None = None):
        self.state = state
        self._token = token.encode() if token else None
        self.max_message_bytes = max_message_bytes
        self.max_inflight = max_inflight
        self.spool_dir = str(spool_dir) if spool_dir else None
        self.tls = False
        self.address = ""
        self.draining = False
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="coformer-rpc"),
                                  options=_channel_options(max_message_bytes),
                                  maximum_concurrent_rpcs=max_inflight)
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._wrap(getattr(self, f"_rpc_{name}")),
                request_deserializer=_safe_deserializer(req),
                response_serializer=rep.SerializeToString,
            )
            for name, (req, rep) in _METHODS.items()
        }
        handlers["LoadModelStream"] = grpc.stream_unary_rpc_method_handler(
            self._wrap(self._rpc_LoadModelStream, stream=True),
            request_deserializer=_safe_deserializer(pb.LoadModelChunk),
            response_serializer=pb.LoadModelReply.SerializeToString,
        )
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    def bind(self, address: str, *, tls_cert: str | Path | None = None, tls_key: str | Path | None = None) -> str:
        """Bind ``HOST:PORT`` (port 0 picks a free one); returns the bound ``HOST:PORT``."""
        host, _ = split_hostport(address)
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both a certificate (--tls-cert) and its private key (--tls-key)")
        if tls_cert is not None and tls_key is not None:
            creds = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
            port = self.server.add_secure_port(address, creds)
            self.tls = True
        else:
            port = self.server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"could not bind {address}: address in use or not available on this machine")
        self.address = f"{host}:{port}"
        return self.address

    def start(self) -> WorkerServer:
        """Start serving (non-blocking)."""
        self.server.start()
        return self

    def stop(self, grace: float | None = 0.5) -> None:
        """Stop serving; in-flight calls get ``grace`` seconds to finish."""
        self.state.cancel.set()
        self.server.stop(grace).wait()

    @property
    def inflight(self) -> int:
        """Calls being served now."""
        return self._inflight

    def drain(self, grace: float) -> int:
        """Stop accepting calls, cancel loads, wait up to ``grace`` s for in-flight calls; returns how many were cut."""
        self.draining = True
        self.state.cancel.set()
        stopped = self.server.stop(grace)  # new calls are refused from here on
        end = time.monotonic() + max(0.0, grace)
        while self._inflight > 0 and time.monotonic() < end:
            time.sleep(0.01)
        cut = self._inflight
        if not cut:  # the handlers returned; let gRPC send their replies before the process goes
            stopped.wait(max(0.1, end - time.monotonic()))
        return cut

    def wait(self) -> None:
        """Block until the server stops."""
        self.server.wait_for_termination()

    @property
    def uri(self) -> str:
        """The ``grpc://`` URI a client uses to reach this worker (with ``?tls=1`` if TLS)."""
        return f"grpc://{self.address}" + ("?tls=1" if self.tls else "")

    # -- plumbing

    def _authorised(self, context: grpc.ServicerContext) -> bool:
        if self._token is None:
            return True
        sent = next((v for k, v in context.invocation_metadata() if k == TOKEN_METADATA_KEY), None)
        if sent is None:
            return False
        sent_b = sent.encode() if isinstance(sent, str) else bytes(sent)
        return hmac.compare_digest(sent_b, self._token)

    def _wrap(self, fn: Callable[[Any], Message], *, stream: bool = False) -> Callable[[Any, grpc.ServicerContext],
                                                                                       Message]:
        def handler(request: Any, context: grpc.ServicerContext) -> Message:
            if not self._authorised(context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              f"worker {self.state.name}: missing or wrong token "
                              f"(set COFORMER_TOKEN to the worker's --token)")
            if isinstance(request, _Malformed):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"worker {self.state.name}: request is not a valid message: {request.error}")
            code, message = grpc.StatusCode.OK, ""
            with self._inflight_lock:
                self._inflight += 1
            try:
                return fn(request)
            except ModelNotLoadedError as exc:
                code, message = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
            except (RequestTooLargeError, MemoryBudgetError) as exc:
                code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
            except BadRequestError as exc:
                code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
            except LoadCancelledError as exc:
                code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
            except Exception as exc:  # noqa: BLE001 - report the fault, keep serving
                code, message = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
            finally:
                with self._inflight_lock:
                    self._inflight -= 1
            context.abort(code, f"worker {self.state.name}: {message}")
            raise AssertionError("unreachable")  # context.abort always raises

        return handler

    # -- the service

    def _rpc_HasModel(self, req: pb.HasModelRequest) -> pb.HasModelReply:
        return pb.HasModelReply(has=self.state.has(req.sha256))

    @staticmethod
    def _parse_config(sha: str, config_json: str) -> dict[str, Any]:
        if len(sha) != 64:
            raise BadRequestError(f"sha256 must be 64 hex digits, got {sha!r}")
        config = parse_config_json(config_json)
        if not isinstance(config, dict) or "backbone" not in config:
            raise BadRequestError("config_json must be a JSON object with a 'backbone' key (a SubModel.config)")
        return config

    def _rpc_LoadModel(self, req: pb.LoadModelRequest) -> pb.LoadModelReply:
        if len(req.sha256) != 64:
            raise BadRequestError(f"sha256 must be 64 hex digits, got {req.sha256!r}")
        if self.state.has(req.sha256):
            return pb.LoadModelReply(cached=True)
        if not req.weights:
            return pb.LoadModelReply(needs_weights=True)
        config = self._parse_config(req.sha256, req.config_json)
        cached = self.state.load(config, req.weights, req.sha256, memory_limit_bytes=req.memory_limit_bytes or None)
        return pb.LoadModelReply(cached=cached)

    def _rpc_LoadModelStream(self, chunks: Iterator[Any]) -> pb.LoadModelReply:
        first = next(chunks, None)
        if first is None or isinstance(first, _Malformed):
            raise BadRequestError("LoadModelStream needs a first chunk with sha256, config_json and total_bytes")
        config = self._parse_config(first.sha256, first.config_json)
        digest, total, limit = first.sha256, int(first.total_bytes), first.memory_limit_bytes or None
        if self.state.has(digest):
            return pb.LoadModelReply(cached=True)
        budget = min(self.state.max_memory_bytes, limit or self.state.max_memory_bytes)
        if total < 8:
            raise BadRequestError(f"total_bytes must be the size of the safetensors weights, got {total}")
        if total > budget + 8 + (8 << 20):
            raise MemoryBudgetError(f"weights of {mb(total)} cannot fit the {mb(budget)} memory budget; start "
                                    f"the worker with a larger --max-memory-mb", total, budget)
        hasher = hashlib.sha256()
        prefix = bytearray()
        need_prefix: int | None = None
        admitted = None
        received = 0
        fd, spool = tempfile.mkstemp(prefix="coformer-load-", suffix=".safetensors", dir=self.spool_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in itertools.chain([first], chunks):
                    if isinstance(chunk, _Malformed):
                        raise BadRequestError(f"a weights chunk is not a valid message: {chunk.error}")
                    if self.state.cancel.is_set():
                        raise LoadCancelledError("load cancelled: the worker is shutting down")
                    data = chunk.data
                    received += len(data)
                    if received > total:
                        raise BadRequestError(f"the stream sent more than the declared total_bytes ({total})")
                    hasher.update(data)
                    out.write(data)
                    if admitted is None:
                        prefix += data[: max(0, (need_prefix or 8 << 20) - len(prefix))]
                        need_prefix = need_prefix or header_length(prefix)
                        if need_prefix is not None and need_prefix > MAX_HEADER_BYTES + 8:
                            raise AdmissionError(f"weights header claims {need_prefix - 8} bytes (over "
                                                 f"{MAX_HEADER_BYTES}); not safetensors weights")
                        if need_prefix is not None and len(prefix) >= need_prefix:
                            # admission as soon as the header arrived: refuse before the rest is sent
                            header = safetensors_header(bytes(prefix[:need_prefix]), total=total)
                            admitted = self.state.admit(config, header, digest, memory_limit_bytes=limit)
                            prefix = bytearray()
            if received != total:
                raise BadRequestError(f"the stream ended after {received} of the declared {total} bytes")
            if hasher.hexdigest() != digest:
                raise AdmissionError(f"weights sha256 {hasher.hexdigest()} does not match the declared {digest}")
            if admitted is None:
                raise AdmissionError("the weights' safetensors header never arrived complete")
            cached = self.state.install(admitted, spool, memory_limit_bytes=limit)
        finally:
            Path(spool).unlink(missing_ok=True)
        return pb.LoadModelReply(cached=cached)

    def _rpc_Infer(self, req: pb.InferRequest) -> pb.InferReply:
        if not self.state.has(req.model_sha256):
            raise ModelNotLoadedError(f"no sub-model with sha256 {req.model_sha256[:12]}… is loaded; "
                                      f"call LoadModel first")
        if len(req.batch) > self.state.limits.max_input_bytes:
            raise RequestTooLargeError(f"input of {len(req.batch)} bytes is over this worker's limit of "
                                       f"{self.state.limits.max_input_bytes}; split the batch or raise --max-input-mb")
        start = time.perf_counter()
        batch = decode_batch(req.batch)
        if not batch:
            raise BadRequestError("input batch is empty; send the model's named input tensors")
        decoded = time.perf_counter()
        res = self.state.infer(req.model_sha256, batch)
        computed = time.perf_counter()
        data, shape, dtype = encode_features(res.features)
        serialize_ms = ((decoded - start) + (time.perf_counter() - computed)) * 1000
        return pb.InferReply(features=data, shape=shape, dtype=dtype, compute_ms=res.compute_ms,
                             worker=self.state.name, serialize_ms=serialize_ms)

    def _rpc_Health(self, req: pb.HealthRequest) -> pb.HealthReply:
        h = self.state.health()
        return pb.HealthReply(ok=h["ok"] and not self.draining, name=h["name"], models=h["models"],
                              requests=h["requests"], errors=h["errors"], draining=self.draining,
                              refused=self.state.refused, inflight=max(0, self._inflight - 1))

    def _rpc_Info(self, req: pb.InfoRequest) -> pb.InfoReply:
        import google.protobuf
        import coformer

        versions = {"coformer": coformer.__version__, "torch": torch.__version__, "grpc": grpc.__version__,
                    "protobuf": google.protobuf.__version__, "python": platform.python_version()}
        lim = self.state.limits
        return pb.InfoReply(name=self.state.name, versions=versions, models=self.state.health()["models"],
                            threads=self.state.threads or torch.get_num_threads(),
                            max_message_bytes=self.max_message_bytes, tls=self.tls, auth=self._token is not None,
                            max_batch=lim.max_batch, max_tokens=lim.max_tokens, max_pixels=lim.max_pixels,
                            max_input_bytes=lim.max_input_bytes, max_memory_bytes=self.state.max_memory_bytes,
                            used_memory_bytes=self.state.used_memory_bytes, max_inflight=self.max_inflight)


def serve(listen: str = "127.0.0.1:0", *, name: str | None = None, threads: int | None = None,
          token: str | None = None, tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
          allow_remote: bool = False, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
          max_workers: int = 8, state: WorkerState | None = None, limits: RequestLimits | None = None,
          max_memory_bytes: int | None = None, max_inflight: int = 64,
          spool_dir: str | Path | None = None) -> WorkerServer:
    """Start a gRPC worker on ``listen`` and return it (running, non-blocking).

    A non-loopback address is refused unless ``allow_remote`` (``coformer worker`` sets it
    when ``--listen`` names the address explicitly).
    """
    host, _ = split_hostport(listen)
    if not allow_remote and not is_loopback(host):
        raise ValueError(f"refusing to bind non-loopback address {listen!r} by default; pass it explicitly "
                         f"with --listen (and prefer --token and --tls-cert/--tls-key off a trusted network)")
    if threads:
        torch.set_num_threads(threads)
    state = state or WorkerState(name or f"worker@{listen}", threads=threads, limits=limits,
                                 max_memory_bytes=max_memory_bytes)
    server = WorkerServer(state, token=token, max_message_bytes=max_message_bytes, max_workers=max_workers,
                          max_inflight=max_inflight, spool_dir=spool_dir)
    server.bind(listen, tls_cert=tls_cert, tls_key=tls_key)
    return server.start()


# --------------------------------------------------------------------------- client


def _flag(value: str | None) -> bool:
    return (value or "").lower() in {"1", "true", "yes", "on"}


class GrpcClient(WorkerClient):
    """A client for ``grpc://host:port[?tls=1&ca=PATH&server_name=NAME&max_message_mb=N]``.

    ``token`` defaults to ``COFORMER_TOKEN``; TLS is on with ``tls=1`` or when a CA is given
    (``ca=`` in the URI or ``COFORMER_TLS_CA``); with TLS and no CA the system roots are used.
    ``max_message_mb`` in the URI overrides ``max_message_bytes`` (the client's send/receive limit,
    to match a worker started with ``--max-message-mb``, e.g. to load a teacher over 256 MB).
    """

    def __init__(self, uri: str, *, token: str | None = None, ca: str | Path | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        super().__init__(uri)
        parsed = urlparse(uri)
        if parsed.scheme != "grpc" or not parsed.hostname or parsed.port is None:
            raise ValueError(f"{uri!r} is not a gRPC worker URI; expected grpc://HOST:PORT")
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        self.target = parsed.netloc
        self.token = token if token is not None else os.environ.get("COFORMER_TOKEN")
        if "max_message_mb" in query:
            mb = query["max_message_mb"]
            if not mb.isdigit() or int(mb) < 1:
                raise ValueError(f"{uri}: max_message_mb must be a positive whole number of MB, got {mb!r}")
            max_message_bytes = int(mb) * 1024 * 1024
        ca_path = ca or query.get("ca") or os.environ.get("COFORMER_TLS_CA")
        self.tls = _flag(query.get("tls")) or _flag(os.environ.get("COFORMER_TLS")) or ca_path is not None
        # reconnect soon after a worker comes back, so re-admission is not held up by gRPC's own backoff
        options = _channel_options(max_message_bytes) + [("grpc.initial_reconnect_backoff_ms", 100),
                                                         ("grpc.min_reconnect_backoff_ms", 100),
                                                         ("grpc.max_reconnect_backoff_ms", 1000)]
        if self.tls:
            if ca_path is not None and not Path(ca_path).is_file():
                raise ValueError(f"{uri}: CA certificate {ca_path} not found")
            roots = Path(ca_path).read_bytes() if ca_path else None
            if query.get("server_name"):
                options.append(("grpc.ssl_target_name_override", query["server_name"]))
            self.channel = grpc.secure_channel(self.target, grpc.ssl_channel_credentials(roots), options=options)
        else:
            self.channel = grpc.insecure_channel(self.target, options=options)
        self._calls = {
            name: self.channel.unary_unary(f"/{SERVICE}/{name}", request_serializer=req.SerializeToString,
                                           response_deserializer=rep.FromString)
            for name, (req, rep) in _METHODS.items()
        }
        self._metadata = ((TOKEN_METADATA_KEY, self.token),) if self.token else None
        self.max_message_bytes = max_message_bytes
        self._streams = {"LoadModelStream": self.channel.stream_unary(
            f"/{SERVICE}/LoadModelStream", request_serializer=pb.LoadModelChunk.SerializeToString,
            response_deserializer=pb.LoadModelReply.FromString)}

    def _call(self, method: str, request: Message, timeout: float) -> Any:
        try:
            return self._calls[method](request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            self._raise(exc, method, timeout)

    def _call_stream(self, method: str, requests: Iterator[Message], timeout: float) -> Any:
        try:
            return self._streams[method](requests, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            self._raise(exc, method, timeout)

    def _raise(self, exc: grpc.RpcError, method: str, timeout: float) -> NoReturn:
        """Raise the typed error for a failed call (see the module docstring for the mapping)."""
        code = exc.code()
        details = exc.details() or code.name
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            details = f"missed the {timeout:.2f}s deadline"
        message = f"{self.uri} {method}: {code.name}: {details}"
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
            message += ("; to allow larger messages, start the worker with `coformer worker --max-message-mb N` "
                        "and add `?max_message_mb=N` to its URI")
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
            raise GrpcBadRequestError(message, code) from None
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            raise GrpcModelNotLoadedError(message, code) from None
        raise GrpcTransportError(message, code) from None

    def call_raw(self, method: str, payload: bytes, *, timeout: float = 5.0) -> bytes:
        """Send raw request bytes to ``method`` (diagnostics and robustness tests); errors as in :meth:`infer`."""
        fn = self.channel.unary_unary(f"/{SERVICE}/{method}")
        try:
            return fn(payload, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            self._raise(exc, method, timeout)

    def call_raw_stream(self, method: str, payloads: list[bytes], *, timeout: float = 5.0) -> bytes:
        """Send raw request bytes as a client stream to ``method`` (robustness tests); errors as in :meth:`infer`."""
        fn = self.channel.stream_unary(f"/{SERVICE}/{method}")
        try:
            return fn(iter(payloads), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            self._raise(exc, method, timeout)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects; raises :class:`TransportError` after ``timeout``."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise GrpcTransportError(f"{self.uri}: no worker answered within {timeout:.1f}s",
                                     grpc.StatusCode.UNAVAILABLE) from None

    def has(self, digest: str, *, timeout: float = 5.0) -> bool:
        """Whether the worker holds the sub-model with this sha256."""
        return bool(self._call("HasModel", pb.HasModelRequest(sha256=digest), timeout).has)

    def load(self, artifact: SubModelArtifact, *, timeout: float = 60.0, memory_limit_bytes: int | None = None) -> bool:
        """Ask first with empty weights; stream the weights in chunks only if the worker lacks them.

        Returns ``True`` when the worker already held the model (no weights were sent). The
        stream has no size limit of its own (each chunk stays under the message limit), so
        models over 2 GB deploy; ``timeout`` bounds the whole transfer and load.
        """
        config_json = json.dumps(artifact.config)
        probe = self._call("LoadModel", pb.LoadModelRequest(sha256=artifact.sha256, config_json=config_json),
                           timeout)
        if probe.cached:
            return True
        chunk = max(1024, min(LOAD_CHUNK_BYTES, self.max_message_bytes - 64 * 1024))
        weights = memoryview(artifact.weights)

        def chunks() -> Iterator[pb.LoadModelChunk]:
            yield pb.LoadModelChunk(sha256=artifact.sha256, config_json=config_json, total_bytes=len(weights),
                                    memory_limit_bytes=memory_limit_bytes or 0, data=bytes(weights[:chunk]))
            for off in range(chunk, len(weights), chunk):
                yield pb.LoadModelChunk(data=bytes(weights[off:off + chunk]))

        return bool(self._call_stream("LoadModelStream", chunks(), timeout).cached)

    def infer(self, model_sha256: str, batch: Batch, *, timeout: float = 10.0) -> InferResult:
        """Run the worker's sub-model on ``batch``; fp16 features come back with the compute time."""
        start = time.perf_counter()
        payload = encode_batch(batch)
        encoded = time.perf_counter()
        reply = self._call("Infer", pb.InferRequest(model_sha256=model_sha256, batch=payload), timeout)
        received = time.perf_counter()
        try:
            features = decode_features(reply.features, list(reply.shape), reply.dtype)
        except BadRequestError as exc:
            raise GrpcTransportError(f"{self.uri}: worker sent inconsistent features: {exc}",
                                     grpc.StatusCode.DATA_LOSS) from None
        client_ms = ((encoded - start) + (time.perf_counter() - received)) * 1000
        return InferResult(features, reply.compute_ms, {"worker": reply.worker},
                           serialize_ms=client_ms + reply.serialize_ms)

    def health(self, *, timeout: float = 2.0) -> dict[str, Any]:
        """Liveness, loaded models and counters."""
        r = self._call("Health", pb.HealthRequest(), timeout)
        return {"ok": r.ok, "name": r.name, "models": list(r.models), "requests": r.requests, "errors": r.errors,
                "draining": r.draining, "refused": r.refused, "inflight": r.inflight}

    def info(self, *, timeout: float = 2.0) -> dict[str, Any]:
        """Versions, loaded models, torch threads, message limit and whether TLS/auth are on."""
        r = self._call("Info", pb.InfoRequest(), timeout)
        limits = {"max_batch": r.max_batch, "max_tokens": r.max_tokens, "max_pixels": r.max_pixels,
                  "max_input_bytes": r.max_input_bytes}
        return {"name": r.name, "versions": dict(r.versions), "models": list(r.models), "threads": r.threads,
                "max_message_bytes": r.max_message_bytes, "tls": r.tls, "auth": r.auth,
                "limits": {k: v for k, v in limits.items() if v > 0},
                "max_memory_bytes": r.max_memory_bytes, "used_memory_bytes": r.used_memory_bytes,
                "max_inflight": r.max_inflight}

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()


class GrpcTransport(ServingTransport):
    """``grpc://host:port``: connects with :class:`GrpcClient`, serves with :class:`WorkerServer`."""

    def connect(self, uri: str) -> GrpcClient:
        """A client for ``grpc://host:port[?tls=1&…]`` (see :class:`GrpcClient`)."""
        return GrpcClient(uri)

    def serve(self, listen: str, worker: WorkerState, options: ServeOptions) -> WorkerServer:
        """Serve ``worker`` on ``listen`` with the options' token, TLS, message limit and request threads."""
        return serve(listen, state=worker, token=options.token, tls_cert=options.tls_cert, tls_key=options.tls_key,
                     allow_remote=options.allow_remote,
                     max_message_bytes=options.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES,
                     max_workers=options.request_threads, max_inflight=options.max_inflight,
                     spool_dir=options.spool_dir)

    def worker_uri(self, host: str, port: int) -> str:
        """``grpc://HOST:PORT`` (an IPv6 literal in brackets)."""
        return f"grpc://{join_hostport(host, port)}"


@hookimpl
def register_transports(register: Register) -> None:
    """Register the ``grpc`` scheme."""
    register("grpc", GrpcTransport())


__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "GrpcBadRequestError", "GrpcClient", "GrpcModelNotLoadedError",
           "GrpcTransport", "GrpcTransportError", "WorkerServer", "is_loopback", "serve", "split_hostport"]
