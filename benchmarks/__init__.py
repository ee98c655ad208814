"""``make bench``: where foldtune's time and memory go, measured, so the claims in BENCHMARKS.md are numbers.

Users pay for accelerator hours; the seed scripts left them waiting on JPEG decoding and ran folds one after
another. Each section answers one question. Ratios are measured side by side in one run on one machine
(absolute times on a shared machine drift); every figure is repeated ``--repeats`` times and quoted as the
median, the repeats interleaved so a burst of load hits every variant alike.

- ``input``: training images/s of (a) the training step alone on batches already in memory (the limit),
  (b) fit's own epoch loop fed by the decode-once cache, (c) the same step fed by a seed-style loader that
  decodes every JPEG every epoch; each loader alone; the cache's build time and size.
- ``memory``: two processes streaming the whole memory-mapped cache at once, as two trials of a search
  would: their RSS and PSS (``/proc/<pid>/smaps_rollup``) against the cache size, so the sharing shows.
- ``overhead``: a search of N trials (Ray Tune + Optuna + MLflow, one trial at a time) against the same
  trials' ``fit`` run bare in one process.
- ``asha``: the same space and seed with and without ASHA: epochs trained and best mean CV macro F1.
- ``ceiling``: fit's loop (``FoldLoader`` epoch + step + epoch writes) with a null model, images/s per CPU
  core with augmentation on the loader and on the device, against published GPU training rates per trial.
- ``checkpoint`` (opt-in: ``--only checkpoint``): bytes and seconds of one epoch's checkpoint writes per
  default backbone, the old resume state (every epoch, whole models) against the new one.
- ``gpu``: AMP + channels_last vs fp32 vs compute-only, and two processes sharing one GPU vs one process;
  skipped with a note when no CUDA device is visible.

``python -m benchmarks.gpu_device`` (``make bench-gpu``) is the GPU machine's own script: it imports only
``trainers`` (no Ray, Optuna, MLflow or ``orchestrator``), and neither does this file.

Data: ``--data``, else ``$FOLDTUNE_BENCH_DATA``, else demo data generated into a temporary folder.

Not part of the installed product: run from the checkout as ``python -m benchmarks``. Every measurement goes
through the public functions of ``trainers`` and ``orchestrator`` (``trainers.fit.train_one_epoch`` is the
one training step, fed by whichever batches a section measures), so the bench measures what ``fit`` runs.

The rooms: ``settings`` (settings, CLI, small figures), ``data`` (data root, person subset, cache builds),
``input``, ``memory``, ``search`` (overhead and asha), ``ceiling``, ``checkpoint_io``, ``gpu``, ``report``
(targets, table, JSON), ``reference`` (published GPU rates, the default space's figures), ``run`` (the
driver behind ``python -m benchmarks``), and ``gpu_device`` with ``gpu_device_rig`` and ``gpu_device_report``.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
