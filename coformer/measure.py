"""Measured costs of real modules: FLOPs (torch.utils.flop_counter), parameters, peak memory."""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from coformer.spec import SubModelCost


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter has no formula for the CPU fused attention kernel, so attention would count as 0
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs that ``fn()`` executes, counted by :class:`torch.utils.flop_counter.FlopCounterMode`.

    Scaled-dot-product attention is counted on CPU too (torch only knows its GPU kernels).
    """
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def state_bytes(module: nn.Module) -> int:
    """Bytes held by parameters and buffers."""
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class _PeakTensorMemory(TorchDispatchMode):
    """Tracks the peak bytes of live tensors created while active (CPU-friendly; no allocator needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._seen or storage.nbytes() == 0:
            return
        self._seen.add(key)
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)

        def release(k: int = key, n: int = nbytes) -> None:
            self.live -= n
            self._seen.discard(k)

        weakref.finalize(storage, release)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def peak_activation_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of tensors alive at once while ``fn()`` runs under ``no_grad`` (weights excluded)."""
    mode = _PeakTensorMemory()
    with torch.no_grad(), mode:
        out = fn()
    del out
    return mode.peak


def measure_cost(module: nn.Module, batch: dict[str, torch.Tensor]) -> SubModelCost:
    """FLOPs, parameters and memory (weights + measured peak activations) of ``module(**batch)``."""
    module.eval()
    flops = count_flops(lambda: module(**batch))
    activations = peak_activation_bytes(lambda: module(**batch))
    return SubModelCost(flops=float(flops), params=count_params(module),
                        memory_bytes=state_bytes(module) + activations)
