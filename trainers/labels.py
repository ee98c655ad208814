"""The 18-class encoding, in one place: class = mask * 6 + gender * 3 + age_band.

Every other module encodes and decodes labels through here, so the competition's class map has a single
source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_CLASSES = 18
NUM_MASK, NUM_GENDER, NUM_AGE = 3, 2, 3

MASK_NAMES = ("wear", "incorrect", "not_wear")
GENDER_NAMES = ("male", "female")
GENDER_CODES = {"male": 0, "female": 1}

# image file stem -> mask state (0 wear, 1 incorrect, 2 not wear)
MASK_STEMS: dict[str, int] = {
    "mask1": 0,
    "mask2": 0,
    "mask3": 0,
    "mask4": 0,
    "mask5": 0,
    "incorrect_mask": 1,
    "normal": 2,
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class AgeBands:
    """Age band edges: with edges (30, 60) the bands are <30, 30-59 and >=60."""

    edges: tuple[int, int] = (30, 60)

    def __post_init__(self) -> None:
        if len(self.edges) != NUM_AGE - 1 or not self.edges[0] < self.edges[1]:
            raise ValueError(f"age band edges must be two increasing ages, got {self.edges!r}")

    def band(self, age):
        """Band index (0, 1, 2) for an age or an array of ages."""
        result = np.searchsorted(np.asarray(self.edges), np.asarray(age), side="right")
        return int(result) if np.ndim(result) == 0 else result

    @property
    def names(self) -> tuple[str, str, str]:
        low, high = self.edges
        return (f"<{low}", f"{low}-{high - 1}", f">={high}")


def encode(mask, gender, age_band):
    """Class index from (mask, gender, age band); works on ints and numpy arrays."""
    return (
        np.asarray(mask) * 6 + np.asarray(gender) * 3 + np.asarray(age_band)
        if np.ndim(mask)
        else (int(mask) * 6 + int(gender) * 3 + int(age_band))
    )


def decode(label):
    """(mask, gender, age band) from a class index or an array of them."""
    label = np.asarray(label) if np.ndim(label) else int(label)
    return label // 6, (label // 3) % 2, label % 3


def class_names(bands: AgeBands = AgeBands()) -> list[str]:
    """Readable names of the 18 classes in class-index order, e.g. 'wear/male/<30'."""
    return [
        f"{MASK_NAMES[m]}/{GENDER_NAMES[g]}/{bands.names[a]}"
        for m in range(NUM_MASK)
        for g in range(NUM_GENDER)
        for a in range(NUM_AGE)
    ]
