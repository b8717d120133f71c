"""Shared test setup: one torch thread (test machines are small and shared) and a fixed seed per test."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("COFORMER_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    """Every test starts from the same RNG state, whatever ran before it."""
    torch.manual_seed(0)
