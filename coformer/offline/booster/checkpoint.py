"""Checkpoint/resume of a calibration run: one directory, safetensors and JSON, no pickle."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor, nn

from coformer.data import TensorDataset
from coformer.offline.booster.config import BoosterConfig
from coformer.offline.booster.training import Student

CHECKPOINT_FORMAT = 1


class CheckpointMismatchError(ValueError):
    """A checkpoint directory holds a run with different settings or data."""


def fingerprint(config: BoosterConfig, train: TensorDataset, submodels: Sequence[nn.Module],
                 teacher_labels: Tensor) -> dict[str, Any]:
    h = hashlib.sha256()
    for key in sorted(train.inputs):
        h.update(key.encode())
        h.update(train.inputs[key].detach().cpu().contiguous().numpy().tobytes())
    h.update(train.labels.cpu().numpy().tobytes())
    h.update(teacher_labels.cpu().long().numpy().tobytes())
    return {"format": CHECKPOINT_FORMAT, "seed": config.seed, "epochs": config.epochs, "lr": config.lr,
            "batch_size": config.batch_size, "weight_rule": config.weight_rule,
            "feature_weight": config.feature_weight, "lr_schedule": config.lr_schedule, "samples": len(train),
            "data_sha256": h.hexdigest(),
            "submodels": [getattr(m, "config", None) or type(m).__name__ for m in submodels]}


def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class Checkpoint:
    """``state.json`` + ``weights.safetensors`` + ``submodel_<n>.safetensors`` in one directory."""

    def __init__(self, directory: str | Path, fingerprint: dict[str, Any]):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.state: dict[str, Any] = {"fingerprint": fingerprint, "completed": 0, "loss_history": [],
                                      "initial_loss": [], "final_loss": []}
        state_path = self.dir / "state.json"
        if state_path.exists():
            state = json.loads(state_path.read_text())
            if state.get("fingerprint") != fingerprint:
                old = state.get("fingerprint", {})
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise CheckpointMismatchError(
                    f"{self.dir} holds a calibration run with different {', '.join(diff)}; "
                    f"use another checkpoint_dir or delete this one to start over")
            self.state = state

    @property
    def completed(self) -> int:
        return int(self.state["completed"])

    def weights(self) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.dir / "weights.safetensors"))

    def restore(self, n: int, student: Student) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(self.dir / f"submodel_{n}.safetensors"))
        student.load_state_dict(tensors, strict=True)

    def save(self, n: int, student: Student, weights: list[Tensor], teacher_labels: Tensor,
             history: list[float], initial: float, final: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_save(dict(student.state_dict()), self.dir / f"submodel_{n}.safetensors")
        blob = {f"w_{i}": w for i, w in enumerate(weights)}
        blob["teacher_labels"] = teacher_labels
        _atomic_save(blob, self.dir / "weights.safetensors")
        self.state["completed"] = n + 1
        for key, value in (("loss_history", history), ("initial_loss", initial), ("final_loss", final)):
            self.state[key] = self.state[key][:n] + [value]
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.dir / "state.json")  # written last: marks sub-model n as finished
