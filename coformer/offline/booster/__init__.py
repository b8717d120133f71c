"""Calibration: progressive boosting distillation of the sub-models, then aggregator training.

:mod:`.progressive` (the method, :func:`calibrate`), :mod:`.weights` (sample-weight rules),
:mod:`.training` (student, losses, feature passes), :mod:`.checkpoint` (resume),
:mod:`.aggregator_training` (:func:`train_aggregator`), :mod:`.config` (settings, results).
"""

from coformer.offline.booster.aggregator_training import train_aggregator
from coformer.offline.booster.checkpoint import CheckpointMismatchError
from coformer.offline.booster.config import LR_SCHEDULES, BoosterConfig, CalibrationResult
from coformer.offline.booster.progressive import calibrate
from coformer.offline.booster.training import submodel_features, teacher_features, teacher_hard_labels
from coformer.offline.booster.weights import (DEPRECATED_WEIGHT_RULES, WEIGHT_RULES, resolve_weight_rule,
                                              update_weights)

__all__ = ["BoosterConfig", "CalibrationResult", "CheckpointMismatchError", "DEPRECATED_WEIGHT_RULES", "LR_SCHEDULES",
           "WEIGHT_RULES", "calibrate", "resolve_weight_rule",
           "submodel_features", "teacher_features", "teacher_hard_labels", "train_aggregator", "update_weights"]
