"""The ensemble stage end to end on two tiny trials trained once (no Ray): selection, TTA, submission."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score

from orchestrator.ensemble import (
    EnsembleResult,
    greedy_selection,
    macro_f1,
    run_ensemble,
    score_arrays,
    score_submission,
    score_submission_arrays,
    validate_submission,
)
from orchestrator.errors import OrchestratorError
from trainers.checkpoint import CheckpointError
from trainers.config import TrainConfig
from trainers.data import DataError, read_train
from trainers.fit import fit
from trainers.folds import make_folds

SEARCH = "tiny"
TINY = dict(backbone="resnet10t", image_size=(32, 24), batch_size=16, k=2, lr=3e-3, patience=0, num_workers=0)
TRIALS = {  # trial id -> config: both learn something in 1-2 epochs and disagree enough to ensemble
    "trial_a": dict(TINY, epochs=2, seed=0, tta=("hflip",)),
    "trial_b": dict(TINY, epochs=1, seed=1, tta=("hflip",)),
}


def sk_macro_f1(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(f1_score(labels, probs.argmax(1), average="macro", zero_division=0))


def load_oof(run_dir: Path) -> dict[str, np.ndarray]:
    """A trial's oof.npz sorted by rel_path (the ensemble's image order)."""
    with np.load(run_dir / "oof.npz") as oof:
        order = np.argsort(oof["rel_path"], kind="stable")
        return {key: oof[key][order] for key in ("rel_path", "label", "fold", "probs", "probs_tta")}


def copy_trial(source: Path, storage: Path, search: str, trial_id: str) -> Path:
    target = storage / search / "trials" / trial_id
    shutil.copytree(source, target)
    return target


def edit_result(run_dir: Path, **changes) -> None:
    path = run_dir / "result.json"
    result = json.loads(path.read_text())
    for key, value in changes.items():
        if key.startswith("config."):
            result["config"][key.removeprefix("config.")] = value
        else:
            result[key] = value
    path.write_text(json.dumps(result))


@pytest.fixture(scope="module")
def world(tmp_path_factory, dataset_builder):
    """Data, two trained trials in a search folder (plus a diverged and a pruned copy), an MLflow store."""
    base = tmp_path_factory.mktemp("ensemble")
    data = dataset_builder(base / "data", n_persons=12, n_eval=10)
    table = read_train(data.root).table
    folds = make_folds(table, k=2, seed=0)
    storage = base / "runs"
    trials = storage / SEARCH / "trials"
    for trial_id, config in TRIALS.items():
        result = fit(TrainConfig(**config), table, folds, trials / trial_id, base / "cache", log=None)
        assert result.status == "completed"
    diverged = copy_trial(trials / "trial_b", storage, SEARCH, "trial_c_diverged")
    edit_result(diverged, status="diverged")
    pruned = copy_trial(trials / "trial_b", storage, SEARCH, "trial_d_pruned")
    shutil.rmtree(pruned / "checkpoints")

    # what the search leaves: an MLflow experiment with a parent run, named in summary.json (search.py's
    # fields); trial_e is a folder the search saw fail although an earlier attempt left complete files
    from orchestrator.tracking import SearchTracking

    copy_trial(trials / "trial_b", storage, SEARCH, "trial_e_failed")
    # ASHA stopped it during its first epoch: no result, no OOF, fold 1 never finished an epoch
    stopped = copy_trial(trials / "trial_b", storage, SEARCH, "trial_f_stopped")
    (stopped / "result.json").unlink()
    (stopped / "oof.npz").unlink()
    (stopped / "checkpoints" / "fold1.pt").unlink()
    tracking_uri = f"sqlite:///{base / 'mlruns' / 'mlflow.db'}"
    tracking = SearchTracking(tracking_uri, SEARCH)
    parent_run_id = tracking.start_parent(storage / SEARCH)
    statuses = {
        "trial_a": "completed",
        "trial_b": "completed",
        "trial_e_failed": "failed",
        "trial_f_stopped": "stopped_early",
    }
    summary = {
        "name": SEARCH,
        "experiment_name": SEARCH,
        "tracking_uri": tracking_uri,
        "parent_run_id": parent_run_id,
        "trials": [
            {
                "trial_id": t,
                "status": status,
                "epochs": 1,
                "error": "RuntimeError: boom" if status == "failed" else "",
            }
            for t, status in statuses.items()
        ],
    }
    (storage / SEARCH / "summary.json").write_text(json.dumps(summary))
    return {
        "base": base,
        "data": data,
        "storage": storage,
        "cache": base / "cache",
        "tracking_uri": tracking_uri,
        "parent_run_id": parent_run_id,
    }


def ensemble(
    world, out: Path, search: str = SEARCH, data_root: Path | None = None, **options
) -> EnsembleResult:
    return run_ensemble(
        data_root=data_root or world["data"].root,
        search=search,
        storage=world["storage"],
        out=out,
        cache_dir=world["cache"],
        **{"device": "cpu", "log": None, **options},
    )


@pytest.fixture(scope="module")
def greedy(world) -> EnsembleResult:
    return ensemble(world, world["base"] / "greedy" / "submission.csv")


def test_submission_lists_info_csv_ids_in_order_with_valid_classes(world, greedy):
    info = pd.read_csv(world["data"].info_csv, dtype=str)
    submission = pd.read_csv(greedy.submission, dtype=str)
    assert list(submission.columns) == ["ImageID", "ans"]
    assert submission["ImageID"].tolist() == info["ImageID"].tolist()
    answers = submission["ans"].astype(int).to_numpy()
    assert ((answers >= 0) & (answers < 18)).all()
    with np.load(greedy.probs_path) as saved:
        assert saved["image_id"].tolist() == info["ImageID"].tolist()
        np.testing.assert_array_equal(saved["probs"].argmax(1), answers)
        np.testing.assert_allclose(
            saved["probs"].sum(1), 1.0, atol=1e-5
        )  # averaged probabilities, not logits
    report = json.loads(greedy.report_path.read_text())
    assert [m["trial_id"] for m in report["members"]] == [m.trial_id for m in greedy.members]
    assert report["oof_f1"] == pytest.approx(greedy.oof_f1)
    assert len(report["oof_per_class_f1"]) == 18 and "mask_f1" in report["oof_metrics"]


def test_oof_f1_equals_recomputation_from_stored_oof_probabilities(world, greedy):
    trials = world["storage"] / SEARCH / "trials"
    weighted = sum(m.weight * load_oof(trials / m.trial_id)["probs_tta"] for m in greedy.members)
    plain = sum(m.weight * load_oof(trials / m.trial_id)["probs"] for m in greedy.members)
    labels = load_oof(trials / "trial_a")["label"]
    assert sum(m.weight for m in greedy.members) == pytest.approx(1.0)
    assert greedy.oof_f1 == pytest.approx(sk_macro_f1(labels, weighted), abs=1e-12)
    assert greedy.oof_f1_no_tta == pytest.approx(sk_macro_f1(labels, plain), abs=1e-12)
    for member in greedy.members:
        assert member.oof_f1 == pytest.approx(
            sk_macro_f1(labels, load_oof(trials / member.trial_id)["probs_tta"])
        )
        assert member.tta == ("hflip",) and not member.recomputed


def test_greedy_never_scores_below_its_best_candidate_and_skips_unusable_trials(world, greedy):
    trials = world["storage"] / SEARCH / "trials"
    labels = load_oof(trials / "trial_a")["label"]
    singles = {t: sk_macro_f1(labels, load_oof(trials / t)["probs_tta"]) for t in TRIALS}
    assert greedy.best_single_f1 == pytest.approx(max(singles.values()))
    assert greedy.oof_f1 >= max(singles.values())
    assert greedy.members[0].trial_id == max(singles, key=singles.get)
    assert set(greedy.skipped) == {"trial_c_diverged", "trial_d_pruned", "trial_e_failed", "trial_f_stopped"}
    stopped = greedy.skipped["trial_f_stopped"]
    assert stopped == (
        "stopped early by ASHA after 1 epoch(s): a weak trial; "
        "stopped before every fold finished an epoch (fold1.pt missing)"
    )
    assert "diverged" in greedy.skipped["trial_c_diverged"] and "pruned" in greedy.skipped["trial_d_pruned"]
    assert "boom" in greedy.skipped["trial_e_failed"]


def test_greedy_selection_adds_a_complementary_candidate_and_stops():
    # two one-sided models: each alone gets half the classes right, together all of them
    labels = np.repeat(np.arange(18), 4)
    left, right = np.full((72, 18), 0.01), np.full((72, 18), 0.01)
    for row, label in enumerate(labels):
        (left if label < 9 else right)[row, label] = 0.9
        (right if label < 9 else left)[row, (label + 1) % 18] = 0.5
    weak = np.random.default_rng(0).dirichlet(np.ones(18), size=72)
    counts = greedy_selection([left, right, weak], labels, max_steps=10)
    ensemble = sum(c * p for c, p in zip(counts, [left, right, weak], strict=True))
    assert counts[0] >= 1 and counts[1] >= 1 and counts[2] == 0
    assert macro_f1(labels, ensemble) == pytest.approx(1.0)
    assert macro_f1(labels, ensemble) > max(macro_f1(labels, p) for p in (left, right, weak))
    assert greedy_selection([weak, weak], labels) == [1, 0]  # nothing improves: the best one alone


def test_top_one_is_the_best_trial_alone(world, greedy, capsys):
    result = ensemble(world, world["base"] / "top1" / "submission.csv", top=1, log=print)
    assert [m.trial_id for m in result.members] == [greedy.best_single_trial]
    assert result.members[0].weight == 1.0 and result.method == "top"
    assert result.oof_f1 == pytest.approx(greedy.best_single_f1, abs=1e-12)
    with np.load(greedy.probs_path) as saved:  # the same trial's eval probabilities inside the greedy run
        alone = saved["member_probs"][saved["members"].tolist().index(greedy.best_single_trial)]
    np.testing.assert_allclose(result.eval_probs, alone, atol=1e-6)
    printed = capsys.readouterr().out
    assert "<- trust this one" in printed and "nested F1" in printed and "best single trial" in printed
    assert str(result.submission) in printed


def test_one_fold_model_alone_is_predicted_and_judged_on_its_own_fold(world, capsys):
    from trainers.cache import build_cache, open_cache
    from trainers.checkpoint import load_checkpoint
    from trainers.data import read_eval
    from trainers.predict import predict_proba

    eval_paths = read_eval(world["data"].root)["image_path"].tolist()
    parts = [
        ensemble(world, world["base"] / f"fold{fold}" / "submission.csv", top=1, folds=[fold], log=print)
        for fold in (0, 1)
    ]
    for fold, part in enumerate(parts):
        trial = part.members[0].trial_id
        run_dir = world["storage"] / SEARCH / "trials" / trial
        # the submission's probabilities are that one fold model's, with the trial's hflip TTA
        loaded = load_checkpoint(run_dir / "checkpoints" / f"fold{fold}.pt")
        images = open_cache(build_cache(eval_paths, loaded.image_size, world["cache"]))
        direct = predict_proba(
            loaded.model,
            loaded.head,
            images.images,
            images.rows(eval_paths),
            loaded.mean,
            loaded.std,
            torch.device("cpu"),
            tta=("hflip",),
        )
        np.testing.assert_allclose(part.eval_probs, direct, atol=1e-6)
        # ... and it is judged on its own fold's validation images only
        oof = load_oof(run_dir)
        held_out = oof["fold"] == fold
        assert part.folds == (fold,) and len(part.members) == 1
        np.testing.assert_array_equal(part.oof_rel_path, oof["rel_path"][held_out])
        assert part.oof_f1 == pytest.approx(sk_macro_f1(oof["label"][held_out], oof["probs_tta"][held_out]))
        assert json.loads(part.report_path.read_text())["folds"] == str(fold)
    assert not np.allclose(parts[0].eval_probs, parts[1].eval_probs, atol=1e-4)
    printed = capsys.readouterr().out
    assert "fold model(s) 0 only" in printed and "fold(s) 1 of 2" in printed
    with pytest.raises(OrchestratorError, match="--folds.*0..1"):
        ensemble(world, world["base"] / "fold5" / "submission.csv", top=1, folds=[5])
    assert not (world["base"] / "fold5").exists()


def write_plain_and_mirrored_eval(source_root: Path, target: Path, ids: list[str]) -> Path:
    """An eval-only data root listing each eval image twice: decoded as is, and mirrored (lossless PNGs)."""
    (target / "eval" / "images").mkdir(parents=True)
    for image_id in ids:
        pixels = np.asarray(Image.open(source_root / "eval" / "images" / image_id).convert("RGB"))
        Image.fromarray(pixels).save(target / "eval" / "images" / f"plain_{image_id}.png")
        Image.fromarray(np.ascontiguousarray(pixels[:, ::-1])).save(
            target / "eval" / "images" / f"mirror_{image_id}.png"
        )
    names = [f"plain_{i}.png" for i in ids] + [f"mirror_{i}.png" for i in ids]
    (target / "eval" / "info.csv").write_text("ImageID,ans\n" + "".join(f"{name},0\n" for name in names))
    return target


def test_hflip_tta_is_applied_to_the_submission(world, tmp_path):
    ids = world["data"].eval_ids
    root = write_plain_and_mirrored_eval(world["data"].root, tmp_path / "data", ids)
    plain = ensemble(world, tmp_path / "plain.csv", data_root=root, top=1, tta=())
    flipped = ensemble(world, tmp_path / "hflip.csv", data_root=root, top=1, tta=("hflip",))
    half = len(ids)
    # the models are not flip-invariant, so a mirrored image scores differently without TTA ...
    assert not np.allclose(plain.eval_probs[:half], plain.eval_probs[half:], atol=1e-4)
    # ... and with hflip TTA an image and its mirror both average {image, mirror}: identical probabilities
    np.testing.assert_allclose(flipped.eval_probs[:half], flipped.eval_probs[half:], atol=1e-6)
    assert not np.allclose(plain.eval_probs, flipped.eval_probs, atol=1e-4)
    # the OOF estimate follows the same TTA: none uses the stored plain OOF probabilities
    assert plain.members[0].tta == () and plain.oof_f1 == pytest.approx(plain.oof_f1_no_tta)
    assert flipped.members[0].tta == ("hflip",) and not flipped.members[0].recomputed


def test_oof_is_predicted_again_when_the_requested_tta_differs_from_the_trials(world):
    # a copy of trial_b that claims it was trained without TTA: its stored probs_tta are the plain ones
    storage = world["storage"]
    copy = copy_trial(storage / SEARCH / "trials" / "trial_b", storage, "notta", "trial_b_notta")
    edit_result(copy, **{"config.tta": []})
    with np.load(copy / "oof.npz") as oof:
        arrays = dict(oof)
    np.savez_compressed(copy / "oof.npz", **{**arrays, "probs_tta": arrays["probs"]})
    # a search interrupted before summary.json: tracking.json names the store, the parent is found by tags
    from orchestrator.tracking import SearchTracking

    parent = SearchTracking(world["tracking_uri"], "notta-experiment").start_parent(storage / "notta")
    (storage / "notta" / "tracking.json").write_text(
        json.dumps({"tracking_uri": world["tracking_uri"], "experiment_name": "notta-experiment"})
    )
    result = ensemble(world, world["base"] / "notta" / "submission.csv", search="notta", tta=("hflip",))
    member = result.members[0]
    assert member.recomputed and member.tta == ("hflip",)
    # fit itself predicted trial_b's OOF with hflip: the re-prediction must match it
    expected = load_oof(storage / SEARCH / "trials" / "trial_b")
    np.testing.assert_array_equal(result.oof_rel_path, expected["rel_path"])
    np.testing.assert_allclose(result.member_oof_probs["trial_b_notta"], expected["probs_tta"], atol=1e-5)
    assert result.oof_f1 == pytest.approx(sk_macro_f1(expected["label"], expected["probs_tta"]))
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=world["tracking_uri"]).get_run(result.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent


def test_corrupt_checkpoint_is_a_clear_error_and_writes_no_submission(world):
    storage = world["storage"]
    for trial_id in TRIALS:
        copy_trial(storage / SEARCH / "trials" / trial_id, storage, "corrupt", trial_id)
    broken = storage / "corrupt" / "trials" / "trial_a" / "checkpoints" / "fold1.pt"
    broken.write_bytes(broken.read_bytes()[:1000])
    out = storage / "corrupt" / "submission.csv"
    with pytest.raises(CheckpointError, match=r"fold1\.pt.*corrupt"):
        ensemble(world, out, search="corrupt", top=2)
    assert not out.exists() and not list(out.parent.glob("*.pending"))
    out.write_text("an earlier submission\n")
    with pytest.raises(CheckpointError):
        ensemble(world, out, search="corrupt", top=2)
    assert out.read_text() == "an earlier submission\n"


def test_checkpoint_of_another_backbone_is_refused(world):
    storage = world["storage"]
    copy = copy_trial(storage / SEARCH / "trials" / "trial_a", storage, "mismatch", "trial_a")
    edit_result(copy, **{"config.backbone": "resnet18"})
    with pytest.raises(CheckpointError, match=r"fold0\.pt has backbone 'resnet10t'.*'resnet18'"):
        ensemble(world, storage / "mismatch" / "submission.csv", search="mismatch")
    assert not (storage / "mismatch" / "submission.csv").exists()


def test_missing_eval_image_is_a_clear_error_and_writes_no_submission(world, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(world["data"].root, root)
    missing = world["data"].eval_ids[3]
    (root / "eval" / "images" / missing).unlink()
    out = tmp_path / "submission.csv"
    with pytest.raises(DataError, match=missing):
        ensemble(world, out, data_root=root)
    assert not out.exists()


def test_trials_with_different_fold_files_are_refused(world):
    storage = world["storage"]
    copy_trial(storage / SEARCH / "trials" / "trial_a", storage, "mixed", "trial_a")
    other = copy_trial(storage / SEARCH / "trials" / "trial_b", storage, "mixed", "trial_b")
    with np.load(other / "oof.npz") as oof:
        arrays = dict(oof)
    np.savez_compressed(other / "oof.npz", **{**arrays, "fold": 1 - arrays["fold"]})
    with pytest.raises(OrchestratorError, match="different fold files"):
        ensemble(world, storage / "mixed" / "submission.csv", search="mixed")


def test_missing_search_and_no_usable_trial_are_clear_errors(world):
    with pytest.raises(OrchestratorError, match="search folder .*nowhere.* not found"):
        ensemble(world, world["base"] / "x.csv", search="nowhere")
    storage = world["storage"]
    copy = copy_trial(storage / SEARCH / "trials" / "trial_b", storage, "unusable", "trial_b")
    shutil.rmtree(copy / "checkpoints")
    with pytest.raises(OrchestratorError, match=r"trial_b: no checkpoints"):
        ensemble(world, world["base"] / "x.csv", search="unusable")


def test_a_trial_that_never_finished_an_epoch_is_not_called_pruned(world):
    """No checkpoints and no OOF record: it ended before an epoch (a budget cut, a crash), not keep_top."""
    from orchestrator.ensemble.candidates import NO_EPOCH, PRUNED, discover

    storage = world["storage"]
    trials = storage / SEARCH / "trials"
    for name in ("trial_x_pruned", "trial_y_no_epoch"):
        copy_trial(trials / "trial_b", storage, "reasons", name)
        shutil.rmtree(storage / "reasons" / "trials" / name / "checkpoints")
    (storage / "reasons" / "trials" / "trial_y_no_epoch" / "oof.npz").unlink()
    copy_trial(trials / "trial_b", storage, "reasons", "trial_b")
    candidates, skipped = discover(storage / "reasons", failed={})
    assert [c.trial_id for c in candidates] == ["trial_b"]
    assert skipped == {"trial_x_pruned": PRUNED, "trial_y_no_epoch": NO_EPOCH}


def test_mlflow_run_is_nested_under_the_search_with_metrics_and_submission(world, greedy):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=world["tracking_uri"])
    run = client.get_run(greedy.mlflow_run_id)
    assert run.info.run_name == "ensemble" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == world["parent_run_id"]
    assert run.data.tags["foldtune.search_parent_run_id"] == world["parent_run_id"]
    assert client.get_experiment(run.info.experiment_id).name == SEARCH
    assert run.data.metrics["oof_f1"] == pytest.approx(greedy.oof_f1)
    for member in greedy.members:
        assert run.data.metrics[f"member/{member.trial_id}/oof_f1"] == pytest.approx(member.oof_f1)
    assert sum(key.startswith("oof_class_f1/") for key in run.data.metrics) == 18
    assert {"oof_mask_f1", "oof_gender_f1", "oof_age_f1"} <= set(run.data.metrics)
    assert run.data.params["selection"] == "greedy" and run.data.params["tta"] == "own"
    assert json.loads(run.data.params["members"]).keys() == {m.trial_id for m in greedy.members}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"submission.csv", "ensemble.json", "ensemble_confusion.png"} <= artifacts
    logged = Path(client.download_artifacts(run.info.run_id, "submission.csv", str(world["base"] / "dl")))
    assert logged.read_text() == greedy.submission.read_text()
    # what the UI shows: the source, and the ensemble in the run's and the search's descriptions
    assert run.data.tags["mlflow.source.name"] == "foldtune ensemble"
    note = run.data.tags["mlflow.note.content"]
    assert "**Ensemble** (greedy" in note and all(f"`{m.trial_id}`" in note for m in greedy.members)
    assert "in-sample OOF F1" in note
    parent_note = client.get_run(world["parent_run_id"]).data.tags["mlflow.note.content"]
    assert parent_note.count("**Ensemble**") == 1 and parent_note.endswith(note.split("**Ensemble**")[1])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.note.content"] == parent_note


def write_answers(path: Path, ids: list[str], labels) -> Path:
    pd.DataFrame({"ImageID": ids, "ans": labels}).to_csv(path, index=False)
    return path


def test_score_submission_against_answers(world, greedy, tmp_path):
    ids = world["data"].eval_ids
    labels = np.arange(len(ids)) % 18
    answers = write_answers(tmp_path / "answers.csv", ids, labels)
    perfect = score_submission_arrays(answers, answers)
    assert perfect["f1"] == 1.0 and perfect["acc"] == 1.0 and perfect["mask_f1"] == 1.0
    shuffled = write_answers(tmp_path / "shuffled.csv", ids, np.roll(labels, 1))
    worse = score_submission_arrays(shuffled, answers)
    assert worse["f1"] < 1.0 and worse["acc"] < 1.0
    reordered = write_answers(
        tmp_path / "reordered.csv", ids[::-1], labels[::-1]
    )  # same answers, other order
    assert score_submission_arrays(reordered, answers)["f1"] == 1.0
    text = score_submission(greedy.submission, answers)
    assert "macro F1" in text and "gender F1" in text and "age F1" in text
    # the competition's scorer: scikit-learn macro F1 over the classes present in answers or predictions
    submitted = pd.read_csv(greedy.submission, dtype=str)["ans"].astype(int).to_numpy()
    scores = score_arrays(labels, submitted)
    assert scores["f1"] == pytest.approx(f1_score(labels, submitted, average="macro", zero_division=0))
    assert scores["mask_f1"] == pytest.approx(
        f1_score(labels // 6, submitted // 6, average="macro", zero_division=0)
    )
    assert scores["age_f1"] == pytest.approx(
        f1_score(labels % 3, submitted % 3, average="macro", zero_division=0)
    )


def test_score_submission_names_missing_and_extra_ids(world, tmp_path):
    ids = world["data"].eval_ids
    answers = write_answers(tmp_path / "answers.csv", ids, [0] * len(ids))
    partial = write_answers(tmp_path / "partial.csv", ids[1:] + ["stranger.jpg"], [0] * len(ids))
    with pytest.raises(OrchestratorError, match=rf"1 answer id\(s\) missing.*{ids[0]}.*stranger\.jpg"):
        score_submission(partial, answers)
    bad = write_answers(tmp_path / "bad.csv", ids, ["18"] + ["0"] * (len(ids) - 1))
    with pytest.raises(OrchestratorError, match="line 2"):
        score_submission(bad, answers)


def test_submission_check_refuses_wrong_order_and_bad_classes(tmp_path):
    ids = ["b.jpg", "a.jpg"]
    swapped = write_answers(tmp_path / "swapped.csv", ids[::-1], [0, 1])
    with pytest.raises(OrchestratorError, match="order"):
        validate_submission(swapped, ids)
    bad = write_answers(tmp_path / "bad.csv", ids, [0, 18])
    with pytest.raises(OrchestratorError, match="line 3"):
        validate_submission(bad, ids)
    validate_submission(write_answers(tmp_path / "good.csv", ids, [17, 0]), ids)
