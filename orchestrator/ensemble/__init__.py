"""The ensemble stage: soft-vote the best fold models of a finished search, with TTA, into the submission.

Why it works the way it does:

- Members are whole trials (all k fold models of one configuration), chosen on out-of-fold (OOF)
  probabilities, which every trial already wrote for every training image: greedy forward selection with
  replacement (Caruana et al. 2004) by default, or the N best trials with equal weights (``top``).
- Soft voting averages softmax probabilities (never logits: heads and temperatures differ between trials),
  weighted by how often a trial was picked; TTA views are averaged in probability space as well.
- The OOF figures use the same TTA as the submission: a stored OOF array is used when it was made with
  the requested views, otherwise the selected fold models score their validation images again with them.
- Each F1 figure says what it estimates (``estimates``): in-sample OOF (selected on those rows), nested
  (selection scored on folds it did not see) and, with holdout persons, the submission's own vote on
  persons nothing trained or selected on, which is then the one to trust.
- Everything is computed before anything is written, and the submission is written last, atomically and
  only after it has been re-read and checked: on any error no new submission exists and an old one is
  untouched.

One room per responsibility, in the order a run goes through them:

- ``candidates``: finding the usable trials of a search and checking they agree;
- ``selection``: ranking them and choosing the members, and the nested estimate (plain NumPy);
- ``estimates``: what each F1 figure estimates, the holdout rows;
- ``members``: checking the members' checkpoints and predicting with them (torch, one fold model at a time);
- ``submission``: writing the submission and its probabilities, and scoring a submission;
- ``result``: the result, its printed summary and ensemble.json;
- ``arguments``: checking the arguments before anything slow;
- ``stage``: ``run_ensemble``, the steps in order; ``recording``: its MLflow record.

The MLflow record lives with the rest of MLflow, in ``orchestrator.tracking.ensemble_run``.
"""

from orchestrator.lazy import lazy_exports

# Exported names, imported when first used (PEP 562): importing one room of this package, e.g. for a
# served model, must not import all the others and what they import.
_EXPORTS = {
    "Candidate": "orchestrator.ensemble.candidates",
    "DEFAULT_GREEDY_STEPS": "orchestrator.ensemble.selection",
    "DEFAULT_STORAGE": "orchestrator.ensemble.arguments",
    "EnsembleMember": "orchestrator.ensemble.result",
    "EnsembleResult": "orchestrator.ensemble.result",
    "FAILED_STATUSES": "orchestrator.ensemble.candidates",
    "SUBMISSION_COLUMNS": "orchestrator.ensemble.submission",
    "Selection": "orchestrator.ensemble.selection",
    "format_report": "orchestrator.ensemble.result",
    "greedy_selection": "orchestrator.ensemble.selection",
    "macro_f1": "orchestrator.ensemble.selection",
    "read_search_summary": "orchestrator.ensemble.candidates",
    "run_ensemble": "orchestrator.ensemble.stage",
    "score_arrays": "orchestrator.ensemble.submission",
    "score_submission": "orchestrator.ensemble.submission",
    "score_submission_arrays": "orchestrator.ensemble.submission",
    "select": "orchestrator.ensemble.selection",
    "soft_vote": "orchestrator.ensemble.selection",
    "validate_submission": "orchestrator.ensemble.submission",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
