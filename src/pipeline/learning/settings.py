"""Config ``train`` of one training run as one frozen object: ``TrainSettings``, built once by the
train stage's ``main`` (a variant's: ``pipeline.learning.variants.hyperparameters`` first) and read
by the trainer, fine-tuning, tracking and checkpoints.

>>> TrainSettings.of({"epochs": 3}).epochs, TrainSettings.of({}).batch_size > 0
(3, True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

from pipeline.common import config
from pipeline.common.errors import InputError


@dataclass(frozen=True)
class TrainSettings:
    """Config ``train`` without ``variants`` (keys and meanings: config/README.md; the fields in the
    schema's order). ``model_args``, ``sampler`` and ``augmentation`` stay mappings: their keys
    depend on the network, the sampler kind and the transforms (``build_model``, ``build_sampler``,
    ``Augmentation``)."""

    model: str
    model_args: dict
    sampler: dict
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    patience: int
    min_epochs: int
    class_weights: str
    ema: float
    ema_warmup: bool
    seed: int
    init_from: str | None
    freeze: bool | int | str | list[str]
    package_head: str
    head_init: str
    backbone_lr_factor: float
    augmentation: dict
    amp: bool
    gpus: int
    tracking: str
    prefetch: int

    @classmethod
    def of(cls, train: Mapping) -> "TrainSettings":
        """The settings of config ``train`` (one variant's; a ``variants`` key is left out): a key it
        leaves out is the schema's default, an unknown key an InputError naming it."""
        settings = config.build(cls, ["train"], train)
        if settings.tracking not in ("none", "mlflow"):
            raise InputError(f"config `train.tracking` must be 'none' or 'mlflow', not {settings.tracking!r}")
        return settings

    def asdict(self) -> dict:
        """The settings as config ``train``'s mapping, keys in alphabetical order: the order of the
        workflow's ``--config`` (sorted JSON), so ``hyperparameters.json`` and the run's
        fingerprint (``checkpoints.fingerprint``) are what they were when a dict came down."""
        values = asdict(self)
        return {key: values[key] for key in sorted(values)}
