"""The ensemble as a folder anyone can predict with: its fold checkpoints and a small spec, nothing else.

``foldtune ensemble`` writes it next to the submission (``<search>/ensemble_model/`` by default), after the
submission, so that new images can be scored later without the search folder, the data root or MLflow
(``foldtune predict --model SEARCH``), and MLflow logs the same folder as the model's artifact:

```
ensemble_model/
  ensemble_spec.json             format, search, class names, age edges, OOF F1 and one entry per member
  checkpoints/<trial>/fold{i}.pt the member's fold checkpoints (only the folds the ensemble used)
  checkpoints/<trial>/refit{s}.pt its refit models (``foldtune refit``), when the ensemble used them
```

A member entry says how the submission used it: ``weight`` (its share of the vote), ``tta`` (its views),
``image_size`` and ``crop`` (how images are decoded, as the image cache does), ``head``, ``amp`` and
``channels_last`` (how it ran on a GPU) and its ``checkpoints``, relative to the folder; the member's
probabilities are the plain mean over its checkpoints, fold and refit models alike, as in the submission.

The folder is built under a staging name and renamed into place, so a reader never sees half of one; a
previous bundle is replaced only once the new one is complete. Checkpoints are hard-linked when the
filesystem allows it (a checkpoint is only ever replaced atomically, never edited in place, so sharing
the file is safe and costs no disk), else copied.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from orchestrator.errors import OrchestratorError
from trainers.io import write_text_atomic

BUNDLE_DIR = "ensemble_model"
SPEC_NAME = "ensemble_spec.json"
SPEC_FORMAT = "foldtune-ensemble-1"


@dataclass
class BundleMember:
    """One member as the bundle describes it; ``checkpoints`` are (fold, source file) pairs."""

    trial_id: str
    weight: float
    tta: list[str]
    backbone: str
    head: str
    image_size: list[int]
    crop: list[float] | None
    amp: bool
    channels_last: bool
    folds: list[int]
    checkpoints: list[str] = field(default_factory=list)  # relative to the bundle folder
    oof_f1: float | None = None
    refit: int = 0  # refit models after the fold models (sources keys "refit0", "refit1", ...)


def member_from_config(
    trial_id: str,
    weight: float,
    tta: Sequence[str],
    config: dict,
    folds: Sequence[int],
    oof_f1: float | None = None,
    refit: int = 0,
) -> BundleMember:
    """A member entry from its trial's config (the values the ensemble predicted it with)."""
    return BundleMember(
        trial_id=str(trial_id),
        weight=float(weight),
        tta=[str(v) for v in tta],
        backbone=str(config.get("backbone")),
        head=str(config.get("head", "single")),
        image_size=[int(s) for s in config["image_size"]],
        crop=[float(c) for c in config["crop"]] if config.get("crop") else None,
        amp=bool(config.get("amp", True)),
        channels_last=bool(config.get("channels_last", True)),
        folds=[int(f) for f in folds],
        oof_f1=None if oof_f1 is None else float(oof_f1),
        refit=int(refit),
    )


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        shutil.copy2(source, target)


def recover_bundle(target: Path) -> None:
    """Put back a previous bundle a killed swap left aside: a process killed between ``_swap_in``'s two
    renames (SIGKILL, power) leaves no ``target`` but the previous bundle as ``.<name>.old-<pid>``."""
    target = Path(target)
    if target.exists():
        return
    aside = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if aside and (aside[-1] / SPEC_NAME).is_file():
        os.replace(aside[-1], target)


def _swap_in(staging: Path, target: Path) -> None:
    """Put the finished ``staging`` folder at ``target``, replacing a previous bundle only at the end."""
    recover_bundle(target)
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)  # put the previous bundle back
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_bundle(
    target: Path,
    members: Sequence[BundleMember],
    sources: dict[str, dict[int | str, Path]],
    class_names: Sequence[str],
    age_edges: Sequence[int],
    info: dict | None = None,
) -> Path:
    """Write the bundle folder ``target``: each member's fold checkpoints (``sources[trial][fold]``) and the
    spec, under a staging name renamed into place at the end. ``info`` adds top-level spec fields."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    entries = []
    try:
        for member in members:
            relative = []
            keys = [*member.folds, *(f"refit{i}" for i in range(member.refit))]
            for key in keys:
                name = (
                    Path("checkpoints")
                    / member.trial_id
                    / (f"fold{key}.pt" if isinstance(key, int) else f"{key}.pt")
                )
                _link_or_copy(Path(sources[member.trial_id][key]), staging / name)
                relative.append(name.as_posix())
            entries.append({**asdict(member), "checkpoints": relative})
        spec = {
            "format": SPEC_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(info or {}),
            "class_names": list(class_names),
            "age_edges": [int(e) for e in age_edges],
            "members": entries,
        }
        write_text_atomic(json.dumps(spec, indent=2), staging / SPEC_NAME)
        _swap_in(staging, target)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging, ignore_errors=True)
    return target


def read_spec(folder: Path) -> dict:
    """The bundle's spec, checked: its format, members with weights and their checkpoint files present."""
    folder = Path(folder)
    path = folder / SPEC_NAME
    if not path.is_file():
        raise OrchestratorError(
            f"{folder} is not an ensemble model folder (no {SPEC_NAME}); `foldtune ensemble` writes one "
            f"next to the submission ({BUNDLE_DIR}/)"
        )
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise OrchestratorError(f"{path} is unreadable ({error}); run `foldtune ensemble` again") from None
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise OrchestratorError(
            f"{path} has format {found!r}, not {SPEC_FORMAT!r}; run `foldtune ensemble` again"
        )
    members = spec.get("members")
    if not isinstance(members, list) or not members:
        raise OrchestratorError(f"{path} lists no members; run `foldtune ensemble` again")
    for member in members:
        missing = [c for c in member.get("checkpoints") or [] if not (folder / c).is_file()]
        if missing or not member.get("checkpoints"):
            raise OrchestratorError(
                f"{path}: member {member.get('trial_id')} lacks checkpoint(s) {missing or '(none listed)'} "
                f"in {folder}; run `foldtune ensemble` again"
            )
    return spec
