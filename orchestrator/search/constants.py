"""Names the rooms of the search share: the metric Tune optimises, result keys and the search folder's files.

They live apart so that every room (trial, scheduler, searcher, console, summary, driver) reads them from
one place and none has to import another only for a string.
"""

from __future__ import annotations

METRIC, MODE, TIME_ATTR = "val_f1", "max", "epoch"
EXPERIMENT_DIRNAME = "tune"
RELABEL_COPY = "relabel.csv"  # the label fixes the search was started with
FOLDS_FILE = "folds.csv"  # the one fold file every trial of the search splits by
ASHA_STATE = "asha_state.json"  # the scheduler's rungs and the trials it stopped early (kept across resumes)
CHECKPOINT_MARKER = "foldtune_marker.json"
# "cut": stopped by the search's time budget (its best fold models and OOF predictions kept)
STATE_ORDER = {"completed": 0, "stopped_early": 1, "cut": 2, "failed": 3, "unfinished": 4}
CANDIDATE_STATES = ("completed", "stopped_early", "cut")  # trials that can leave fold models behind
