"""Runs say where their inputs and code came from: dataset digests that follow the data, the git commit,
and an experiment MLflow 3's UI classifies as model training."""

from __future__ import annotations

import os
import subprocess

from orchestrator.tracking.provenance import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    code_version_tags,
    file_dataset,
    search_inputs,
    training_dataset,
)
from orchestrator.tracking.store import SearchTracking
from trainers.data import read_train


def test_identical_data_has_one_digest_and_a_changed_image_changes_it(make_dataset, tmp_path):
    data = make_dataset(n_persons=3)
    paths = read_train(data.root).table["image_path"].tolist()
    first, again = training_dataset(data.root, paths), training_dataset(data.root, list(reversed(paths)))
    assert first.digest == again.digest and first.profile["images"] == 21
    image = data.image("000002", "mask3")
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: the default digest moves
    assert training_dataset(data.root, paths).digest != first.digest
    hashed = training_dataset(data.root, paths, hash_images=True)
    assert hashed.profile["digest_of"] == "content"
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert training_dataset(data.root, paths, hash_images=True).digest == hashed.digest  # mtime alone: same
    image.write_bytes(image.read_bytes()[:-1] + b"\0")
    assert training_dataset(data.root, paths, hash_images=True).digest != hashed.digest  # content changed


def test_code_version_tags_name_the_commit_of_this_checkout():
    tags = code_version_tags()
    assert tags["foldtune.version"] != "unknown"
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head:  # a git checkout (CI's clone is one)
        assert tags["mlflow.source.git.commit"] == head and tags["foldtune.git_dirty"] in ("true", "false")


def test_every_run_of_a_search_records_its_inputs_and_code(make_dataset, tmp_path, tracking_uri):
    data = make_dataset(n_persons=3)
    search_dir = tmp_path / "runs" / "prov"
    search_dir.mkdir(parents=True)
    (search_dir / "folds.csv").write_text("rel_path,person_id,fold\na.jpg,1,0\n")
    tracking = SearchTracking(tracking_uri, "prov")
    experiment = tracking.client.get_experiment(tracking.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    tracking.inputs = search_inputs(data.root, read_train(data.root).table["image_path"], search_dir)
    parent = tracking.start_parent(search_dir)
    child, created = tracking.start_child(parent, "trial_1", {})
    assert created
    for run_id in (parent, child):
        run = tracking.client.get_run(run_id)
        recorded = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
        assert recorded == {r.name: r.digest for r in tracking.inputs} and set(recorded) == {"train", "folds"}
        assert run.data.tags["foldtune.version"] == code_version_tags()["foldtune.version"]
    assert file_dataset("folds", search_dir / "folds.csv", "folds").profile == {"rows": 1}
