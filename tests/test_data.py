"""trainers.data: the tidy table, the relabel overlay, and every validation problem on real files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from trainers.data import TABLE_COLUMNS, DataError, read_eval, read_train, summarize
from trainers.labels import AgeBands, class_names, decode

STEMS = ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal")


def raises_data_error(*args, **kwargs) -> DataError:
    with pytest.raises(DataError) as caught:
        read_train(*args, **kwargs)
    return caught.value


def write_overlay(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(["id,field,value,note", *lines]) + "\n")
    return path


# --- parsing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", [".jpg", ".jpeg", ".png"])
def test_reads_each_extension(make_dataset, extension):
    dataset = make_dataset(n_persons=2, extensions=extension)
    table = read_train(dataset.root).table
    assert len(table) == 14
    assert all(path.endswith(extension) for path in table["rel_path"])
    assert all(Path(path).is_file() for path in table["image_path"])


def test_mixed_extensions_within_one_person(make_dataset):
    dataset = make_dataset(n_persons=1, extensions=[".jpg", ".png", ".jpeg"])
    table = read_train(dataset.root).table
    assert table["rel_path"].map(lambda p: Path(p).suffix).tolist() == [
        ".jpg", ".png", ".jpeg", ".jpg", ".png", ".jpeg", ".jpg"
    ]  # fmt: skip


def test_upper_case_extension_is_accepted(make_dataset):
    dataset = make_dataset(n_persons=1, extensions=lambda _, stem: ".JPG" if stem == "normal" else ".jpg")
    table = read_train(dataset.root).table
    assert table["rel_path"].iloc[-1].endswith("normal.JPG")


def test_table_columns_order_and_types(make_dataset):
    dataset = make_dataset(n_persons=3)
    # rows in train.csv in reverse order: the table is still sorted by folder
    dataset.write_train_csv(list(reversed(dataset.persons)))
    data = read_train(dataset.root)
    table = data.table
    assert tuple(table.columns) == TABLE_COLUMNS
    assert table["person_dir"].tolist() == sorted(table["person_dir"].tolist())
    assert table["stem"].tolist() == list(STEMS) * 3
    assert table["person_id"].tolist()[:7] == ["000001"] * 7  # leading zeros kept, a string
    assert all(isinstance(v, str) for v in table["person_id"])
    first = table.iloc[0]
    assert first["rel_path"] == "train/images/000001_male_Asian_18/mask1.jpg"
    assert first["image_path"] == str(dataset.root.resolve() / first["rel_path"])
    assert Path(first["image_path"]).is_absolute()
    for column in ("mask", "gender", "age", "age_band", "label"):
        assert table[column].dtype.kind == "i", column
    assert data.problems == [] and data.ignored_files == 0
    assert data.fixes == {"gender": 0, "age": 0, "mask_swap": 0}


def test_all_18_classes_through_the_table(make_dataset):
    dataset = make_dataset(n_persons=6)
    table = read_train(dataset.root).table
    assert sorted(set(table["label"])) == list(range(18))
    for row in table.itertuples():
        assert decode(row.label) == (row.mask, row.gender, row.age_band)
    # spot checks written out by hand: class = mask*6 + gender*3 + age band
    person = dataset.persons[5]  # female, age 60+
    assert (person["gender"], int(person["age"]) >= 60) == ("female", True)
    rows = table[table["person_id"] == person["id"]].set_index("stem")
    assert rows.loc["mask3", "label"] == 5
    assert rows.loc["incorrect_mask", "label"] == 11
    assert rows.loc["normal", "label"] == 17
    male_young = table[(table["person_id"] == "000001")].set_index("stem")
    assert male_young.loc[["mask1", "incorrect_mask", "normal"], "label"].tolist() == [0, 6, 12]


@pytest.mark.parametrize(
    ("edges", "expected"),
    [((30, 60), [0, 0, 1, 1, 2, 2]), ((20, 50), [0, 1, 1, 1, 2, 2])],
)
def test_age_bands_default_and_custom(make_dataset, edges, expected):
    ages = [0, 29, 30, 49, 60, 120]
    dataset = make_dataset(n_persons=6, ages=ages)
    data = read_train(dataset.root, age_bands=AgeBands(edges))
    per_person = data.table.drop_duplicates("person_id").sort_values("age")
    assert per_person["age"].tolist() == ages
    assert per_person["age_band"].tolist() == expected
    assert AgeBands(edges).names[0] in summarize(data)


def test_age_band_edges_are_inclusive_at_the_upper_band(make_dataset):
    dataset = make_dataset(n_persons=4, ages=[19, 20, 49, 50])
    table = read_train(dataset.root, age_bands=AgeBands((20, 50))).table
    assert table.drop_duplicates("person_id")["age_band"].tolist() == [0, 1, 1, 2]


# --- validation -----------------------------------------------------------------------------------------


def test_missing_data_root_and_train_csv(tmp_path):
    error = raises_data_error(tmp_path / "nowhere")
    assert "does not exist" in str(error) and "train/ and eval/" in str(error)
    (tmp_path / "train" / "images").mkdir(parents=True)
    error = raises_data_error(tmp_path)
    assert "train/train.csv: file not found" in str(error)


def test_missing_images_folder(tiny_dataset):
    shutil.rmtree(tiny_dataset.images_dir)
    assert "train/images/: folder not found" in str(raises_data_error(tiny_dataset.root))


def test_missing_columns_in_train_csv(tiny_dataset):
    tiny_dataset.write_train_csv(header=("id", "gender", "race", "path"))
    error = raises_data_error(tiny_dataset.root)
    assert "train/train.csv line 1: missing column(s) age" in str(error)


def test_missing_columns_in_info_csv(tiny_dataset):
    tiny_dataset.write_info_csv(header=("ans",))
    with pytest.raises(DataError, match=r"eval/info.csv line 1: missing column\(s\) ImageID"):
        read_eval(tiny_dataset.root)


def test_missing_person_folder(tiny_dataset):
    shutil.rmtree(tiny_dataset.person_dir("000002"))
    error = raises_data_error(tiny_dataset.root)
    assert "train/images/000002_female_Asian_25/: folder is missing (train.csv line 3, id 000002)" in str(
        error
    )
    assert "remove the row" in str(error)


def test_missing_images_are_listed_together(tiny_dataset):
    tiny_dataset.image("000003", "mask4").unlink()
    tiny_dataset.image("000003", "normal").unlink()
    error = raises_data_error(tiny_dataset.root)
    assert len(error.problems) == 1
    assert "000003_male_Asian_52/: missing image(s) mask4, normal (train.csv line 4, id 000003)" in str(error)


def test_extra_image_and_misnamed_image(tiny_dataset):
    folder = tiny_dataset.person_dir("000001")
    shutil.copy(tiny_dataset.image("000001", "mask1"), folder / "mask6.jpg")
    shutil.copy(tiny_dataset.image("000001", "mask1"), folder / "Normal.jpg")
    error = raises_data_error(tiny_dataset.root)
    text = str(error)
    assert "000001_male_Asian_18/mask6.jpg: unexpected file (train.csv line 2, id 000001)" in text
    assert "Normal.jpg: unexpected file" in text and "rename it to normal.jpg" in text


def test_same_stem_with_two_extensions(tiny_dataset):
    source = tiny_dataset.image("000004", "mask1")
    Image.open(source).save(source.with_suffix(".png"))
    error = raises_data_error(tiny_dataset.root)
    assert "000004_female_Asian_33/: mask1 is there 2 times (mask1.jpg, mask1.png)" in str(error)


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40],
    ids=["empty", "text", "broken-png"],
)
def test_corrupt_image(tiny_dataset, content):
    tiny_dataset.image("000002", "mask2").write_bytes(content)
    error = raises_data_error(tiny_dataset.root)
    assert "000002_female_Asian_25/mask2.jpg: cannot be read as an image" in str(error)
    assert "replace the file" in str(error)
    # without the image check the same data reads (the cache step would fail later instead)
    assert len(read_train(tiny_dataset.root, check_images=False).table) == 42


def test_corrupt_images_in_a_bigger_set_name_the_right_files(make_dataset):
    dataset = make_dataset(n_persons=12, n_eval=70)  # enough images for the threaded check
    dataset.image("000007", "mask3").write_bytes(b"junk")
    dataset.image("000011", "normal").write_bytes(b"")
    error = raises_data_error(dataset.root)
    assert [p.where for p in error.problems] == [
        f"train/images/{dataset.persons[6]['path']}/mask3.jpg",
        f"train/images/{dataset.persons[10]['path']}/normal.jpg",
    ]
    (dataset.root / "eval" / "images" / dataset.eval_ids[40]).write_bytes(b"junk")
    with pytest.raises(DataError) as caught:
        read_eval(dataset.root)
    assert [p.where for p in caught.value.problems] == ["eval/info.csv line 42"]


def test_truncated_jpeg_passes_the_header_check_and_fails_the_decode_check(tiny_dataset):
    path = tiny_dataset.image("000003", "mask4")
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) * 9 // 10])  # a copy interrupted near its end
    assert len(read_train(tiny_dataset.root).table) == 42  # headers are intact
    error = raises_data_error(tiny_dataset.root, decode_images=True)
    assert [p.where for p in error.problems] == [f"train/images/{tiny_dataset.persons[2]['path']}/mask4.jpg"]
    assert "truncated" in str(error).lower() and "replace the file" in str(error)


def test_png_with_bad_checksum_is_caught(tiny_dataset):
    path = tiny_dataset.image("000001", "normal")
    png = path.with_suffix(".png")
    Image.open(path).save(png)
    path.unlink()
    data = bytearray(png.read_bytes())
    data[-20] ^= 0xFF  # inside the image data: the chunk CRC no longer matches
    png.write_bytes(bytes(data))
    assert "normal.png: cannot be read as an image" in str(raises_data_error(tiny_dataset.root))


def test_hidden_and_resource_fork_files_are_ignored_and_counted(tiny_dataset):
    folder = tiny_dataset.person_dir("000001")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    (folder / "._mask1.jpg").write_bytes(b"resource fork")
    (tiny_dataset.images_dir / "._000001_male_Asian_18").write_bytes(b"resource fork")
    data = read_train(tiny_dataset.root)
    assert data.ignored_files == 3
    assert data.problems == []
    assert len(data.table) == 42
    assert "ignored files (hidden or ._*): 3" in summarize(data)


def test_identical_duplicate_id_is_kept_once_with_a_warning(tiny_dataset):
    rows = tiny_dataset.persons + [dict(tiny_dataset.persons[2])]
    tiny_dataset.write_train_csv(rows)
    data = read_train(tiny_dataset.root)
    assert data.table["person_id"].nunique() == 6 and len(data.table) == 42
    assert [p.severity for p in data.problems] == ["warning"]
    assert "train/train.csv line 8 (id 000003): duplicate of line 4" in str(data.problems[0])
    assert "duplicate of line 4" in summarize(data)


def test_conflicting_duplicate_id_is_an_error(tiny_dataset):
    clash = dict(tiny_dataset.persons[2], age="44")
    tiny_dataset.write_train_csv(tiny_dataset.persons + [clash])
    error = raises_data_error(tiny_dataset.root)
    assert "train/train.csv line 4 (id 000003): id 000003 appears on lines 4, 8 with different age" in str(
        error
    )


def test_two_ids_sharing_one_folder(tiny_dataset):
    rows = [dict(r) for r in tiny_dataset.persons]
    rows[1]["path"] = rows[0]["path"]
    rows[1]["gender"] = "male"
    tiny_dataset.write_train_csv(rows)
    error = raises_data_error(tiny_dataset.root)
    assert "train/train.csv lines 2, 3: ids 000001, 000002 share the folder" in str(error)


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("age", "121", "age '121' is not an integer 0..120"),
        ("age", "-3", "age '-3' is not an integer 0..120"),
        ("age", "45.5", "age '45.5' is not an integer"),
        ("age", "", "age '' is not an integer"),
        ("gender", "unknown", "gender 'unknown' is not male or female"),
        ("gender", "", "gender '' is not male or female"),
        ("id", "", "id is empty"),
    ],
)
def test_out_of_range_values_name_the_row(tiny_dataset, column, value, expected):
    rows = [dict(r) for r in tiny_dataset.persons]
    rows[3][column] = value
    tiny_dataset.write_train_csv(rows)
    error = raises_data_error(tiny_dataset.root)
    assert "train/train.csv line 5" in str(error)
    assert expected in str(error)


def test_gender_word_case_and_spaces_are_tolerated(tiny_dataset):
    rows = [dict(r) for r in tiny_dataset.persons]
    rows[0]["gender"] = " Male "
    tiny_dataset.write_train_csv(rows)
    assert read_train(tiny_dataset.root).table["gender"].iloc[0] == 0


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("../outside", "escapes train/images through '..'"),
        ("000001_male_Asian_18/../../x", "escapes train/images through '..'"),
        ("/etc", "is absolute"),
        ("", "path is empty"),
        (".", "is train/images itself"),
    ],
)
def test_path_that_escapes_the_images_folder(tiny_dataset, path, expected):
    rows = [dict(r) for r in tiny_dataset.persons]
    rows[0]["path"] = path
    tiny_dataset.write_train_csv(rows)
    error = raises_data_error(tiny_dataset.root)
    assert "train/train.csv line 2 (id 000001)" in str(error)
    assert expected in str(error)


def test_symlinked_person_folder_outside_is_refused(tiny_dataset, tmp_path):
    outside = tmp_path / "elsewhere"
    folder = tiny_dataset.person_dir("000001")
    shutil.move(folder, outside)
    os.symlink(outside, folder)
    error = raises_data_error(tiny_dataset.root)
    assert "000001_male_Asian_18/: resolves to" in str(error) and "outside train/images" in str(error)


def test_symlinked_image_outside_is_refused(tiny_dataset, tmp_path):
    image = tiny_dataset.image("000002", "mask5")
    outside = tmp_path / "secret.jpg"
    shutil.move(image, outside)
    os.symlink(outside, image)
    error = raises_data_error(tiny_dataset.root)
    assert "000002_female_Asian_25/mask5.jpg: is a link to" in str(error)


def test_symlink_inside_the_images_folder_is_fine(tiny_dataset):
    image = tiny_dataset.image("000002", "mask5")
    image.unlink()
    os.symlink(tiny_dataset.image("000002", "mask4"), image)
    assert len(read_train(tiny_dataset.root).table) == 42


def test_every_problem_is_listed_at_once(tiny_dataset):
    rows = [dict(r) for r in tiny_dataset.persons]
    rows[0]["age"] = "old"
    tiny_dataset.write_train_csv(rows)
    tiny_dataset.image("000002", "mask1").unlink()
    (tiny_dataset.person_dir("000003") / "notes.txt").write_text("hi")
    tiny_dataset.image("000004", "normal").write_bytes(b"garbage")
    shutil.rmtree(tiny_dataset.person_dir("000005"))
    error = raises_data_error(tiny_dataset.root)
    text = str(error)
    assert len(error.problems) == 5
    assert text.startswith("5 error(s) in the data:")
    for fragment in ("line 2 (id 000001): age 'old'", "missing image(s) mask1", "notes.txt: unexpected file",
                     "normal.jpg: cannot be read", "000005_male_Asian_80/: folder is missing"):  # fmt: skip
        assert fragment in text
    assert len(text.splitlines()) == 6  # header + one line per problem


def test_unlisted_folder_is_a_warning(tiny_dataset):
    (tiny_dataset.images_dir / "999999_male_Asian_30").mkdir()
    data = read_train(tiny_dataset.root)
    assert [p.severity for p in data.problems] == ["warning"]
    assert "not listed in train.csv are not used: 999999_male_Asian_30" in data.problems[0].message


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tiny_dataset):
    text = tiny_dataset.train_csv.read_text().splitlines()
    text.insert(3, "")
    text.insert(4, ",,,,")
    text[6] = text[6].replace(",Asian,33,", ",Asian,999,")  # id 000004, now on line 7
    tiny_dataset.train_csv.write_text("\n".join(text) + "\n\n")
    error = raises_data_error(tiny_dataset.root)
    assert [str(p) for p in error.problems] == [
        "error: train/train.csv line 7 (id 000004): age '999' is not an integer 0..120; "
        "write the age in years"
    ]


def test_bad_csv_row_width(tiny_dataset):
    with open(tiny_dataset.train_csv, "a") as out:
        out.write("000099,male,Asian\n")
    assert "train/train.csv line 8: has 3 field(s) but the header has 5" in str(
        raises_data_error(tiny_dataset.root)
    )


# --- relabel overlay ------------------------------------------------------------------------------------


def test_relabel_overlay_is_applied_and_counted(tiny_dataset, tmp_path):
    overlay = write_overlay(
        tmp_path / "fixes.csv",
        [
            "000001,gender,female,photos show a woman",
            "000002,age,65,",
            "000003,mask_swap,incorrect_mask<->normal,pictures swapped",
        ],
    )
    before = read_train(tiny_dataset.root).table.set_index("rel_path")
    data = read_train(tiny_dataset.root, relabel=overlay)
    after = data.table.set_index("rel_path")
    assert data.fixes == {"gender": 1, "age": 1, "mask_swap": 1}
    p1 = after[after["person_id"] == "000001"]
    assert set(p1["gender"]) == {1} and p1.loc[p1["stem"] == "normal", "label"].item() == 15
    p2 = after[after["person_id"] == "000002"]
    assert set(p2["age"]) == {65} and set(p2["age_band"]) == {2}
    p3 = after[after["person_id"] == "000003"].set_index("stem")
    assert p3.loc["incorrect_mask", "mask"] == 2 and p3.loc["normal", "mask"] == 1
    assert p3.loc["mask1", "mask"] == 0
    # the untouched persons are unchanged
    untouched = after["person_id"].isin(["000004", "000005", "000006"])
    assert after[untouched].equals(before[before["person_id"].isin(["000004", "000005", "000006"])])
    assert "relabel fixes: gender 1, age 1, mask_swap 1" in summarize(data)


def test_relabel_fix_that_changes_nothing_is_a_warning(tiny_dataset, tmp_path):
    overlay = write_overlay(tmp_path / "fixes.csv", ["000001,gender,male,"])
    data = read_train(tiny_dataset.root, relabel=overlay)
    assert data.fixes["gender"] == 0
    assert [str(p) for p in data.problems] == [
        f"warning: {overlay} line 2: id 000001 is already male; the fix changes nothing"
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("1,gender,female,", "id '1' is not in train.csv; write the id exactly as in train.csv"),
        ("000001,race,Asian,", "unknown field 'race'; use one of gender, age, mask_swap"),
        ("000001,gender,woman,", "gender value 'woman' must be male or female"),
        ("000001,age,200,", "age value '200' must be an integer 0..120"),
        ("000001,age,thirty,", "age value 'thirty' must be an integer"),
        ("000001,mask_swap,mask1<->mask2,", "mask_swap value 'mask1<->mask2' must be STEM<->STEM"),
        ("000001,mask_swap,mask9<->normal,", "mask_swap value 'mask9<->normal'"),
        ("000001,mask_swap,normal,", "mask_swap value 'normal'"),
    ],
)
def test_bad_relabel_rows_name_the_overlay_file_and_row(tiny_dataset, tmp_path, line, expected):
    overlay = write_overlay(tmp_path / "fixes.csv", ["000002,age,40,", line])
    error = raises_data_error(tiny_dataset.root, relabel=overlay)
    assert f"{overlay} line 3: {expected}" in str(error)
    assert len(error.problems) == 1


def test_relabel_same_fix_twice_is_an_error(tiny_dataset, tmp_path):
    overlay = write_overlay(
        tmp_path / "fixes.csv",
        [
            "000001,age,40,",
            "000001,age,41,",
            "000002,mask_swap,mask1<->normal,",
            "000002,mask_swap,normal<->incorrect_mask,",
        ],
    )
    error = raises_data_error(tiny_dataset.root, relabel=overlay)
    assert f"{overlay} line 3: id 000001 already has this fixed on line 2" in str(error)
    assert f"{overlay} line 5: id 000002 already has this fixed on line 4" in str(error)


def test_relabel_overlay_missing_file_or_columns(tiny_dataset, tmp_path):
    missing = tmp_path / "nope.csv"
    assert f"{missing}: file not found" in str(raises_data_error(tiny_dataset.root, relabel=missing))
    bad = tmp_path / "bad.csv"
    bad.write_text("id,value\n000001,female\n")
    assert f"{bad} line 1: missing column(s) field" in str(raises_data_error(tiny_dataset.root, relabel=bad))


def test_relabel_problems_come_with_the_data_problems(tiny_dataset, tmp_path):
    overlay = write_overlay(tmp_path / "fixes.csv", ["000404,age,40,"])
    tiny_dataset.image("000001", "mask1").unlink()
    error = raises_data_error(tiny_dataset.root, relabel=overlay)
    assert len(error.problems) == 2


# --- eval -----------------------------------------------------------------------------------------------


def test_read_eval_keeps_info_csv_order(tiny_dataset):
    order = [tiny_dataset.eval_ids[i] for i in (2, 0, 3, 1)]
    tiny_dataset.write_info_csv(order)
    frame = read_eval(tiny_dataset.root)
    assert list(frame.columns) == ["image_id", "image_path"]
    assert frame["image_id"].tolist() == order
    assert frame["image_path"].tolist() == [
        str(tiny_dataset.root.resolve() / "eval/images" / i) for i in order
    ]


def test_read_eval_lists_every_missing_image(tiny_dataset):
    for image_id in tiny_dataset.eval_ids[1:3]:
        (tiny_dataset.root / "eval" / "images" / image_id).unlink()
    with pytest.raises(DataError) as caught:
        read_eval(tiny_dataset.root)
    text = str(caught.value)
    assert len(caught.value.problems) == 2
    assert f"eval/info.csv line 3: eval/images/{tiny_dataset.eval_ids[1]} is missing" in text
    assert f"eval/info.csv line 4: eval/images/{tiny_dataset.eval_ids[2]} is missing" in text


def test_read_eval_refuses_duplicates_paths_and_corrupt_images(tiny_dataset):
    ids = tiny_dataset.eval_ids
    (tiny_dataset.root / "eval" / "images" / ids[3]).write_bytes(b"not an image")
    tiny_dataset.write_info_csv([ids[0], ids[0], "../train/train.csv", ids[3]])
    with pytest.raises(DataError) as caught:
        read_eval(tiny_dataset.root)
    text = str(caught.value)
    assert "line 3: ImageID" in text and "is already on line 2" in text
    assert "line 4: ImageID '../train/train.csv' is not a plain file name" in text
    assert "line 5:" in text and "cannot be read as an image" in text


def test_read_eval_missing_info_csv(tiny_dataset):
    tiny_dataset.info_csv.unlink()
    with pytest.raises(DataError, match="eval/info.csv: file not found"):
        read_eval(tiny_dataset.root)


# --- summary --------------------------------------------------------------------------------------------


def test_summarize_reports_counts(make_dataset):
    dataset = make_dataset(n_persons=6)
    text = summarize(read_train(dataset.root))
    assert "persons: 6   images: 42" in text
    assert "wear 30 | incorrect 6 | not_wear 6" in text
    assert "male 21 | female 21" in text
    for name in class_names():
        assert name in text
    assert "warnings: 0" in text
