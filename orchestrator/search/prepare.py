"""Once per search, in the driver, before any trial: the data, the fold file, the image cache, the weights.

Everything every trial shares is prepared here exactly once: the data is read and validated, the fold
file is written (all trials split the same persons the same way, so their scores and out-of-fold
predictions are comparable), the image cache is built (trials only open it) and the pretrained weights are
resolved per candidate backbone (trials never touch the network). The result is the ``TrialContext``
every trial receives.

The fold file is the search's ``folds.csv``: made from the data (k and seed from the space), or copied
from a fold file the user gives (``folds_file``) after checking it fits the data and k. A resumed search
always keeps the fold file it started with.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from orchestrator.errors import OrchestratorError
from orchestrator.search.constants import FOLDS_FILE, RELABEL_COPY
from orchestrator.search.trial import TrialContext
from orchestrator.space import SearchSpace


def prepare(
    data_root: Path,
    space: SearchSpace,
    search_dir: Path,
    cache_dir,
    progress: bool,
    relabel: Path | None = None,
    folds_file: str | os.PathLike | None = None,
    resuming: bool = False,
) -> TrialContext:
    """Once per search, before any trial: data, fold file, image cache, pretrained weights."""
    from trainers.cache import prepare_cache
    from trainers.data import read_train
    from trainers.labels import AgeBands
    from trainers.weights import resolve_pretrained

    base = space.config_for({name: param.values[0] for name, param in space.search.items()})
    say = print if progress else (lambda message: None)
    data = read_train(data_root, AgeBands(tuple(base.age_edges)), relabel=relabel)
    for problem in data.problems:
        say(f"warning: {problem}")
    fixed = {field: count for field, count in data.fixes.items() if count}
    if fixed:
        say("label fixes applied (" + RELABEL_COPY + "): " + ", ".join(f"{n} {f}" for f, n in fixed.items()))
    folds = settle_folds(
        search_dir / FOLDS_FILE,
        data.table,
        k=base.k,
        seed=base.folds_seed,
        data_root=data_root,
        folds_file=folds_file,
        resuming=resuming,
        holdout=space.holdout,
    )
    say(describe_holdout(folds, space.holdout))
    if cache_dir is None:
        from trainers.cache import default_cache_dir

        cache_dir = default_cache_dir()
    cache_dir = Path(cache_dir).expanduser().absolute()
    prepare_cache(base, data.table, cache_dir, log=say)
    weights = {
        backbone: resolve_pretrained(backbone, space.pretrained_spec(backbone))
        for backbone in space.backbones()
    }
    for backbone, resolved in weights.items():
        say(f"{backbone}: weights from {resolved.source}")
    (search_dir / "trials").mkdir(parents=True, exist_ok=True)
    return TrialContext(
        space=space,
        table=data.table,
        folds=folds,
        cache_dir=str(cache_dir),
        trials_dir=str(search_dir / "trials"),
        weights=weights,
        log_epochs=progress,
    )


def describe_holdout(folds: pd.DataFrame, holdout: float | str) -> str:
    """The search log's line on the persons no fold trains or validates on (what the holdout figure and
    its precision rest on)."""
    from trainers.folds import HOLDOUT_AUTO, HOLDOUT_FOLD, HOLDOUT_MAX_SHARE, HOLDOUT_PERSONS

    held = folds.loc[folds["fold"] == HOLDOUT_FOLD, "person_id"].nunique()
    if not held:
        return "holdout: none (the ensemble's figures are in-sample and nested only)"
    why = (
        f" (auto: {HOLDOUT_PERSONS} persons, at most {HOLDOUT_MAX_SHARE:.0%})"
        if holdout == HOLDOUT_AUTO
        else ""
    )
    return f"holdout: {held} of {folds['person_id'].nunique()} persons kept out of every fold{why}"


def settle_folds(
    folds_path: Path,
    table: pd.DataFrame,
    k: int,
    seed: int,
    data_root: Path,
    folds_file: str | os.PathLike | None = None,
    resuming: bool = False,
    holdout: float | str = 0.0,
) -> pd.DataFrame:
    """The search's fold file at ``folds_path``: the saved one, the user's ``folds_file``, or a new split.

    A saved fold file is kept when resuming, and when no ``folds_file`` is given (a start abandoned before
    its first trial reuses its split, unless its holdout share or seed differ: then it is split again); it
    must still fit the data and ``k``. A ``folds_file`` given on
    resume must be the split the search started with. Otherwise ``folds_file`` is checked against the data
    and ``k`` and copied, or the data is split into ``k`` folds by person with ``seed``, after holding out
    a ``holdout`` share of persons (fold -1) when asked. A given fold file carries its own holdout rows.
    """
    from trainers.folds import fold_count, make_folds, read_folds, write_folds

    if folds_path.exists() and (resuming or folds_file is None):
        folds = read_folds(folds_path)
        if set(folds["rel_path"]) != set(table["rel_path"]) or fold_count(folds) != k:
            raise OrchestratorError(
                f"{folds_path} does not match the data in {data_root} (or k={k}): the search was "
                "started on other data; use that data root or start a new search with --name NEW_NAME"
            )
        if folds_file is not None and not _same_split(read_folds(Path(folds_file).expanduser()), folds):
            raise OrchestratorError(
                f"--folds {folds_file} differs from the folds this search started with ({folds_path}); "
                "resume without --folds (the saved folds are used), or start a new search with --name "
                "NEW_NAME"
            )
        if resuming:
            return folds
        # a start abandoned before its first trial: nothing trained on its split, so it is kept only when
        # it is the split these settings make (a changed holdout share or folds_seed makes it again)
        wanted = make_folds(table, k=k, seed=seed, holdout=holdout)
        if _same_split(wanted, folds):
            return folds
        print(
            f"note: {folds_path} of the abandoned start was made with other settings (holdout or "
            f"folds_seed); split again with holdout {holdout}, folds_seed {seed}",
            flush=True,
        )
        write_folds(wanted, folds_path)
        return wanted
    if folds_file is None:
        folds = make_folds(table, k=k, seed=seed, holdout=holdout)
    elif holdout:
        raise OrchestratorError(
            f"--folds {folds_file} and holdout {holdout}: a fold file holds its own holdout persons; write "
            f"one with `foldtune folds --holdout {holdout}` or drop holdout from the space/command"
        )
    else:
        folds = _given_folds(Path(folds_file).expanduser(), table, k, data_root)
    write_folds(folds, folds_path)
    return folds


def _given_folds(path: Path, table: pd.DataFrame, k: int, data_root: Path) -> pd.DataFrame:
    """The user's fold file, if it splits exactly the data's images into ``k`` folds."""
    from trainers.folds import fold_count, read_folds

    folds = read_folds(path)
    only_file = set(folds["rel_path"]) - set(table["rel_path"])
    only_data = set(table["rel_path"]) - set(folds["rel_path"])
    if only_file or only_data:
        raise OrchestratorError(
            f"--folds {path} does not cover the images in {data_root} ({len(only_file)} only in the fold "
            f"file, {len(only_data)} only in the data): write one for this data with `foldtune folds`"
        )
    count = fold_count(folds)
    if count != k:
        raise OrchestratorError(
            f"--folds {path} has {count} folds but the space has k={k}: set k: {count} in the space's "
            f"fixed settings, or write a fold file with `foldtune folds --k {k}`"
        )
    return folds


def _same_split(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether two fold files put every image, and its person, in the same fold (row order aside)."""
    columns = ["rel_path", "person_id", "fold"]
    a = a[columns].sort_values("rel_path").reset_index(drop=True)
    b = b[columns].sort_values("rel_path").reset_index(drop=True)
    return a.equals(b)
