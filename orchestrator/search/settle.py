"""Which search this is, before Ray starts: its space, its folder, its tracking store and its label fixes.

A search is its folder ``<storage>/<name>/``. Starting one writes the choices it was started with there
(``space.yaml``, ``tracking.json``, ``relabel.csv``); resuming reads them back and refuses a command line
that would change what is searched, where it is tracked, or which labels the trials learn, so every trial
of a search is comparable with every other. These checks only touch files, so a wrong command fails
fast, before a Ray cluster is started or joined.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray import tune

from orchestrator.errors import OrchestratorError
from orchestrator.search.constants import EXPERIMENT_DIRNAME, RELABEL_COPY
from orchestrator.space import SearchSpace, load_space
from orchestrator.tracking.store import SearchTracking, resolve_tracking_uri
from trainers.io import write_text_atomic


def settle_space(
    space_path, storage_dir: Path, trials, name, resume, cpus, gpus, holdout=None
) -> tuple[SearchSpace, Path, bool]:
    """The space to run, its folder, and whether Ray's experiment is to be restored."""
    given = None
    if space_path is not None:
        given = load_space(space_path).with_overrides(trials, name, cpus, gpus, holdout)
    elif not resume:
        raise OrchestratorError("a new search needs a search space file (see search_spaces/)")
    elif holdout is not None:
        raise OrchestratorError("--holdout is part of what is searched: resume without it")
    search_name = name or (given.name if given else None)
    if search_name is None:
        raise OrchestratorError("resume needs the search name (--name) or its space file")
    search_dir = storage_dir / search_name
    saved_path = search_dir / "space.yaml"
    experiment_path = search_dir / EXPERIMENT_DIRNAME
    can_restore = experiment_path.exists() and tune.Tuner.can_restore(str(experiment_path))
    if not resume:
        if can_restore or (search_dir / "summary.json").exists():
            raise OrchestratorError(
                f"search '{search_name}' already exists in {search_dir}: pass --resume to continue it, or "
                "--name NEW_NAME to start another"
            )
        return given, search_dir, False
    if not saved_path.exists():
        if given is None:
            raise OrchestratorError(f"nothing to resume: {saved_path} does not exist")
        print(f"no search '{search_name}' to resume in {search_dir}; starting it")
        return given, search_dir, False
    saved = load_space(saved_path)
    if given is not None:  # resources may differ between machines; what is searched and how may not
        changed = sorted(
            k for k, v in given.to_dict().items() if k != "resources" and saved.to_dict().get(k) != v
        )
        if changed:
            raise OrchestratorError(
                f"search '{search_name}' was started with a different space ({', '.join(changed)} differ "
                f"from {saved_path}); resume it unchanged, or start a new search with --name NEW_NAME"
            )
    if not can_restore:
        print(f"search '{search_name}' stopped before its first trial; starting it again")
    if given is not None:
        saved = saved.with_overrides(cpus_per_trial=given.cpus_per_trial, gpus_per_trial=given.gpus_per_trial)
    return saved, search_dir, can_restore


def settle_tracking(search_dir: Path, tracking_uri: str | None, experiment_name: str) -> SearchTracking:
    """The search keeps the tracking store it started with (its file says which), so resume stays in it.

    The store is opened once here, before Ray starts and before the choice is written down, so a store
    that cannot be reached is one error naming it, and a corrected command starts cleanly."""
    record = search_dir / "tracking.json"
    if record.exists():
        saved = json.loads(record.read_text())
        if tracking_uri is not None and resolve_tracking_uri(tracking_uri) != saved["tracking_uri"]:
            raise OrchestratorError(
                f"search in {search_dir} is tracked in {saved['tracking_uri']}, "
                f"not {resolve_tracking_uri(tracking_uri)}: resume without another tracking URI"
            )
        tracking = SearchTracking(saved["tracking_uri"], saved["experiment_name"])
        tracking.open()
        return tracking
    tracking = SearchTracking(tracking_uri, experiment_name)
    tracking.open()
    search_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        json.dumps({"tracking_uri": tracking.tracking_uri, "experiment_name": experiment_name}, indent=2),
        record,
    )
    return tracking


def settle_relabel(search_dir: Path, relabel, existing: bool) -> Path | None:
    """The search's own copy of the label fixes: made at the start, reused (and enforced) on resume."""
    copy = search_dir / RELABEL_COPY
    given = None
    if relabel is not None:
        source = Path(relabel).expanduser()
        try:
            given = source.read_text()
        except OSError as error:
            raise OrchestratorError(f"--relabel {source}: cannot read it ({error.strerror})") from None
    if existing and copy.exists():
        if given is not None and given != copy.read_text():
            raise OrchestratorError(
                f"--relabel {relabel} differs from the label fixes this search started with ({copy}); resume "
                "without --relabel (the saved fixes are used), or start a new search with --name NEW_NAME"
            )
        return copy
    if existing and given is not None:
        raise OrchestratorError(
            f"this search started without label fixes; resume it without --relabel, or start a new search "
            f"with --relabel {relabel} --name NEW_NAME"
        )
    if given is None:
        copy.unlink(missing_ok=True)  # left by an abandoned start
        return None
    write_text_atomic(given, copy)
    return copy
