"""The `foldtune` command line in-process: summaries on good data, one `error:` line (exit 2) on bad input."""

from __future__ import annotations

import pandas as pd
import pytest

from orchestrator.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_check_data_prints_the_summary_and_confirms_eval(capsys, tiny_dataset):
    code, out, err = run(capsys, "check-data", "--data", str(tiny_dataset.root))
    assert code == 0 and err == ""
    assert "persons: 6" in out and "images: 42" in out
    assert "eval: 4 images listed in eval/info.csv, all present" in out


def test_check_data_decode_finds_a_truncated_jpeg_the_header_check_misses(capsys, tiny_dataset):
    path = tiny_dataset.image("000005", "incorrect_mask")
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) * 9 // 10])
    assert run(capsys, "check-data", "--data", str(tiny_dataset.root))[0] == 0
    code, _, err = run(capsys, "check-data", "--data", str(tiny_dataset.root), "--decode")
    assert_user_error(code, err, f"{tiny_dataset.persons[4]['path']}/incorrect_mask.jpg", "replace the file")


def test_missing_data_root_and_bad_csv_name_the_file(capsys, tmp_path, tiny_dataset):
    code, _, err = run(capsys, "check-data", "--data", str(tmp_path / "nowhere"))
    assert_user_error(code, err, str(tmp_path / "nowhere"))
    csv = tiny_dataset.root / "train" / "train.csv"
    csv.write_text(csv.read_text().replace("gender", "sex", 1))
    code, _, err = run(capsys, "check-data", "--data", str(tiny_dataset.root))
    assert_user_error(code, err, "train.csv", "gender")


def test_folds_writes_a_person_level_fold_file(capsys, make_dataset, tmp_path):
    data = make_dataset(n_persons=12)
    out = tmp_path / "folds.csv"
    code, printed, _ = run(capsys, "folds", "--data", str(data.root), "--k", "3", "--out", str(out))
    assert code == 0 and f"fold file written: {out}" in printed
    folds = pd.read_csv(out, dtype=str)
    assert folds["person_id"].nunique() == 12 and len(folds) == 12 * 7
    assert folds.groupby("person_id")["fold"].nunique().max() == 1  # a person never spans two folds
    assert sorted(folds["fold"].unique()) == ["0", "1", "2"]
    code, printed, _ = run(
        capsys, "folds", "--data", str(data.root), "--k", "3", "--holdout", "auto", "--out", str(out)
    )
    fifth = tmp_path / "fifth.csv"
    run(capsys, "folds", "--data", str(data.root), "--k", "3", "--holdout", "0.2", "--out", str(fifth))
    held = pd.read_csv(out, dtype=str).query("fold == '-1'")
    assert code == 0 and held["person_id"].nunique() >= 2  # auto: so few persons hold out the most, a fifth
    assert pd.read_csv(out, dtype=str).equals(pd.read_csv(fifth, dtype=str))
    with pytest.raises(SystemExit):  # argparse's usage error: exit 2, one line naming the value
        run(capsys, "folds", "--data", str(data.root), "--holdout", "most")
    assert "'most': use a share of persons from 0 to 0.5 (e.g. 0.1) or auto" in capsys.readouterr().err


def test_train_with_a_bad_config_is_a_clear_error(capsys, tiny_dataset, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("backbone: resnet10t\nlr: fast\n")
    code, _, err = run(capsys, "train", "--data", str(tiny_dataset.root), "--config", str(config))
    assert_user_error(code, err, "config key 'lr': expected a number, got 'fast'")
    code, _, err = run(
        capsys, "train", "--data", str(tiny_dataset.root), "--config", str(tmp_path / "no.yaml")
    )
    assert_user_error(code, err, "no.yaml")


def test_ensemble_flags_and_missing_search_are_clear_errors(capsys, tiny_dataset, tmp_path):
    base = ["ensemble", "--data", str(tiny_dataset.root), "--storage", str(tmp_path)]
    code, _, err = run(capsys, *base, "--search", "nothing")
    assert_user_error(code, err, "search folder", "nothing")
    code, _, err = run(capsys, *base, "--search", "nothing", "--folds", "zero")
    assert_user_error(code, err, "--folds", "'zero'")
    code, _, err = run(capsys, *base, "--search", "nothing", "--tta", "rotate")
    assert_user_error(code, err, "rotate", "hflip")


def test_score_prints_macro_f1_and_names_a_missing_id(capsys, tiny_dataset, tmp_path):
    ids = tiny_dataset.eval_ids
    answers = tmp_path / "answers.csv"
    answers.write_text("ImageID,ans\n" + "".join(f"{i},{n}\n" for n, i in enumerate(ids)))
    perfect = tmp_path / "perfect.csv"
    perfect.write_text(answers.read_text())
    code, out, _ = run(capsys, "score", str(perfect), str(answers))
    assert code == 0 and "macro F1 1.0000" in out
    partial = tmp_path / "partial.csv"
    partial.write_text("ImageID,ans\n" + "".join(f"{i},{n}\n" for n, i in enumerate(ids[:-1])))
    code, _, err = run(capsys, "score", str(partial), str(answers))
    assert_user_error(code, err, ids[-1])


@pytest.mark.parametrize("argv", [["search"], ["ensemble", "--data", "x"], ["nonsense"]])
def test_argument_errors_exit_with_usage(capsys, argv):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2 and "usage: foldtune" in capsys.readouterr().err


def test_search_keeps_its_tracking_store_on_resume(capsys, tiny_dataset, tmp_path):
    space = tmp_path / "tiny.yaml"
    space.write_text(
        "name: tiny\ntrials: 1\nfixed: {epochs: 1, k: 2, image_size: [32, 24]}\n"
        "search: {lr: {loguniform: [1.0e-3, 1.0e-2]}}\n"
    )
    search_dir = tmp_path / "runs" / "tiny"
    search_dir.mkdir(parents=True)
    (search_dir / "space.yaml").write_text(space.read_text())
    first = f"sqlite:///{tmp_path / 'first.db'}"
    (search_dir / "tracking.json").write_text(f'{{"tracking_uri": "{first}", "experiment_name": "tiny"}}')
    other = f"sqlite:///{tmp_path / 'other.db'}"
    argv = ["search", "--data", str(tiny_dataset.root), "--space", str(space), "--resume"]
    code, _, err = run(capsys, *argv, "--storage", str(tmp_path / "runs"), "--tracking-uri", other)
    assert_user_error(code, err, f"is tracked in {first}", "resume without another tracking URI")
    assert not (tmp_path / "other.db").exists()


def test_train_reads_the_fold_file_foldtune_folds_wrote(capsys, make_dataset, tmp_path):
    data = make_dataset(n_persons=8)
    fold_file = tmp_path / "folds.csv"
    assert (
        run(capsys, "folds", "--data", str(data.root), "--k", "2", "--seed", "3", "--out", str(fold_file))[0]
        == 0
    )
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "backbone: resnet10t\nk: 2\nepochs: 1\nimage_size: [32, 24]\nbatch_size: 8\nfolds_seed: 99\n"
    )
    out = tmp_path / "run"
    argv = ["train", "--data", str(data.root), "--config", str(config), "--out", str(out)]
    code, _, err = run(capsys, *argv, "--folds", str(fold_file), "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    used = pd.read_csv(out / "folds.csv", dtype=str).set_index("rel_path")["fold"]
    written = pd.read_csv(fold_file, dtype=str).set_index("rel_path")["fold"]
    assert used.sort_index().equals(written.sort_index())  # the file's split, not one made from folds_seed 99

    config.write_text(config.read_text().replace("k: 2", "k: 3"))
    code, _, err = run(capsys, *argv, "--folds", str(fold_file))
    assert_user_error(code, err, "k=3", "foldtune folds --k 3")
    code, _, err = run(capsys, *argv, "--folds", str(tmp_path / "missing.csv"))
    assert_user_error(code, err, "missing.csv")


def test_cuda_asked_for_without_a_gpu_is_one_error_line(capsys, tiny_dataset, tmp_path, monkeypatch):
    import torch

    import trainers.device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(trainers.device, "nvidia_smi", lambda: (None, ()))  # no driver, as on this machine
    config = tmp_path / "cuda.yaml"
    config.write_text("backbone: resnet10t\nk: 2\nepochs: 1\nimage_size: [32, 24]\ndevice: cuda\n")
    argv = ["train", "--data", str(tiny_dataset.root), "--config", str(config), "--out", str(tmp_path / "r")]
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, "device 'cuda' was asked for but torch", "finds no NVIDIA driver")


def stand_in_summary(tmp_path, states: list[str], finished: bool = True, planned: int = 0):
    """A SearchSummary as run_search returns it, with one trial per state (errors on failed ones)."""
    from orchestrator.search import SearchSummary

    rows = [
        {
            "rank": i + 1,
            "trial_id": f"t_{i:05d}",
            "state": state,
            "best_f1": 0.5 if state in ("completed", "stopped_early") else float("nan"),
            "error": f"RuntimeError: boom {i}" if state == "failed" else "",
        }
        for i, state in enumerate(states)
    ]
    board = pd.DataFrame(rows, columns=["rank", "trial_id", "state", "best_f1", "error"])
    return SearchSummary(
        name="tiny",
        search_dir=tmp_path / "runs" / "tiny",
        experiment_name="tiny",
        parent_run_id="p",
        leaderboard=board,
        best_trial_id=None,
        best_config=None,
        disk_bytes=0,
        tracking_uri="sqlite:///x.db",
        finished=finished,
        trials_planned=planned or len(states),
    )


@pytest.mark.parametrize(
    ("states", "finished", "planned", "code", "line"),
    [
        (["completed", "failed"], True, 2, 0, None),
        (["stopped_early"], True, 1, 0, None),  # a stopped trial is a result
        (
            ["completed", "unfinished"],
            False,
            3,
            1,
            "search 'tiny' interrupted: 1 of 3 trials finished; continue with --resume",
        ),
        (["unfinished"], False, 2, 1, "search 'tiny' interrupted: 0 of 2 trials finished; continue"),
        (["failed", "failed"], True, 2, 1, "search 'tiny': every trial failed: first error (t_00000) R"),
        ([], True, 2, 1, "search 'tiny': no trial finished"),  # e.g. a time budget spent before any ended
    ],
)
def test_search_exits_0_only_when_it_finished_with_a_result(
    capsys, tmp_path, monkeypatch, states, finished, planned, code, line
):
    import orchestrator.search

    summary = stand_in_summary(tmp_path, states, finished, planned)
    monkeypatch.setattr(orchestrator.search, "run_search", lambda **kwargs: summary)
    got, _, err = run(capsys, "search", "--data", str(tmp_path), "--space", str(tmp_path / "s.yaml"))
    assert got == code
    if line is None:
        assert err == ""
    else:
        assert len(err.splitlines()) == 1 and err.startswith(line), err


@pytest.mark.parametrize(
    ("raised", "line"),
    [
        (
            "SearchInterrupted",
            "search 'tiny' interrupted: 2 of 5 trials finished; continue with --resume",
        ),
        ("KeyboardInterrupt", "search interrupted before its first trial; continue with --resume"),
    ],
)
def test_an_interrupted_search_exits_1_with_one_line(capsys, tmp_path, monkeypatch, raised, line):
    import orchestrator.search
    from orchestrator.search import SearchInterrupted

    def interrupted(**kwargs):
        if raised == "SearchInterrupted":
            raise SearchInterrupted(line)
        raise KeyboardInterrupt

    monkeypatch.setattr(orchestrator.search, "run_search", interrupted)
    code, _, err = run(capsys, "search", "--data", str(tmp_path), "--space", str(tmp_path / "s.yaml"))
    assert code == 1 and err == line + "\n"
