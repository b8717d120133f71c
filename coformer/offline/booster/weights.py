"""Sample-weight update rules between sub-models (seed eq. 13); :mod:`.progressive` explains them."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

WEIGHT_RULES = ("paper", "seed-unweighted", "boost")
#: Old rule names still accepted (with a DeprecationWarning) and what they mean now.
DEPRECATED_WEIGHT_RULES = {"seed": "seed-unweighted"}


def resolve_weight_rule(rule: str) -> str:
    """The current name of weight rule ``rule``: deprecated aliases warn and map to their new name."""
    if rule in DEPRECATED_WEIGHT_RULES:
        new = DEPRECATED_WEIGHT_RULES[rule]
        warnings.warn(f"weight rule {rule!r} is deprecated: it is {new!r} (the unweighted loss in eq. 13's "
                      f"exponent); use {new!r}, or 'paper' for eq. 13 exactly as written", DeprecationWarning,
                      stacklevel=3)
        return new
    if rule not in WEIGHT_RULES:
        raise ValueError(f"unknown weight rule {rule!r}; choose one of {', '.join(WEIGHT_RULES)}")
    return rule


def update_weights(weights: Tensor, losses: Tensor, rule: str = "boost") -> Tensor:
    """One boosting step on sample weights (seed eq. 13), renormalised to sum 1.

    ``losses`` are the unweighted per-sample losses ℓ_i = ½[CE_y + CE_ŷ]; M = ``len(weights)``.
    ``rule="paper"``: w_i·exp[(1/M − 1)·w_i·ℓ_i] (eq. 13 with eq. 14's weighted L_Bo);
    ``rule="seed-unweighted"``: w_i·exp[(1/M − 1)·ℓ_i] (hard samples lose weight fast);
    ``rule="boost"``: w_i·exp[(1 − 1/M)·ℓ_i] (hard samples gain weight). ``"seed"`` is a
    deprecated alias of ``"seed-unweighted"``. Computed in float64 in log space, so large losses
    do not overflow.
    """
    rule = resolve_weight_rule(rule)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    loss = torch.as_tensor(losses, dtype=torch.float64).flatten().to(w.device)
    if w.shape != loss.shape:
        raise ValueError(f"weights ({w.numel()}) and losses ({loss.numel()}) must have one entry per sample")
    if w.numel() == 0:
        raise ValueError("update_weights needs at least one sample")
    if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("sample weights must be finite, non-negative and not all zero")
    if not torch.isfinite(loss).all():
        raise ValueError("per-sample losses must be finite (a NaN/inf loss usually means the learning rate "
                         "is too high or mixed precision overflowed)")
    m = w.numel()
    if rule == "boost":
        exponent = (1.0 - 1.0 / m) * loss
    elif rule == "seed-unweighted":
        exponent = (1.0 / m - 1.0) * loss
    else:  # paper: L_Bo,i = w_i·ℓ_i, with the weights as they stand (summing to 1)
        exponent = (1.0 / m - 1.0) * (w / w.sum()) * loss
    logw = torch.log(w) + exponent  # log 0 = -inf keeps zero weights at zero
    logw = logw - logw.max()
    out = torch.exp(logw)
    return out / out.sum()
