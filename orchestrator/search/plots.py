"""Pictures of the Optuna study after a search: its optimisation history and parameter importances.

They are drawn from the study in ``optuna.db`` (not from Ray's results), so they show what TPE learned
from, pruned trials included. A plot Optuna cannot draw (importances need two completed trials) is
skipped with a note; the history falls back to a plain matplotlib drawing, so every search has one.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pandas as pd

from orchestrator.search.optuna_adapter import study_storage
from trainers.io import save_figure_atomic


def plot_study(search_dir: Path, study_name: str) -> list[Path]:
    """Optimisation history and parameter importances of the Optuna study, as PNGs in ``plots/``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    out = Path(search_dir) / "plots"
    out.mkdir(exist_ok=True)
    try:
        study = optuna.load_study(study_name=study_name, storage=study_storage(search_dir))
    except Exception as error:
        print(f"warning: no Optuna study to plot: {error}", file=sys.stderr)
        return []
    written = []
    drawers = {
        "optimization_history.png": optuna.visualization.matplotlib.plot_optimization_history,
        "param_importances.png": optuna.visualization.matplotlib.plot_param_importances,
    }
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no complete trials" is said by the summary
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for filename, draw in drawers.items():
            try:
                axes = draw(study)
                figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            except Exception as error:  # e.g. importances need two completed trials
                if filename != "optimization_history.png":
                    print(f"note: {filename} not drawn: {error}")
                    continue
                figure = _plain_history(study, plt)
            written.append(save_figure_atomic(figure, out / filename))
            plt.close(figure)
    optuna.logging.set_verbosity(verbosity)
    return written


def _plain_history(study, plt):
    """Optimisation history drawn with plain matplotlib (when Optuna's own plot is unavailable)."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    figure, axes = plt.subplots(figsize=(6, 4))
    numbers = [t.number for t in done]
    values = [t.value for t in done]
    axes.scatter(numbers, values, label="trial")
    axes.plot(numbers, pd.Series(values, dtype=float).cummax(), color="C1", label="best so far")
    axes.set(xlabel="trial", ylabel="mean val macro F1", title="optimisation history")
    axes.legend()
    return figure
