"""A seeded fuzzer for a gRPC worker: what the fuzz suite (tests/test_fuzz.py) and the robustness
benchmark (examples/worker_robustness.py) send.

Phases, each a generator of calls that must end in success or a *typed* refusal
(INVALID_ARGUMENT, RESOURCE_EXHAUSTED, FAILED_PRECONDITION), never a worker fault:

- ``bytes``: random bytes to every RPC (unary and the weights stream);
- ``mutated``: valid Infer/LoadModel/stream requests with bits flipped, bytes cut or inserted;
- ``configs``: sub-model configs with absurd, negative, non-integer or inconsistent dimensions;
- ``batches``: wrong dtypes or ranks, out-of-vocabulary or negative ids, over-long sequences,
  extra or missing keys, ragged and empty batches.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import grpc
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from coformer.transport import BadRequestError, SubModelArtifact, TransportError, encode_batch, sha256
from coformer_transports.grpc_transport import GrpcClient
from coformer_transports.proto import coformer_pb2 as pb

PHASES = ("bytes", "mutated", "configs", "batches")
#: Status codes that count as a typed refusal (the worker understood and said no).
TYPED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}
_UNARY = ("HasModel", "LoadModel", "Infer", "Health", "Info")


@dataclass
class PhaseResult:
    """What one phase's requests got back."""

    sent: int = 0
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)


class WorkerFuzzer:
    """Fuzz one worker that holds ``loaded``; ``spare`` is another artifact it does not hold (for configs)."""

    def __init__(self, client: GrpcClient, loaded: SubModelArtifact, spare: SubModelArtifact,
                 batch: dict[str, torch.Tensor], *, seed: int = 0, vocab_size: int = 100, max_tokens: int = 64):
        self.client = client
        self.loaded, self.spare, self.batch = loaded, spare, batch
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.vocab_size, self.max_tokens = vocab_size, max_tokens

    # -- one call, classified

    def _run(self, call: Callable[[], Any], result: PhaseResult) -> None:
        result.sent += 1
        try:
            call()
            result.accepted += 1
        except (BadRequestError, TransportError) as exc:
            code = getattr(exc, "code", None)
            if code in TYPED or (code is None and isinstance(exc, BadRequestError)):
                result.refused[code.name if code else "BadRequest"] = result.refused.get(
                    code.name if code else "BadRequest", 0) + 1
            else:
                result.faults.append(f"{type(exc).__name__}: {exc}"[:300])

    def run(self, phase: str, count: int) -> PhaseResult:
        """Send ``count`` requests of ``phase``; returns their outcomes."""
        gen = {"bytes": self._bytes, "mutated": self._mutated, "configs": self._configs,
               "batches": self._batches}[phase]()
        result = PhaseResult()
        for _ in range(count):
            self._run(next(gen), result)
        return result

    # -- generators of calls

    def _random_bytes(self, lo: int = 0, hi: int = 512) -> bytes:
        return self.rng.randbytes(self.rng.randint(lo, hi))

    def _bytes(self) -> Iterator[Callable[[], Any]]:
        while True:
            method = self.rng.choice(_UNARY + ("LoadModelStream",))
            if method == "LoadModelStream":
                chunks = [self._random_bytes() for _ in range(self.rng.randint(0, 3))]
                yield lambda c=chunks: self.client.call_raw_stream("LoadModelStream", c)
            else:
                payload = self._random_bytes()
                yield lambda m=method, p=payload: self.client.call_raw(m, p)

    def _mutate(self, data: bytes) -> bytes:
        b = bytearray(data)
        for _ in range(self.rng.randint(1, 8)):
            op = self.rng.random()
            if op < 0.6 and b:
                i = self.rng.randrange(len(b))
                b[i] ^= 1 << self.rng.randrange(8)
            elif op < 0.8 and b:
                del b[self.rng.randrange(len(b)):]
            else:
                i = self.rng.randrange(len(b) + 1)
                b[i:i] = self.rng.randbytes(self.rng.randint(1, 16))
        return bytes(b)

    def _mutated(self) -> Iterator[Callable[[], Any]]:
        infer = pb.InferRequest(model_sha256=self.loaded.sha256, batch=encode_batch(self.batch)).SerializeToString()
        spare_cfg = json.dumps(self.spare.config)
        load = pb.LoadModelRequest(sha256=self.spare.sha256, config_json=spare_cfg,
                                   weights=self.spare.weights).SerializeToString()
        first = pb.LoadModelChunk(sha256=self.spare.sha256, config_json=spare_cfg,
                                  total_bytes=len(self.spare.weights), data=self.spare.weights).SerializeToString()
        while True:
            kind = self.rng.random()
            if kind < 0.6:
                yield lambda p=self._mutate(infer): self.client.call_raw("Infer", p)
            elif kind < 0.8:
                yield lambda p=self._mutate(load): self.client.call_raw("LoadModel", p)
            else:
                yield lambda p=self._mutate(first): self.client.call_raw_stream("LoadModelStream", [p])

    def _configs(self) -> Iterator[Callable[[], Any]]:
        base = self.spare.config
        values: list[Any] = [-1, 0, -(10**6), 10**6, 10**9, 10**30, 2.5, -0.5, "x", None, [], {}, [10**9], [-3],
                             True, float("inf")]
        keys = list(base)
        state = st_load(self.spare.weights)
        n = 0
        while True:
            cfg = json.loads(json.dumps(base))
            for _ in range(self.rng.randint(1, 3)):
                key = self.rng.choice(keys)
                if isinstance(cfg.get(key), list) and cfg[key] and self.rng.random() < 0.5:
                    cfg[key][self.rng.randrange(len(cfg[key]))] = self.rng.choice(values)
                elif isinstance(cfg.get(key), list) and self.rng.random() < 0.5:
                    cfg[key] = cfg[key] * self.rng.choice([0, 2, 1000])  # inconsistent layer counts
                else:
                    cfg[key] = self.rng.choice(values)
            if self.rng.random() < 0.1:
                cfg.pop(self.rng.choice(keys), None)
            try:
                text = json.dumps(cfg)
            except ValueError:
                continue
            # fresh weights bytes (same tensors, a new metadata tag) so no earlier load is found cached:
            # the sha256 matches, only the config is wrong
            n += 1
            weights = st_save(state, metadata={"fuzz": str(n)})
            yield lambda t=text, w=weights: self.client._call("LoadModel", pb.LoadModelRequest(
                sha256=sha256(w), config_json=t, weights=w), 10.0)

    def _batches(self) -> Iterator[Callable[[], Any]]:
        ids, mask = self.batch["input_ids"], self.batch["attention_mask"]
        b, t = ids.shape
        g = self.gen
        makers: list[Callable[[], dict[str, torch.Tensor]]] = [
            lambda: {"input_ids": ids.float(), "attention_mask": mask},
            lambda: {"input_ids": ids.to(torch.int8), "attention_mask": mask},
            lambda: {"input_ids": ids.bool(), "attention_mask": mask},
            lambda: {"input_ids": ids[:, :, None], "attention_mask": mask},
            lambda: {"input_ids": ids[0], "attention_mask": mask[0]},
            lambda: {"input_ids": ids.reshape(1, 1, b, t), "attention_mask": mask},
            lambda: {"input_ids": ids + self.vocab_size + torch.randint(0, 10**6, (1,), generator=g),
                     "attention_mask": mask},
            lambda: {"input_ids": ids - torch.randint(1, 10**6, (1,), generator=g), "attention_mask": mask},
            lambda: {"input_ids": torch.randint(0, self.vocab_size, (b, self.max_tokens + self.rng.randint(1, 2000)),
                                                generator=g)},
            lambda: {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.zeros(b, 3, 8, 8)},
            lambda: {"input_ids": ids, "attention_mask": mask, "unknown": torch.zeros(b, t)},
            lambda: {"attention_mask": mask},
            lambda: {"input_ids": ids, "attention_mask": mask[:1]},
            lambda: {"input_ids": ids[:0], "attention_mask": mask[:0]},
            lambda: {"input_ids": torch.randint(0, self.vocab_size, (self.rng.randint(65, 5000), 4), generator=g)},
            lambda: {"input_ids": ids, "attention_mask": torch.full((b, t), float("nan"))},
            lambda: {"input_ids": ids, "token_type_ids": torch.full((b, t), 7)},
        ]
        while True:
            batch = self.rng.choice(makers)()
            yield lambda bt=batch: self.client.infer(self.loaded.sha256, bt, timeout=10.0)
