"""trainers.io: atomic writers leave either the old file or the complete new one, and no litter."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from trainers.io import (
    atomic_open,
    atomic_torch_save,
    atomic_write_bytes,
    write_csv_atomic,
    write_text_atomic,
)


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_bytes_and_text_create_parents_and_replace(tmp_path):
    target = tmp_path / "deep" / "er" / "file.bin"
    assert atomic_write_bytes(b"\x00\x01first", target) == target
    assert target.read_bytes() == b"\x00\x01first"
    write_text_atomic("second ✓\n", target)
    assert target.read_text(encoding="utf-8") == "second ✓\n"
    assert _leftovers(target.parent) == []


def test_written_files_get_normal_permissions_not_private_temp_ones(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = write_text_atomic("x", tmp_path / "mode.txt")
    # what a plain open() would give (mkstemp alone would leave rw-------)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failure_while_writing_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "metrics.csv"
    target.write_text("old,content\n")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_open(target, "w") as handle:
        handle.write("half a ro")
        raise RuntimeError("disk on fire")
    assert target.read_text() == "old,content\n"
    assert _leftovers(tmp_path) == []


def test_atomic_open_refuses_append_or_read_modes(tmp_path):
    with pytest.raises(ValueError, match="mode"), atomic_open(tmp_path / "x", "a"):
        pass


def test_csv_round_trip_keeps_string_ids(tmp_path):
    frame = pd.DataFrame({"person_id": ["000001", "000002"], "fold": [0, 1]})
    path = write_csv_atomic(frame, tmp_path / "folds.csv")
    back = pd.read_csv(path, dtype=str)
    assert list(back.columns) == ["person_id", "fold"]  # no index column
    assert back["person_id"].tolist() == ["000001", "000002"]


def test_torch_checkpoint_round_trip_and_failed_save_keeps_previous(tmp_path):
    path = tmp_path / "checkpoints" / "fold0.pt"
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3}
    atomic_torch_save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], state["model"]["w"])

    with pytest.raises(Exception, match="(?i)pickle|lambda"):
        atomic_torch_save({"model": {"w": torch.zeros(1)}, "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert _leftovers(path.parent) == []
