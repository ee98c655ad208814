"""A synthetic data set in the exact competition layout, drawn by foldtune itself.

Why: the whole pipeline (data checks, folds, cache, fit, search, ensemble) must be runnable and testable
without the real photos, which cannot be shipped. The pictures are stylised faces whose mask state, gender
and age leave learnable but imperfect traces, so a small CNN scores well above chance while ensembles and
TTA still have something to add:

- mask state: a mask over nose and mouth (wear), pulled below the nose or onto the chin (incorrect), or
  none with the mouth visible (not wear);
- gender: mainly hair length, long more often for women, with overlap both ways; weaker cues in face
  width and eyebrow thickness;
- age: hair greys gradually and wrinkles grow with age while facial features lose contrast, so ages near
  the band edges (29/30, 57-60) look alike.

Every person keeps one identity (skin, hair, face shape, camera placement) across their 7 images; each
image adds its own jitter. Generation is deterministic per seed, down to the image bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainers.io import write_text_atomic
from trainers.labels import MASK_STEMS, NUM_CLASSES, AgeBands, encode

MARKER_NAME = ".foldtune-demo.json"
STAGING_PREFIX = ".foldtune-demo-staging-"
STEMS = tuple(MASK_STEMS)  # mask1..mask5, incorrect_mask, normal
JPEG_QUALITY = 85
FEMALE_SHARE = 0.6  # the competition has more women than men
LONG_HAIR_PROBABILITY = {0: 0.1, 1: 0.85}  # by gender code: the main gender signal, deliberately imperfect
TRAIN_EXTENSIONS = ((".jpg", 0.86), (".png", 0.08), (".jpeg", 0.06))

# Relative weight of each age, shaped like the competition: many 18-29, a dip in the 30s, many 40-59 and
# few aged 60 or more. Every year near the band edges (29/30, 57-60) is possible.
_AGE_WEIGHTS: dict[int, float] = {
    **dict.fromkeys(range(18, 26), 6.0),
    **dict.fromkeys(range(26, 30), 3.5),
    **dict.fromkeys(range(30, 40), 1.2),
    **dict.fromkeys(range(40, 50), 2.2),
    **dict.fromkeys(range(50, 60), 3.8),
    60: 8.0,
    **dict.fromkeys(range(61, 65), 0.75),
}

_MASK_COLOURS = (
    (236, 236, 236),  # white
    (150, 192, 222),  # surgical blue
    (36, 36, 42),  # black
    (150, 150, 156),  # grey
    (232, 172, 192),  # pink
    (42, 52, 92),  # navy
    (214, 196, 172),  # beige, close to skin on purpose
    (122, 160, 132),  # green
)
_MASK_PATTERNS = ("plain", "pleats", "stripes", "dots")
_BACKGROUNDS = ((222, 222, 218), (200, 208, 216), (232, 226, 210), (180, 186, 190), (150, 160, 150))
_SKIN_LIGHT, _SKIN_DARK = np.array([236.0, 200.0, 172.0]), np.array([176.0, 132.0, 100.0])
_HAIR_GREY = np.array([206.0, 204.0, 200.0])

_SPLIT_TRAIN, _SPLIT_EVAL = 0, 1


@dataclass(frozen=True)
class DemoSummary:
    """What `write_demo_data` wrote, so callers can print it or check it without re-reading the files."""

    root: Path
    train_persons: int
    eval_persons: int
    train_images: int
    eval_images: int
    train_class_counts: tuple[int, ...]  # images per class 0-17 in train
    eval_class_counts: tuple[int, ...]  # images per class 0-17 in eval (the answers)
    answers_written: bool

    def __str__(self) -> str:
        return (
            f"demo data in {self.root}: train {self.train_persons} persons / {self.train_images} images, "
            f"eval {self.eval_persons} persons / {self.eval_images} images"
            + (", eval/answers.csv written" if self.answers_written else "")
        )


@dataclass(frozen=True)
class _Person:
    """One synthetic identity: everything that stays the same across the person's 7 pictures."""

    split: int
    index: int
    gender: int
    age: int
    skin: np.ndarray
    hair: np.ndarray  # hair colour after greying
    hair_length: float  # how far hair falls below the face centre, in face half-heights
    hairline: float  # forehead height above the face centre, in face half-heights
    face_width: float  # face half-width as a fraction of image width
    face_height: float  # face half-height as a fraction of image height
    offset: tuple[float, float]  # camera placement, as fractions of the image
    wrinkles: int
    feature_contrast: float  # 1 young, lower when older: eyes/mouth fade towards the skin
    brow: float  # eyebrow thickness in face half-heights; a weak gender cue (thicker for men on average)
    background: tuple[int, int, int]
    shirt: tuple[int, int, int]
    masks: tuple[tuple[tuple[int, int, int], tuple[int, int, int], str], ...]  # (colour, accent, pattern)
    extensions: tuple[str, ...]  # file extension per stem

    @property
    def person_id(self) -> str:
        return f"{self.index + 1:06d}"

    @property
    def dir_name(self) -> str:
        gender = "female" if self.gender == 1 else "male"
        return f"{self.person_id}_{gender}_Asian_{self.age}"


def write_demo_data(
    out: Path,
    persons: int = 300,
    eval_persons: int | None = None,
    seed: int = 0,
    image_size: tuple[int, int] = (96, 128),  # (width, height)
    answers: bool = True,
) -> DemoSummary:
    """Write a synthetic train/eval data set in the competition layout under `out`.

    `eval_persons` defaults to a third of `persons`; eval persons are different people from the train
    persons. Everything is first written to a hidden staging folder inside `out` and moved into place at
    the end, so an interrupted run never leaves a half-written data set. `out` must be empty, new, or a
    previous demo output (recognised by its marker file), which is replaced.
    """
    out = Path(out)
    persons, eval_persons, seed, width, height = _checked_arguments(persons, eval_persons, seed, image_size)
    params = {"persons": persons, "eval_persons": eval_persons, "seed": seed, "image_size": [width, height]}
    _claim_output_folder(out, params)

    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    train_people = _draw_people(_SPLIT_TRAIN, persons, seed)
    eval_people = _draw_people(_SPLIT_EVAL, eval_persons, seed)
    bands = AgeBands()

    train_counts = [0] * NUM_CLASSES
    train_dir = staging / "train"
    (train_dir / "images").mkdir(parents=True)
    csv_lines = ["id,gender,race,age,path"]
    for person in train_people:
        person_dir = train_dir / "images" / person.dir_name
        person_dir.mkdir()
        for stem_index, stem in enumerate(STEMS):
            image = _render(person, stem_index, seed, width, height)
            _save_image(image, person_dir / f"{stem}{person.extensions[stem_index]}")
            train_counts[encode(MASK_STEMS[stem], person.gender, bands.band(person.age))] += 1
        gender = "female" if person.gender == 1 else "male"
        csv_lines.append(f"{person.person_id},{gender},Asian,{person.age},{person.dir_name}")
    write_text_atomic("\n".join(csv_lines) + "\n", train_dir / "train.csv")

    eval_counts = [0] * NUM_CLASSES
    eval_dir = staging / "eval"
    (eval_dir / "images").mkdir(parents=True)
    eval_rows: list[tuple[str, int]] = []
    for person in eval_people:
        for stem_index, stem in enumerate(STEMS):
            image_id = _eval_image_id(seed, person.index, stem)
            _save_image(_render(person, stem_index, seed, width, height), eval_dir / "images" / image_id)
            label = encode(MASK_STEMS[stem], person.gender, bands.band(person.age))
            eval_rows.append((image_id, label))
            eval_counts[label] += 1
    order = np.random.default_rng([seed, _SPLIT_EVAL, 2**31]).permutation(len(eval_rows))
    eval_rows = [eval_rows[i] for i in order]  # the competition's eval images are not grouped by person
    write_text_atomic("ImageID,ans\n" + "".join(f"{i},0\n" for i, _ in eval_rows), eval_dir / "info.csv")
    if answers:
        answer_lines = "".join(f"{image_id},{label}\n" for image_id, label in eval_rows)
        write_text_atomic("ImageID,ans\n" + answer_lines, eval_dir / "answers.csv")

    for part in ("train", "eval"):
        os.replace(staging / part, out / part)
    staging.rmdir()
    summary = DemoSummary(
        root=out,
        train_persons=persons,
        eval_persons=eval_persons,
        train_images=persons * len(STEMS),
        eval_images=eval_persons * len(STEMS),
        train_class_counts=tuple(train_counts),
        eval_class_counts=tuple(eval_counts),
        answers_written=answers,
    )
    _write_marker(out, params, complete=True)
    return summary


def _checked_arguments(
    persons: int, eval_persons: int | None, seed: int, image_size: tuple[int, int]
) -> tuple[int, int, int, int, int]:
    """Validate arguments up front so a bad call fails before anything is written."""

    def whole(value, name: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
            raise ValueError(
                f"write_demo_data: {name} must be a whole number from {low} to {high}, got {value!r}"
            )
        return int(value)

    persons = whole(persons, "persons", 1, 999_999)
    eval_persons = (
        max(1, persons // 3) if eval_persons is None else whole(eval_persons, "eval_persons", 1, 999_999)
    )
    seed = whole(seed, "seed", 0, 2**32 - 1)
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise ValueError(f"write_demo_data: image_size must be (width, height), got {image_size!r}")
    width = whole(image_size[0], "image_size width", 16, 2048)
    height = whole(image_size[1], "image_size height", 16, 2048)
    return persons, eval_persons, seed, width, height


def _claim_output_folder(out: Path, params: dict) -> None:
    """Make `out` ours: refuse foreign content, clear a previous demo output, mark the run as started."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"demo output {out} is a file, not a folder; pass a folder path")
    out.mkdir(parents=True, exist_ok=True)
    entries = [entry.name for entry in out.iterdir()]
    if entries and MARKER_NAME not in entries:
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(
            f"demo output {out} is not empty ({shown}) and is not a previous foldtune demo output "
            f"(no {MARKER_NAME}); choose a new or empty folder so nothing of yours is overwritten"
        )
    _write_marker(out, params, complete=False)  # from here on a rerun may clean up after an interruption
    for name in entries:
        if name in ("train", "eval") or name.startswith(STAGING_PREFIX):
            shutil.rmtree(out / name)


def _write_marker(out: Path, params: dict, complete: bool) -> None:
    content = {"generator": "foldtune.trainers.demo", "complete": complete, **params}
    write_text_atomic(json.dumps(content, indent=2) + "\n", out / MARKER_NAME)


def _save_image(image: Image.Image, path: Path) -> None:
    """Encode in memory, then write in one call (images live in the staging folder until the end)."""
    buffer = io.BytesIO()
    if path.suffix == ".png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    path.write_bytes(buffer.getvalue())


def _eval_image_id(seed: int, index: int, stem: str) -> str:
    """A 40-hex name like the competition's, stable per (seed, person, stem), revealing nothing."""
    return hashlib.sha1(f"foldtune-demo:{seed}:{index}:{stem}".encode()).hexdigest() + ".jpg"


def _draw_people(split: int, count: int, seed: int) -> list[_Person]:
    """Draw ages and genders by stratified sampling (so even a small demo is close to the target shares),
    then each person's look from their own random stream, independent of how many others there are."""
    rng = np.random.default_rng([seed, split, 2**31 + 1])
    ages = np.array(sorted(_AGE_WEIGHTS))
    cdf = np.cumsum([_AGE_WEIGHTS[a] for a in ages])
    cdf = cdf / cdf[-1]
    age_quantiles = (rng.permutation(count) + rng.random(count)) / count
    gender_quantiles = (rng.permutation(count) + rng.random(count)) / count
    drawn_ages = ages[np.minimum(np.searchsorted(cdf, age_quantiles, side="right"), len(ages) - 1)]
    genders = (gender_quantiles < FEMALE_SHARE).astype(int)
    return [
        _draw_person(split, index, int(genders[index]), int(drawn_ages[index]), seed)
        for index in range(count)
    ]


def _draw_person(split: int, index: int, gender: int, age: int, seed: int) -> _Person:
    rng = np.random.default_rng([seed, split, index])
    greying = float(np.clip(((age - 25) / 35) ** 1.3 if age > 25 else 0.0, 0, 1) + rng.normal(0, 0.1))
    greying = float(np.clip(greying, 0.0, 1.0))
    dark_hair = np.array([22.0, 18.0, 16.0]) + rng.uniform(0, 45) * np.array([1.0, 0.8, 0.6])
    long_hair = rng.random() < LONG_HAIR_PROBABILITY[gender]
    hair_length = rng.uniform(0.9, 1.9) if long_hair else rng.uniform(-0.25, 0.35)
    ageing = float(np.clip((age - 18) / 45, 0, 1))
    masks = []
    for _ in range(5):
        colour, accent = rng.choice(len(_MASK_COLOURS), size=2, replace=False)
        pattern = _MASK_PATTERNS[rng.choice(len(_MASK_PATTERNS), p=[0.45, 0.3, 0.15, 0.1])]
        masks.append((_MASK_COLOURS[colour], _MASK_COLOURS[accent], pattern))
    base_extension = _choose_extension(rng)
    extensions = tuple(base_extension if rng.random() > 0.05 else _choose_extension(rng) for _ in STEMS)
    background = np.array(_BACKGROUNDS[rng.integers(len(_BACKGROUNDS))]) + rng.normal(0, 10, 3)
    return _Person(
        split=split,
        index=index,
        gender=gender,
        age=age,
        skin=_SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * rng.beta(2, 2.5) + rng.normal(0, 4, 3),
        hair=dark_hair + (_HAIR_GREY - dark_hair) * greying,
        hair_length=float(hair_length),
        hairline=float(rng.uniform(0.45, 0.72)),
        face_width=float(rng.uniform(0.245, 0.29) if gender == 0 else rng.uniform(0.225, 0.27)),
        face_height=float(rng.uniform(0.21, 0.25)),
        offset=(float(rng.normal(0, 0.03)), float(rng.normal(0, 0.025))),
        wrinkles=int(np.clip(round((age - 24) / 7 + rng.normal(0, 0.8)), 0, 6)),
        feature_contrast=float(np.clip(1.0 - 0.45 * ageing + rng.normal(0, 0.05), 0.4, 1.0)),
        brow=float(rng.uniform(0.05, 0.09) if gender == 0 else rng.uniform(0.03, 0.065)),
        background=_rgb(background),
        shirt=_rgb(rng.uniform(30, 220, 3)),
        masks=tuple(masks),
        extensions=extensions,
    )


def _choose_extension(rng: np.random.Generator) -> str:
    names, weights = zip(*TRAIN_EXTENSIONS, strict=True)
    return names[rng.choice(len(names), p=np.array(weights) / sum(weights))]


def _rgb(colour) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, round(float(c)))) for c in colour)
    return r, g, b


def _mix(a, b, t: float) -> tuple[int, int, int]:
    """Colour a moved towards b by t (0 keeps a)."""
    return _rgb([x * (1 - t) + y * t for x, y in zip(a, b, strict=True)])


def _render(person: _Person, stem_index: int, seed: int, width: int, height: int) -> Image.Image:
    """Draw one picture of `person` wearing the mask state of `STEMS[stem_index]`."""
    rng = np.random.default_rng([seed, person.split, person.index, 1 + stem_index])
    scale = rng.uniform(0.93, 1.07)
    cx = width * (0.5 + person.offset[0] + rng.normal(0, 0.02))
    cy = height * (0.45 + person.offset[1] + rng.normal(0, 0.015))
    rx = width * person.face_width * scale
    ry = height * person.face_height * scale
    line = max(1, round(width / 80))
    skin = _rgb(person.skin * rng.uniform(0.96, 1.04))
    hair = _rgb(person.hair)
    shade = _mix(skin, (60, 30, 20), 0.25)

    image = Image.new("RGB", (width, height), person.background)
    draw = ImageDraw.Draw(image)
    # shoulders and neck
    draw.ellipse((cx - 2.0 * rx, cy + 1.35 * ry, cx + 2.0 * rx, cy + 3.6 * ry), fill=person.shirt)
    draw.rectangle((cx - 0.42 * rx, cy + 0.5 * ry, cx + 0.42 * rx, cy + 1.55 * ry), fill=shade)
    # hair behind the head; long hair falls past the face onto the shoulders
    draw.ellipse((cx - 1.18 * rx, cy - 1.2 * ry, cx + 1.18 * rx, cy + 0.6 * ry), fill=hair)
    if person.hair_length > 0:
        bottom = cy + person.hair_length * ry
        draw.rounded_rectangle(
            (cx - 1.22 * rx, cy - 0.4 * ry, cx + 1.22 * rx, bottom), radius=max(1, 0.3 * rx), fill=hair
        )
    if person.hair_length < 0.6:  # ears show unless long hair covers them
        for side in (-1, 1):
            ex = cx + side * 0.98 * rx
            draw.ellipse((ex - 0.15 * rx, cy - 0.2 * ry, ex + 0.15 * rx, cy + 0.15 * ry), fill=shade)
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=skin)
    # hair on top of the head down to the hairline
    top = cy - 1.14 * ry
    hairline = cy - (person.hairline + rng.normal(0, 0.03)) * ry
    draw.chord((cx - 1.04 * rx, top, cx + 1.04 * rx, 2 * hairline - top), 180, 360, fill=hair)

    _draw_wrinkles(draw, person, cx, cy, rx, ry, skin, hairline, line, rng)
    contrast = person.feature_contrast
    brow = _mix(hair, skin, 0.2)
    eye = _mix((25, 20, 20), skin, 1 - contrast)
    for side in (-1, 1):
        ex = cx + side * 0.36 * rx
        draw.rectangle(
            (ex - 0.17 * rx, cy - 0.31 * ry - person.brow * ry, ex + 0.17 * rx, cy - 0.31 * ry), fill=brow
        )
        draw.ellipse((ex - 0.13 * rx, cy - 0.17 * ry, ex + 0.13 * rx, cy - 0.07 * ry), fill=eye)
    nose = _mix(skin, (90, 50, 40), 0.22 * contrast + 0.1)
    draw.polygon(
        ((cx, cy - 0.05 * ry), (cx - 0.12 * rx, cy + 0.3 * ry), (cx + 0.12 * rx, cy + 0.3 * ry)), fill=nose
    )
    nostril = _mix((60, 35, 30), skin, 0.45 * (1 - contrast) + 0.2)
    for side in (-1, 1):
        nx = cx + side * 0.06 * rx
        draw.ellipse((nx - 0.04 * rx, cy + 0.26 * ry, nx + 0.04 * rx, cy + 0.32 * ry), fill=nostril)
    lips = _mix((160, 58, 62), skin, 0.8 * (1 - contrast))
    mouth_y = cy + 0.55 * ry + rng.normal(0, 0.02) * ry
    mouth_w = rng.uniform(0.17, 0.22) * rx
    draw.ellipse((cx - mouth_w, mouth_y - 0.06 * ry, cx + mouth_w, mouth_y + 0.07 * ry), fill=lips)
    draw.line((cx - mouth_w, mouth_y, cx + mouth_w, mouth_y), fill=_mix(lips, (40, 10, 10), 0.5), width=line)

    mask_state = MASK_STEMS[STEMS[stem_index]]
    if mask_state == 0:
        top_y = cy + rng.uniform(-0.05, 0.06) * ry  # over the nose bridge
        _draw_mask(draw, person.masks[stem_index], cx, cy, rx, ry, top_y, cy + 1.02 * ry, line, rng)
    elif mask_state == 1:
        design = person.masks[int(rng.integers(5))]
        if rng.random() < 0.6:  # below the nose, mouth covered
            top_y = cy + rng.uniform(0.33, 0.4) * ry
            _draw_mask(draw, design, cx, cy, rx, ry, top_y, cy + 1.05 * ry, line, rng)
        else:  # down on the chin, mouth visible
            top_y = cy + rng.uniform(0.68, 0.75) * ry
            _draw_mask(draw, design, cx, cy, rx, ry, top_y, cy + 1.2 * ry, line, rng)
    return _photograph(image, rng)


def _draw_wrinkles(draw, person: _Person, cx, cy, rx, ry, skin, hairline, line, rng) -> None:
    """Forehead lines, crow's feet and smile lines; more of them and deeper with age."""
    if person.wrinkles == 0:
        return
    crease = _mix(skin, (70, 40, 30), 0.2 + 0.05 * person.wrinkles)
    forehead_top, forehead_bottom = hairline + 0.06 * ry, cy - 0.38 * ry
    for k in range(min(person.wrinkles, 4)):
        y = forehead_bottom - (k + 0.5) * (forehead_bottom - forehead_top) / 4 + rng.normal(0, 0.01) * ry
        half = rx * rng.uniform(0.25, 0.45)
        draw.arc((cx - half, y - 0.05 * ry, cx + half, y + 0.05 * ry), 190, 350, fill=crease, width=line)
    if person.wrinkles >= 2:
        for side in (-1, 1):
            ex = cx + side * 0.58 * rx
            draw.line((ex, cy - 0.12 * ry, ex + side * 0.1 * rx, cy - 0.2 * ry), fill=crease, width=line)
            draw.line((ex, cy - 0.1 * ry, ex + side * 0.1 * rx, cy - 0.04 * ry), fill=crease, width=line)
    if person.wrinkles >= 3:
        for side in (-1, 1):
            start = (cx + side * 0.17 * rx, cy + 0.3 * ry)
            draw.line((*start, cx + side * 0.3 * rx, cy + 0.62 * ry), fill=crease, width=line)


def _draw_mask(draw, design, cx, cy, rx, ry, top_y, bottom_y, line, rng) -> None:
    """A mask across the face from top_y down to bottom_y, with ear straps and its pattern."""
    colour, accent, pattern = design
    half_width = 1.0 * rx
    depth = bottom_y - top_y
    left, right = cx - half_width, cx + half_width
    # lower half of an ellipse whose centre line is the mask's top edge, plus a flat top strip
    draw.chord((left, top_y - 0.35 * depth, right, bottom_y), 0, 180, fill=colour)
    draw.rectangle((left + 0.06 * rx, top_y, right - 0.06 * rx, top_y + 0.35 * depth), fill=colour)
    strap = _mix(colour, (0, 0, 0), 0.25)
    for side in (-1, 1):
        edge = cx + side * half_width
        draw.line(
            (edge, top_y + 0.1 * depth, edge + side * 0.02 * rx, cy - 0.05 * ry), fill=strap, width=line
        )
    if pattern == "pleats":
        fold = _mix(colour, (0, 0, 0), 0.18)
        for k in (1, 2, 3):
            y = top_y + k * depth * 0.2
            draw.line((left + 0.2 * rx, y, right - 0.2 * rx, y), fill=fold, width=line)
    elif pattern == "stripes":
        for k in range(1, 4):
            y = top_y + k * depth * 0.22
            draw.line((left + 0.1 * rx, y, right - 0.1 * rx, y), fill=accent, width=max(1, 2 * line))
    elif pattern == "dots":
        for _ in range(6):
            x = cx + rng.uniform(-0.6, 0.6) * rx
            y = top_y + rng.uniform(0.15, 0.7) * depth
            r = 0.06 * rx + 0.5
            draw.ellipse((x - r, y - r, x + r, y + r), fill=accent)


def _photograph(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Camera effects: exposure, a lighting gradient across the frame and sensor noise."""
    pixels = np.asarray(image, dtype=np.float32)
    height, width = pixels.shape[:2]
    angle = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(0.0, 0.35)
    ys = (np.arange(height, dtype=np.float32) / height - 0.5)[:, None]
    xs = (np.arange(width, dtype=np.float32) / width - 0.5)[None, :]
    light = (1.0 + strength * (xs * math.cos(angle) + ys * math.sin(angle))) * rng.uniform(0.9, 1.08)
    pixels *= light[:, :, None]
    spread = int(rng.integers(3, 12))  # uniform noise: as good as Gaussian here and 5x cheaper to draw
    pixels += rng.integers(-spread, spread + 1, pixels.shape, dtype=np.int16)
    pixels += 0.5
    np.clip(pixels, 0, 255, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8))
