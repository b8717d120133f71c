"""A seeded fuzz suite against a real ``coformer worker`` process on loopback, bounded to about a minute.

Four phases (random bytes to every RPC, mutated valid requests, absurd configs, malformed
batches; see :mod:`coformer_transports.fuzz`). After each phase: the worker is alive, a valid
request returns bit-identical features to before, and the worker's RSS stayed within
``RSS_MARGIN_BYTES`` of its RSS once loaded and warmed up.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

import coformer
from coformer.artifacts import submodel_artifact
from coformer.offline.decompose import proportional_specs
from coformer_transports.fuzz import PHASES, WorkerFuzzer
from coformer_transports.grpc_transport import GrpcClient
from coformer_transports.worker_process import rss_bytes, start_worker, stop_worker

pytestmark = pytest.mark.timeout(240)

SEED = 14
REQUESTS_PER_PHASE = 250
#: The worker's RSS may grow this much over its loaded, warmed-up RSS during fuzzing.
RSS_MARGIN_BYTES = 64 * 2**20


@pytest.fixture(scope="module")
def arts() -> dict[str, Any]:
    """Two tiny BERT sub-models (one loaded, one spare for config fuzzing) and a valid batch."""
    torch.manual_seed(0)
    backbone = coformer.create_backbone("bert")
    teacher = backbone.tiny(num_labels=3)
    batch = backbone.example_batch(teacher, batch_size=2)
    subs = backbone.decompose(teacher, proportional_specs(backbone.shape(teacher), [2, 1]), batch=batch)
    return {"arts": [submodel_artifact(s.eval()) for s in subs], "batch": batch}


def test_fuzzed_requests_leave_the_worker_up_unchanged_and_bounded(arts: dict[str, Any]) -> None:
    loaded, spare = arts["arts"]
    batch = arts["batch"]
    proc, uri = start_worker("--threads", "1", "--max-memory-mb", "512", "--max-batch", "64")
    try:
        client = GrpcClient(uri)
        client.load(loaded)
        reference = client.infer(loaded.sha256, batch).features
        for _ in range(20):  # warm up allocator and gRPC buffers before taking the RSS baseline
            client.infer(loaded.sha256, batch)
        baseline = rss_bytes(proc.pid)
        fuzzer = WorkerFuzzer(client, loaded, spare, batch, seed=SEED, vocab_size=100, max_tokens=64)
        start = time.monotonic()
        for phase in PHASES:
            result = fuzzer.run(phase, REQUESTS_PER_PHASE)
            assert not result.faults, f"{phase}: worker faults {result.faults[:3]}"
            assert result.sent == REQUESTS_PER_PHASE and sum(result.refused.values()) > 0, phase
            assert proc.poll() is None, f"worker died in phase {phase}"
            assert client.health()["ok"]
            assert torch.equal(client.infer(loaded.sha256, batch).features, reference), f"answer changed: {phase}"
            grown = rss_bytes(proc.pid) - baseline
            assert grown < RSS_MARGIN_BYTES, f"{phase}: RSS grew {grown / 2**20:.1f} MB (bound 64 MB)"
        assert time.monotonic() - start < 90
    finally:
        stop_worker(proc)
