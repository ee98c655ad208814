"""The training configuration: one plain dataclass, validated once at the edge.

A run's resolved config is saved beside its results (``config.yaml``), so any result can be reproduced, and
the search reads the same field names from ``search_spaces/*.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trainers.errors import FoldtuneError
from trainers.heads import HEADS
from trainers.losses import LOSSES
from trainers.transforms import AUGMENTATIONS, TTA_VIEWS

DEVICES = ("auto", "cpu", "cuda")
AUGMENT_PLACES = ("auto", "loader", "device")


class ConfigError(FoldtuneError, ValueError):
    """A configuration value a user must fix; the message names the key and the allowed values."""


@dataclass
class TrainConfig:
    """Every hyperparameter of one k-fold training run (all k fold models share it)."""

    backbone: str = "resnet10t"
    pretrained: bool | str = False  # False, True (timm hub / HF cache), a file path, or "package:<dist>"
    head: str = "single"  # "single" 18-way, or "multitask" mask/gender/age heads
    task_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # multitask loss weights (mask, gender, age)
    image_size: tuple[int, int] = (128, 96)  # (height, width) fed to the network and stored in the cache
    crop: tuple[float, float, float, float] | None = None  # face box (top, bottom, left, right) fractions
    batch_size: int = 32
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    loss: str = "focal"
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    class_alpha: bool = False  # per-class alpha (inverse frequency) in the loss
    weighted_sampler: bool = False  # class-balanced WeightedRandomSampler for training batches
    freeze_depth: int = 0
    drop_rate: float = 0.0
    k: int = 5
    # folds actually trained: 0 = all k; n = the first n only (a planned search screens configurations on
    # one fold, a third of the compute at k=3; a single model that stops at its best epoch on a 10% slice
    # is k=10, train_folds=1)
    train_folds: int = 0
    folds_seed: int = 42
    seed: int = 42
    patience: int = 5  # early stopping on mean validation macro F1; 0 disables
    drop_ages: tuple[int, ...] = ()  # ages removed from TRAINING only (validation keeps them)
    augment: dict[str, float] = field(
        default_factory=lambda: {"hflip": 0.5, "shift_scale_rotate": 0.5, "color_jitter": 0.5}
    )
    tta: tuple[str, ...] = ("hflip",)
    age_edges: tuple[int, int] = (30, 60)
    # loader worker processes per fold (they persist for the whole run); auto: none on the CPU, on CUDA one
    # with device augmentation (it only slices the cache), the trial's CPU threads with loader augmentation
    num_workers: int | str = 0
    # where augmentation runs: "loader" (CPU, per image), "device" (batched, on the GPU); auto: device on CUDA
    augment_on: str = "auto"
    resume_every_epochs: int = 1  # write the resume state (last.pt) every N epochs ...
    resume_every_minutes: float = 0.0  # ... or when this many minutes passed since the last one (0: off)
    device: str = "auto"
    amp: bool = True  # CUDA only: bf16 where supported, else fp16 with loss scaling
    channels_last: bool = True  # CUDA only
    cudnn_benchmark: bool = True  # CUDA only: cuDNN times its algorithms once per (fixed) input shape
    tf32: bool = True  # CUDA only: float32 matrix products on tensor cores (matmul precision "high")
    fused_adamw: bool = True  # CUDA only: one fused AdamW kernel (and no host sync in fp16 GradScaler.step)
    compile: bool = False  # torch.compile the training forward; off until a GPU measures it (make bench-gpu)

    def __post_init__(self) -> None:
        self._coerce()
        self.validate()

    def _coerce(self) -> None:
        """Give every field its declared type, naming the key when a value cannot be one.

        YAML reads ``lr: 1e-3`` as the string "1e-3" (YAML 1.1 wants ``1.0e-3``); without this the string
        would reach the optimizer and fail there, far from the config file.
        """
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            kind = _FIELD_KINDS.get(str(spec.type))
            if kind is None or value is None:
                continue
            try:
                if spec.type.startswith("tuple["):
                    if isinstance(value, (str, bytes, dict)):
                        raise TypeError
                    setattr(self, spec.name, tuple(kind(v) for v in value))
                else:
                    setattr(self, spec.name, kind(value))
            except (TypeError, ValueError):
                one, many = _KIND_NAMES[kind]
                expected = f"a list of {many}" if spec.type.startswith("tuple[") else one
                raise ConfigError(f"config key '{spec.name}': expected {expected}, got {value!r}") from None
        if not isinstance(self.augment, dict):
            raise ConfigError(
                f"config key 'augment': expected a mapping of probabilities, got {self.augment!r}"
            )
        augment = {}
        for name, probability in self.augment.items():
            try:
                augment[name] = float(probability)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"config key 'augment.{name}': expected a probability, got {probability!r}"
                ) from None
        self.augment = augment

    @property
    def folds_trained(self) -> int:
        """How many folds this run trains (the first ones): ``train_folds``, or all k when it is 0."""
        return int(self.train_folds) or int(self.k)

    def validate(self) -> None:
        def need(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"config key '{key}': {message}")

        need(isinstance(self.backbone, str) and bool(self.backbone), "backbone", "must be a timm model name")
        need(self.head in HEADS, "head", f"must be one of {list(HEADS.names())}, got {self.head!r}")
        need(self.loss in LOSSES, "loss", f"must be one of {list(LOSSES.names())}, got {self.loss!r}")
        need(self.device in DEVICES, "device", f"must be one of {list(DEVICES)}, got {self.device!r}")
        need(
            self.augment_on in AUGMENT_PLACES,
            "augment_on",
            f"must be one of {list(AUGMENT_PLACES)}, got {self.augment_on!r}",
        )
        need(
            self.num_workers == "auto" or int(self.num_workers) >= 0,
            "num_workers",
            f"must be auto or a number >= 0, got {self.num_workers!r}",
        )
        need(int(self.resume_every_epochs) >= 1, "resume_every_epochs", "must be >= 1")
        need(float(self.resume_every_minutes) >= 0, "resume_every_minutes", "must be >= 0 (0: off)")
        need(
            len(self.image_size) == 2 and all(int(s) >= 16 for s in self.image_size),
            "image_size",
            f"must be [height, width] of at least 16 pixels each, got {self.image_size!r}",
        )
        need(int(self.batch_size) >= 1, "batch_size", f"must be >= 1, got {self.batch_size!r}")
        need(int(self.epochs) >= 1, "epochs", f"must be >= 1, got {self.epochs!r}")
        need(float(self.lr) > 0, "lr", f"must be > 0, got {self.lr!r}")
        need(float(self.focal_gamma) >= 0, "focal_gamma", f"must be >= 0, got {self.focal_gamma!r}")
        need(0 <= float(self.label_smoothing) < 1, "label_smoothing", "must be in [0, 1)")
        need(int(self.freeze_depth) >= 0, "freeze_depth", f"must be >= 0, got {self.freeze_depth!r}")
        need(int(self.k) >= 2, "k", f"must be >= 2 folds, got {self.k!r}")
        need(
            0 <= int(self.train_folds) <= int(self.k),
            "train_folds",
            f"must be 0 (all k folds) or 1..k={self.k}, got {self.train_folds!r}",
        )
        need(int(self.patience) >= 0, "patience", f"must be >= 0, got {self.patience!r}")
        need(len(self.task_weights) == 3, "task_weights", "must be three weights [mask, gender, age]")
        bad_views = TTA_VIEWS.unknown(self.tta)
        need(not bad_views, "tta", f"unknown views {bad_views}; allowed: {list(TTA_VIEWS.names())}")
        unknown_steps = AUGMENTATIONS.unknown(self.augment)
        need(
            not unknown_steps,
            "augment",
            f"unknown augmentation(s) {unknown_steps}; known: {list(AUGMENTATIONS.names())}",
        )
        if self.crop is not None:
            top, bottom, left, right = self.crop
            need(
                0 <= top < bottom <= 1 and 0 <= left < right <= 1,
                "crop",
                "must be fractions top<bottom, left<right",
            )
        need(
            len(self.age_edges) == 2 and self.age_edges[0] < self.age_edges[1],
            "age_edges",
            "must be two increasing ages, e.g. [30, 60]",
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a YAML/JSON mapping; unknown keys are an error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        values = dict(values)
        if isinstance(values.get("tta"), str):  # "hflip,scale" as on the command line
            values["tta"] = tuple(v for v in values["tta"].split(",") if v)
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            if isinstance(error, ConfigError):
                raise
            raise ConfigError(str(error)) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-friendly values (tuples become lists)."""
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _int(value: Any) -> int:
    """An integer from 3, "3" or 3.0; refuses 3.5 and booleans instead of truncating them."""
    if isinstance(value, bool):
        raise TypeError
    number = float(value)
    if not number.is_integer():
        raise ValueError
    return int(number)


def _int_or_auto(value: Any) -> int | str:
    """``auto`` as it is, else an integer (``_int``)."""
    return "auto" if value == "auto" else _int(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError
    return value


_KIND_NAMES = {
    _int: ("an integer", "integers"),
    _int_or_auto: ("auto or an integer", "auto or integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    _bool: ("true or false", "booleans"),
}

# declared field type -> converter for each value (tuples: for each element)
_FIELD_KINDS: dict[str, Any] = {
    "int": _int,
    "int | str": _int_or_auto,
    "float": float,
    "str": str,
    "bool": _bool,
    "tuple[float, float, float]": float,
    "tuple[int, int]": _int,
    "tuple[float, float, float, float] | None": float,
    "tuple[int, ...]": _int,
    "tuple[str, ...]": str,
}


def folds_trained_of(config: dict[str, Any]) -> int:
    """``TrainConfig.folds_trained`` of a saved config (a dict, as read from ``result.json`` or a trial's
    ``config.yaml``): the first ``train_folds`` folds, or all k (0 or absent: a foldtune without it)."""
    return int(config.get("train_folds") or 0) or int(config.get("k", 0))


# What a run trains, not what a fold model is: a screened fold model is the same model in the run that
# promotes it to all k folds (``trainers.screened``), so a fold checkpoint is compared without these.
RUN_SCOPE_FIELDS = ("train_folds",)


def same_config(saved: dict[str, Any] | None, cfg: TrainConfig, of_fold: bool = False) -> bool:
    """Whether a run's saved config (a checkpoint's, a resume state's, ``result.json``'s) is ``cfg``: the same
    value for every field, a field the saved one lacks counting as its default (written by a foldtune
    without it, e.g. before an upgrade), a key the current one lacks counting as different. ``of_fold``:
    compare a fold model's config (a fold checkpoint's), leaving out ``RUN_SCOPE_FIELDS``."""
    if not isinstance(saved, dict):
        return False
    defaults, current = TrainConfig.__new__(TrainConfig), cfg.to_dict()
    for spec in dataclasses.fields(TrainConfig):
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        setattr(defaults, spec.name, default)
    if set(saved) - set(current):
        return False
    filled = {**TrainConfig.to_dict(defaults), **saved}
    ignored = RUN_SCOPE_FIELDS if of_fold else ()
    return all(_plain(filled[key]) == _plain(value) for key, value in current.items() if key not in ignored)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]
