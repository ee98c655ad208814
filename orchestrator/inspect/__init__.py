"""Looking into a finished search: which training labels its models doubt, and where the models look.

Why a room of its own: both questions are asked of a search's results (its out-of-fold probabilities and
fold checkpoints), after training and apart from the ensemble, and both end with something for a person to
review rather than a number to optimise.

- ``oof``: which OOF probabilities judge (the ensemble's members weighted, else the best trial, or
  ``--trial``), matched row by row to the training table;
- ``label_issues``: cleanlab per task at the level the label lives (person: gender, age band; image: mask
  state) plus the incorrect_mask <-> normal swap check;
- ``draft``: the findings as a relabel overlay (trainers.relabel) to review and pass to the next search;
- ``review``: contact sheets and review.html;
- ``stage``: ``run_label_issues``, the steps in order, files written last;
- ``explain``, ``explain_stage``: Grad-CAM maps of fold models, ``run_explain``;
- ``commands``: ``add_commands(sub)``, the two CLI subcommands.

MLflow logging lives in ``orchestrator.tracking.inspect_run``.
"""
