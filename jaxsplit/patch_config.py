"""Patching hyper-parameters (SPEC §8)."""

from __future__ import annotations

import dataclasses
from typing import Literal


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        from jaxsplit.config import ConfigError  # late import: config imports this module

        raise ConfigError(f"{key}: {msg}")


@dataclasses.dataclass(frozen=True)
class PatchConfig:
    """The "self" patching protocol on an N-class dataset.

    The strong model (the run's model) is trained on `strong_classes`; the weak
    model on `weak_classes` + one target class (TC) taken from the strong
    classes, with at most `tc_train_images` TC training images; the TC is the
    weak model's last class.
    """

    task: Literal["self", "cifar100_cifar10"] = "self"
    strong_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    weak_classes: tuple[int, ...] = (5, 6, 7, 8, 9)
    target_classes: tuple[int, ...] | None = None  # None: every strong class
    tc_train_images: int = 500
    weak_model: Literal["weak_cnn", "simcnn", "rescnn"] = "weak_cnn"
    weak_width: float = 0.5
    weak_epochs: int = 5
    weak_learning_rate: float = 1e-3
    underfit_epochs: int = 1
    overfit_epochs: int = 30
    calibrations: tuple[str, ...] = ("min_max", "percentile", "iqr", "z_norm", "platt")

    def __post_init__(self):
        _check(len(self.strong_classes) >= 2, "patch.strong_classes", f"need >= 2 classes, got {self.strong_classes}")
        _check(not set(self.strong_classes) & set(self.weak_classes), "patch.weak_classes",
               f"must not overlap strong_classes {self.strong_classes}, got {self.weak_classes}")
        _check(self.tc_train_images >= 1, "patch.tc_train_images", f"must be >= 1, got {self.tc_train_images}")
        _check(self.weak_width > 0, "patch.weak_width", f"must be > 0, got {self.weak_width}")
        _check(self.weak_epochs >= 1, "patch.weak_epochs", f"must be >= 1, got {self.weak_epochs}")
