"""Search spaces: which TrainConfig fields a search tunes, over what ranges, and what stays fixed.

A search space is one YAML file (see ``search_spaces/``). It is validated completely when it is loaded, in
the driver, so a typo fails at once with the file and key named, instead of inside a trial an hour later.
Every searched value is checked against ``TrainConfig.from_dict`` together with the fixed values, so the
space and the trainer can never disagree about field names or allowed values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import OrchestratorError
from orchestrator.plan import Plan, PlanError, parse_plan
from trainers.config import ConfigError, TrainConfig, field_names
from trainers.folds import HOLDOUT_WANTED, holdout_value

SEARCH_KINDS = ("choice", "loguniform", "uniform", "int")
TOP_LEVEL_KEYS = (
    "name",
    "description",
    "trials",
    "fixed",
    "search",
    "resources",
    "max_concurrent",
    "scheduler",
    "sampler",
    "keep_top",
    "max_failures",
    "points_to_evaluate",
    "holdout",
    "plan",
)
# Fields every trial must share, because the driver prepares one fold file and one image cache per search.
SHARED_FIELDS = {
    "k": "all trials share one fold file",
    "folds_seed": "all trials share one fold file",
    "age_edges": "all trials share one fold file and class encoding",
    "image_size": "all trials share one image cache",
    "crop": "all trials share one image cache",
    "pretrained": "weights follow the backbone: set fixed.pretrained to a spec, 'auto' or backbone->spec",
}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FLOAT_FIELDS = {f.name for f in dataclasses.fields(TrainConfig) if f.type == "float"}


class SpaceError(OrchestratorError, ValueError):
    """A search space a user must fix; the message names the file, the key and what is allowed."""


@dataclass(frozen=True)
class Param:
    """One searched TrainConfig field: a categorical choice or a numeric range (bounds inclusive)."""

    name: str
    kind: str  # one of SEARCH_KINDS
    values: tuple  # the choices, or (low, high)

    def corners(self) -> list:
        """The values that bound this parameter: every choice, or both ends of the range."""
        return list(self.values)

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice of {list(self.values)}"
        return f"{self.kind} in [{self.values[0]}, {self.values[1]}]"


@dataclass(frozen=True)
class Asha:
    """ASHA settings; ``max_t`` (epochs) defaults to the largest epoch count a trial can have."""

    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int | None = None


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: build every trial's TrainConfig with ``config_for(params)``."""

    name: str
    trials: int
    fixed: dict[str, Any]
    search: dict[str, Param]
    pretrained: Any = False  # a spec for every backbone, "auto", or a dict backbone -> spec
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | str = 1  # trials at once, or "auto": what the cluster holds (search.capacity)
    asha: Asha | None = None
    sampler_seed: int = 42
    n_startup_trials: int = 10
    keep_top: int = 3
    max_failures: int = 0
    description: str = ""
    points_to_evaluate: tuple[dict[str, Any], ...] = ()  # full parameter sets tried first, in order
    holdout: float | str = 0.0  # share of persons kept out of every fold (or auto), to score the submission
    plan: Plan | None = None  # with a time budget: screen on few folds, then the final model (``plan``)
    source: str = "<mapping>"

    def backbones(self) -> list[str]:
        """Every backbone a trial can use (the driver resolves pretrained weights once per backbone)."""
        if "backbone" in self.search:
            return [str(v) for v in self.search["backbone"].values]
        return [str(self.fixed.get("backbone", TrainConfig().backbone))]

    def pretrained_spec(self, backbone: str) -> bool | str:
        """The ``TrainConfig.pretrained`` value for ``backbone``."""
        if isinstance(self.pretrained, Mapping):
            return self.pretrained[backbone]
        if self.pretrained == "auto":
            return auto_pretrained(backbone)
        return self.pretrained

    def config_for(self, params: Mapping[str, Any]) -> TrainConfig:
        """The full TrainConfig of one trial: fixed values, the sampled ones, the backbone's weights."""
        values = {**self.fixed, **_coerce_floats(dict(params))}
        backbone = str(values.get("backbone", TrainConfig().backbone))
        values["pretrained"] = self.pretrained_spec(backbone)
        return TrainConfig.from_dict(values)

    def screening(self) -> SearchSpace:
        """As a planned search's screen runs it: trials train ``plan.screen_folds`` fold(s) (train_folds)."""
        if self.plan is None:
            return self
        return dataclasses.replace(self, fixed={**self.fixed, "train_folds": self.plan.screen_folds})

    def max_epochs(self) -> int:
        if "epochs" in self.search:
            return int(max(self.search["epochs"].values))
        return int(self.fixed.get("epochs", TrainConfig().epochs))

    def with_overrides(
        self,
        trials: int | None = None,
        name: str | None = None,
        cpus_per_trial: float | None = None,
        gpus_per_trial: float | None = None,
        holdout: float | str | None = None,
    ) -> SearchSpace:
        """A copy with command-line overrides applied, validated like the file itself."""
        raw = self.to_dict()
        if trials is not None:
            raw["trials"] = trials
        if name is not None:
            raw["name"] = name
        if cpus_per_trial is not None:
            raw["resources"]["cpu"] = cpus_per_trial
        if gpus_per_trial is not None:
            raw["resources"]["gpu"] = gpus_per_trial
        if holdout is not None:
            raw["holdout"] = holdout
        return parse_space(raw, source=f"{self.source} (with command-line overrides)")

    def to_dict(self) -> dict[str, Any]:
        """The normalised space as plain YAML values (what the search folder's ``space.yaml`` holds)."""
        fixed = {k: list(v) if isinstance(v, tuple) else v for k, v in self.fixed.items()}
        pretrained = dict(self.pretrained) if isinstance(self.pretrained, Mapping) else self.pretrained
        return {
            "name": self.name,
            "description": self.description,
            "trials": self.trials,
            "fixed": {**fixed, "pretrained": pretrained},
            "search": {p.name: {p.kind: list(p.values)} for p in self.search.values()},
            "resources": {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial},
            "max_concurrent": self.max_concurrent,
            "scheduler": "none" if self.asha is None else {"asha": dataclasses.asdict(self.asha)},
            "sampler": {"seed": self.sampler_seed, "n_startup_trials": self.n_startup_trials},
            "keep_top": self.keep_top,
            "max_failures": self.max_failures,
            "points_to_evaluate": [dict(point) for point in self.points_to_evaluate],
            "holdout": self.holdout,
            "plan": "none" if self.plan is None else self.plan.to_dict(),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def auto_pretrained(backbone: str) -> bool | str:
    """``pretrained: auto``: the installed weights package where one exists for the backbone, else timm's."""
    from trainers.weights import PACKAGE_FOR_BACKBONE, PACKAGE_PREFIX

    dist = PACKAGE_FOR_BACKBONE.get(backbone.split(".")[0])
    return f"{PACKAGE_PREFIX}{dist}" if dist else True


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search space YAML file; every problem is a SpaceError naming file and key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpaceError(
            f"search space file {path} does not exist; see search_spaces/ for examples"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise SpaceError(f"cannot read search space {path}: {error}") from None
    except yaml.YAMLError as error:
        raise SpaceError(f"search space {path} is not valid YAML: {error}") from None
    return parse_space(raw, source=str(path))


def parse_space(raw: Any, source: str = "<mapping>") -> SearchSpace:
    """Validate a search space mapping (as read from YAML) and build the SearchSpace."""

    def fail(key: str, message: str) -> SpaceError:
        return SpaceError(f"search space {source}: '{key}': {message}")

    if not isinstance(raw, Mapping):
        raise SpaceError(f"search space {source} must be a mapping with keys {list(TOP_LEVEL_KEYS)}")
    unknown = sorted(set(map(str, raw)) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise fail(unknown[0], f"unknown key(s) {unknown}; allowed keys: {list(TOP_LEVEL_KEYS)}")

    name = raw.get("name", Path(source).stem if source.endswith((".yaml", ".yml")) else None)
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise fail("name", f"must be a folder-safe name (letters, digits, '_', '-', '.'), got {name!r}")

    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, Mapping):
        raise fail("fixed", "must be a mapping of TrainConfig fields to values")
    fixed = _coerce_floats({str(k): v for k, v in fixed.items()})
    pretrained = fixed.pop("pretrained", False)

    search_raw = raw.get("search") or {}
    if not isinstance(search_raw, Mapping) or not search_raw:
        raise fail("search", f"must map at least one TrainConfig field to one of {list(SEARCH_KINDS)}")
    search = {str(key): _parse_param(str(key), spec, fail) for key, spec in search_raw.items()}
    both = sorted(set(search) & set(fixed))
    if both:
        raise fail(f"search.{both[0]}", "is both fixed and searched; keep it in one of 'fixed' or 'search'")

    resources = raw.get("resources") or {}
    if not isinstance(resources, Mapping) or set(resources) - {"cpu", "gpu"}:
        raise fail("resources", f"must be a mapping with 'cpu' and 'gpu' per trial, got {resources!r}")
    cpus = _number(resources.get("cpu", 1), "resources.cpu", fail, low=0, low_open=True)
    gpus = _number(resources.get("gpu", 0), "resources.gpu", fail, low=0)
    if gpus > 1 and gpus != int(gpus):
        raise fail(
            "resources.gpu", f"must be a fraction up to 1 (0.5 packs 2 trials per GPU) or whole, got {gpus}"
        )

    sampler = raw.get("sampler") or {}
    if not isinstance(sampler, Mapping) or set(sampler) - {"seed", "n_startup_trials"}:
        raise fail("sampler", f"must be a mapping with 'seed' and 'n_startup_trials', got {sampler!r}")

    space = SearchSpace(
        name=name,
        trials=_whole(raw.get("trials", 10), "trials", fail, low=1),
        fixed=fixed,
        search=search,
        pretrained=pretrained,
        cpus_per_trial=cpus,
        gpus_per_trial=gpus,
        max_concurrent=_concurrency(raw.get("max_concurrent", 1), fail),
        asha=_parse_scheduler(raw.get("scheduler", "none"), fail),
        sampler_seed=_whole(sampler.get("seed", 42), "sampler.seed", fail, low=0),
        n_startup_trials=_whole(sampler.get("n_startup_trials", 10), "sampler.n_startup_trials", fail, low=0),
        keep_top=_whole(raw.get("keep_top", 3), "keep_top", fail, low=1),
        max_failures=_whole(raw.get("max_failures", 0), "max_failures", fail, low=0),
        description=str(raw.get("description") or ""),
        points_to_evaluate=_parse_points(raw.get("points_to_evaluate") or [], search, fail),
        holdout=_holdout(raw.get("holdout", 0.0), fail),
        plan=_plan(raw.get("plan"), fixed, search, fail),
        source=source,
    )
    if len(space.points_to_evaluate) > space.trials:
        raise fail(
            "points_to_evaluate", f"lists {len(space.points_to_evaluate)} points for {space.trials} trials"
        )
    _check_pretrained(space, fail)
    _check_backbones(space, fail)
    _check_configs(space, fail)
    _check_freeze_depth(space, fail)
    if space.asha is not None:
        max_t = space.asha.max_t or space.max_epochs()
        if space.asha.grace_period > max_t:
            raise fail(
                "scheduler.asha.grace_period", f"is {space.asha.grace_period} but trials run {max_t} epochs"
            )
    return space


def _parse_param(key: str, spec: Any, fail) -> Param:
    where = f"search.{key}"
    if key not in field_names():
        close = difflib.get_close_matches(key, field_names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise fail(where, f"is not a TrainConfig field{hint}; fields: {field_names()}")
    if key in SHARED_FIELDS:
        raise fail(where, f"cannot be searched: {SHARED_FIELDS[key]}; put it under 'fixed'")
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
        raise fail(
            where,
            f"must be one of {{choice: [a, b, ...]}}, {{loguniform: [low, high]}}, {{uniform: [low, high]}}, "
            f"{{int: [low, high]}}; got {spec!r}",
        )
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list | tuple) or not values:
        raise fail(where, f"{kind} needs a non-empty list, got {values!r}")
    if kind == "choice":
        values = list(_coerce_floats({key: v})[key] for v in values)
        bad = [v for v in values if v is not None and not isinstance(v, str | int | float | bool)]
        if bad:
            raise fail(
                where, f"choices must be strings, numbers, booleans or null (Optuna's rule), got {bad}"
            )
        if len(set(map(repr, values))) != len(values):
            raise fail(where, f"choices repeat a value: {values}")
        return Param(key, kind, tuple(values))
    if len(values) != 2:
        raise fail(where, f"{kind} needs exactly [low, high], got {values!r}")
    if kind == "int":
        low, high = (_whole(v, where, fail) for v in values)
    else:
        low, high = (_number(v, where, fail) for v in values)
        if kind == "loguniform" and low <= 0:
            raise fail(where, f"loguniform needs low > 0, got {low}")
    if not low < high:
        raise fail(where, f"needs low < high, got [{low}, {high}] (put a single value under 'fixed')")
    return Param(key, kind, (low, high))


def _parse_points(points: Any, search: dict[str, Param], fail) -> tuple[dict[str, Any], ...]:
    """Known configurations to try first: each gives every searched parameter a value inside its range."""
    if not isinstance(points, list):
        raise fail("points_to_evaluate", f"must be a list of {{parameter: value}} mappings, got {points!r}")
    parsed = []
    for index, point in enumerate(points):
        where = f"points_to_evaluate[{index}]"
        if not isinstance(point, Mapping) or set(point) != set(search):
            got = sorted(point) if isinstance(point, Mapping) else point
            raise fail(where, f"must give exactly the searched parameters {sorted(search)}, got {got}")
        point = _coerce_floats({str(k): v for k, v in point.items()})
        for key, value in point.items():
            param = search[key]
            if param.kind == "choice":
                inside = value in param.values
            else:
                number = isinstance(value, int | float) and not isinstance(value, bool)
                whole = param.kind != "int" or isinstance(value, int)
                inside = number and whole and param.values[0] <= value <= param.values[1]
            if not inside:
                raise fail(f"{where}.{key}", f"{value!r} is outside the search range ({param.describe()})")
        parsed.append(point)
    return tuple(parsed)


def _parse_scheduler(value: Any, fail) -> Asha | None:
    if value is None or value == "none":
        return None
    if not isinstance(value, Mapping) or set(value) != {"asha"}:
        raise fail(
            "scheduler", f"must be 'none' or {{asha: {{grace_period, reduction_factor}}}}, got {value!r}"
        )
    settings = value["asha"] or {}
    allowed = {f.name for f in dataclasses.fields(Asha)}
    if not isinstance(settings, Mapping) or set(settings) - allowed:
        raise fail("scheduler.asha", f"allowed keys: {sorted(allowed)}, got {settings!r}")
    max_t = settings.get("max_t")
    return Asha(
        grace_period=_whole(settings.get("grace_period", 1), "scheduler.asha.grace_period", fail, low=1),
        reduction_factor=_number(
            settings.get("reduction_factor", 2), "scheduler.asha.reduction_factor", fail, low=1, low_open=True
        ),
        max_t=None if max_t is None else _whole(max_t, "scheduler.asha.max_t", fail, low=1),
    )


def _check_pretrained(space: SearchSpace, fail) -> None:
    spec = space.pretrained
    if isinstance(spec, Mapping):
        missing = [b for b in space.backbones() if b not in spec]
        if missing:
            raise fail("fixed.pretrained", f"the backbone->spec mapping has no entry for {missing}")
        bad = {b: s for b, s in spec.items() if not isinstance(s, bool | str)}
    else:
        bad = {"*": spec} if not isinstance(spec, bool | str) else {}
    if bad:
        raise fail(
            "fixed.pretrained", f"specs are true/false, 'auto', a file path or 'package:<name>'; got {bad}"
        )


def _check_backbones(space: SearchSpace, fail) -> None:
    """Unknown timm names fail here, not in every trial."""
    import timm

    for backbone in space.backbones():
        if not timm.is_model(backbone):
            close = difflib.get_close_matches(backbone, timm.list_models(), n=3)
            hint = f"; close names: {close}" if close else ""
            where = "search.backbone" if "backbone" in space.search else "fixed.backbone"
            raise fail(where, f"'{backbone}' is not a timm model name{hint}")


def _check_freeze_depth(space: SearchSpace, fail) -> None:
    """A freeze depth beyond a backbone's stages would fail every such trial; check it on an empty model."""
    import torch

    from trainers.models import ModelError, build_model, count_stages

    if "freeze_depth" in space.search:
        deepest, where = int(max(space.search["freeze_depth"].values)), "search.freeze_depth"
    else:
        deepest, where = int(space.fixed.get("freeze_depth", 0)), "fixed.freeze_depth"
    if deepest == 0:
        return
    for backbone in space.backbones():
        with torch.device("meta"):  # architecture only: no memory, no weights
            model = build_model(backbone, head=str(space.fixed.get("head", "single")))
        try:
            stages = count_stages(model)
        except ModelError as error:
            raise fail(where, f"{backbone}: {error}") from None
        if deepest > stages:
            raise fail(where, f"goes up to {deepest} but {backbone} has {stages} stages; use 0..{stages}")


def _check_configs(space: SearchSpace, fail) -> None:
    """Every corner of the space (each choice, both ends of each range) must be a valid TrainConfig."""
    base = {name: param.corners()[0] for name, param in space.search.items()}
    try:
        space.config_for(base)
    except ConfigError as error:
        raise fail("fixed", str(error)) from None
    for index, point in enumerate(space.points_to_evaluate):
        try:
            space.config_for(point)
        except ConfigError as error:
            raise fail(f"points_to_evaluate[{index}]", str(error)) from None
    for name, param in space.search.items():
        for value in param.corners():
            try:
                space.config_for({**base, name: value})
            except ConfigError as error:
                raise fail(f"search.{name}", f"value {value!r} is not allowed: {error}") from None


def _coerce_floats(values: dict[str, Any]) -> dict[str, Any]:
    """YAML reads ``1e-4`` (no dot) as a string; float fields take it as the number it means."""
    for key, value in values.items():
        if key in _FLOAT_FIELDS and isinstance(value, str):
            with contextlib.suppress(ValueError):  # else left as is: TrainConfig names the key
                values[key] = float(value)
    return values


def _number(value: Any, where: str, fail, low: float | None = None, low_open: bool = False) -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise fail(where, f"must be a number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise fail(where, f"must be {'>' if low_open else '>='} {low}, got {value!r}")
    return float(value) if isinstance(value, float) else value


def _whole(value: Any, where: str, fail, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(where, f"must be a whole number, got {value!r}")
    if low is not None and value < low:
        raise fail(where, f"must be >= {low}, got {value}")
    return value


def _concurrency(value: Any, fail) -> int | str:
    """``max_concurrent``: a whole number of trials at once, or ``auto`` (what the cluster can hold)."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail("max_concurrent", f"must be auto or a whole number of trials at once, got {value!r}")
    return _whole(value, "max_concurrent", fail, low=1)


def _plan(value: Any, fixed: Mapping[str, Any], search: Mapping[str, Param], fail) -> Plan | None:
    try:
        return parse_plan(value, int(fixed.get("k", TrainConfig().k)), set(fixed) | set(search))
    except PlanError as error:
        raise fail("plan", str(error)) from None


def _holdout(value: Any, fail) -> float | str:
    """``holdout``: persons kept out of every fold, a share (0 = none) or ``auto`` (``holdout_share``)."""
    if (parsed := holdout_value(value)) is None:
        raise fail("holdout", f"must be {HOLDOUT_WANTED}, got {value!r}")
    return parsed
