"""The decode-once cache: built once, reused by key, rebuilt when an image or the size changes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainers import cache
from trainers.data import read_train


@pytest.fixture
def paths(make_dataset) -> list[str]:
    return sorted(read_train(make_dataset(n_persons=3, extensions=(".jpg", ".png")).root).table["image_path"])


def test_cache_is_built_once_and_reused(paths, tmp_path, count_decodes):
    with count_decodes() as counted:
        first = cache.build_cache(paths, (16, 12), tmp_path / "c")
        assert counted["images"] == len(paths)
        second = cache.build_cache(paths, (16, 12), tmp_path / "c")
    assert second == first
    assert counted["images"] == len(paths)  # nothing decoded the second time
    opened = cache.open_cache(first)
    assert opened.images.shape == (len(paths), 16, 12, 3) and opened.images.dtype == np.uint8
    assert isinstance(opened.images, np.memmap)
    np.testing.assert_array_equal(
        opened.images[opened.rows([paths[4]])[0]], cache.decode_image(paths[4], (16, 12))
    )


def test_changed_image_or_size_builds_a_new_cache(paths, tmp_path):
    first = cache.build_cache(paths, (16, 12), tmp_path / "c")
    assert cache.build_cache(paths, (20, 16), tmp_path / "c") != first
    Image.new("RGB", (24, 32), (255, 0, 0)).save(paths[0])
    os.utime(paths[0], ns=(1, 1))  # a different mtime even on coarse file systems
    rebuilt = cache.build_cache(paths, (16, 12), tmp_path / "c")
    assert rebuilt != first
    assert cache.open_cache(rebuilt).images[0].reshape(-1, 3).mean(axis=0)[0] > 200  # the red image


def test_no_partial_cache_after_a_corrupt_image(paths, tmp_path):
    with open(paths[1], "wb") as broken:
        broken.write(b"not an image")
    with pytest.raises(cache.CacheError, match=os.path.basename(paths[1])):
        cache.build_cache(paths, (16, 12), tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.npy")) and not list((tmp_path / "c").glob(".*.tmp"))


def test_every_undecodable_image_is_named_in_one_error(paths, tmp_path):
    whole = Path(paths[0]).read_bytes()
    with open(paths[0], "wb") as truncated:  # headers intact, data cut: only a full decode notices
        truncated.write(whole[: len(whole) // 2])
    with open(paths[3], "wb") as broken:
        broken.write(b"")
    with pytest.raises(cache.CacheError) as caught:
        cache.build_cache(paths, (16, 12), tmp_path / "c")
    message = str(caught.value)
    assert message.startswith("2 image(s) cannot be decoded") and "check-data --decode" in message
    assert paths[0] in message and paths[3] in message
    assert not list((tmp_path / "c").glob("*.npy")) and not list((tmp_path / "c").glob(".*.tmp"))


def test_crop_is_applied_before_resize(tmp_path):
    image = np.zeros((40, 40, 3), np.uint8)
    image[:20] = 255  # top half white
    Image.fromarray(image).save(tmp_path / "a.png")
    top = cache.decode_image(str(tmp_path / "a.png"), (8, 8), crop=(0.0, 0.5, 0.0, 1.0))
    bottom = cache.decode_image(str(tmp_path / "a.png"), (8, 8), crop=(0.5, 1.0, 0.0, 1.0))
    assert top.min() == 255 and bottom.max() == 0
