"""Device augmentation: batched tensor steps with the loader path's (albumentations) semantics.

The two placements draw different random numbers, so they are compared in distribution, not pixel for
pixel: each step alone is run by both on the same batch of a few hundred small synthetic images and the
statistics that characterise the step (fraction changed, brightness / contrast / saturation / hue
ratios, zeroed fraction, black border, recovered affine parameters) are compared with a two-sample
Kolmogorov-Smirnov distance. ``test_statistics_catch_wrong_ranges`` shows the comparison has teeth: the
same checks fail for a device step whose range is twice too wide or too narrow.
"""

from __future__ import annotations

import os
from dataclasses import replace

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from trainers.device_augment import (  # noqa: E402
    DEVICE_AUGMENTATIONS,
    Affine,
    CoarseDropout,
    ColorJitter,
    DeviceAugment,
    HorizontalFlip,
    affine_theta,
    warp_affine,
)
from trainers.registry import UnknownName  # noqa: E402
from trainers.transforms import AUGMENTATIONS, augment_batch, normalize_batch, train_pipeline  # noqa: E402

N_COLOUR = 1000  # colour images (32 x 24) per distribution comparison: jitter and dropout, hflip
N_PROBE = 500  # probe images (48 x 40) per distribution comparison: the affine step


# ---------------------------------------------------------------------------------------------- images


def colour_images(n: int, h: int = 32, w: int = 24, seed: int = 0) -> np.ndarray:
    """Colourful gradients with one flat block each; values in [40, 215] (no zeros, little clipping).

    The three channels' base levels are spread apart, so every image has coloured pixels (a hue).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        base = rng.permutation([80.0, 125.0, 170.0]) + rng.uniform(-10, 10, 3)
        gx, gy = rng.uniform(-50, 50, 3), rng.uniform(-50, 50, 3)
        img = base + gx * (xx[..., None] / w - 0.5) + gy * (yy[..., None] / h - 0.5)
        bh, bw = rng.integers(h // 6, h // 3 + 1), rng.integers(w // 6, w // 3 + 1)
        top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        img[top : top + bh, left : left + bw] = rng.uniform(50, 200, 3)
        out[i] = np.clip(img, 40, 215).astype(np.uint8)
    return out


# Where the red, green and blue landmarks of the probe images sit, as fractions of (width, height).
LANDMARKS = ((0.3, 0.3), (0.7, 0.35), (0.45, 0.72))


def probe_images(n: int, h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    """A grey gradient (never black) with three Gaussian landmarks, one per colour channel.

    The landmark centroids locate three points before and after a geometric transform, which recovers
    the affine matrix (so scale, rotation and shift) of each image.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        grey = 70 + rng.uniform(-20, 20) * (xx / w) + rng.uniform(-20, 20) * (yy / h)
        img = np.repeat(grey[..., None], 3, axis=2)
        for channel, (fx, fy) in enumerate(LANDMARKS):
            cx, cy = fx * w + rng.uniform(-2, 2), fy * h + rng.uniform(-2, 2)
            img[..., channel] += 160 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 2.0**2))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


# ------------------------------------------------------------------------------------ the two placements


_LOADER_RESULTS: dict[tuple, np.ndarray] = {}
_LOADER_STATS: dict[tuple, dict[str, np.ndarray]] = {}


def loader_path(name: str, p: float, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """The albumentations reference: the loader's per-image pipeline with only this step (memoised)."""
    key = (name, p, seed, images.shape, images.ctypes.data)
    if key not in _LOADER_RESULTS:
        _LOADER_RESULTS[key] = augment_batch(train_pipeline({name: p}, seed=seed), images)
    return _LOADER_RESULTS[key]


def device_path(name: str, p: float, images: np.ndarray, seed: int = 0, step=None) -> np.ndarray:
    """The device pipeline with only this step (or a replacement ``step`` under that name)."""
    augment = DeviceAugment({name: p}, seed=seed)
    if step is not None:
        augment.steps = [(name, step, p)]
    return augment(torch.from_numpy(images)).numpy()


# ------------------------------------------------------------------------------------------- statistics


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def changed(inp: np.ndarray, out: np.ndarray) -> np.ndarray:
    return (inp != out).reshape(len(inp), -1).any(axis=1)


def hue_degrees(images: np.ndarray) -> np.ndarray:
    return np.stack([cv2.cvtColor(img.astype(np.float32) / 255, cv2.COLOR_RGB2HSV)[..., 0] for img in images])


def grey(images: np.ndarray) -> np.ndarray:
    """ITU-R 601 grey level, as OpenCV's RGB2GRAY (what ColorJitter's contrast and saturation use)."""
    return images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def colour_stats(inp: np.ndarray, out: np.ndarray) -> dict[str, np.ndarray]:
    """Per image ratios out / in that estimate each ColorJitter factor, whatever order they ran in.

    Brightness ``b`` scales grey mean, grey std and chroma (max - min channel); contrast ``c`` scales the
    grey std and chroma about a fixed mean; saturation ``s`` scales chroma only; hue shifts the hue and
    keeps chroma. So (clipping aside) mean ratio ~ b, std ratio ~ b c, std ratio / mean ratio ~ c,
    chroma ratio / std ratio ~ s, and the median hue change of coloured pixels is the hue shift.
    """
    a, b = inp.astype(np.float64), out.astype(np.float64)
    grey_a, grey_b = grey(inp), grey(out)
    mean_ratio = grey_b.mean((1, 2)) / grey_a.mean((1, 2))
    std_ratio = grey_b.std((1, 2)) / grey_a.std((1, 2))
    chroma_a, chroma_b = a.max(-1) - a.min(-1), b.max(-1) - b.min(-1)
    chroma_ratio = chroma_b.mean((1, 2)) / chroma_a.mean((1, 2))
    shift = (hue_degrees(out) - hue_degrees(inp) + 180) % 360 - 180
    coloured = chroma_a > 30
    return {
        "mean_ratio": mean_ratio,
        "std_ratio": std_ratio,
        "contrast": std_ratio / mean_ratio,
        "saturation": chroma_ratio / std_ratio,
        "hue_shift": np.nanmedian(np.where(coloured, shift, np.nan), axis=(1, 2)),
    }


def dropout_stats(inp: np.ndarray, out: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: the fraction of pixels zeroed (the inputs have none)."""
    return {"zeroed": (out.max(-1) == 0).mean((1, 2))}


def landmarks(images: np.ndarray) -> np.ndarray:
    """(N, 3, 2) centroids (x, y) of the red, green and blue landmarks."""
    x = images.astype(np.float32)
    h, w = x.shape[1:3]
    rows, cols = np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)
    points = []
    for channel in range(3):
        others = np.maximum(x[..., (channel + 1) % 3], x[..., (channel + 2) % 3])
        weight = np.clip(x[..., channel] - others - 20, 0, None)
        total = weight.sum((1, 2)) + 1e-9
        points.append(np.stack([weight.sum(1) @ cols / total, weight.sum(2) @ rows / total], -1))
    return np.stack(points, axis=1).astype(np.float64)


def affine_stats(inp: np.ndarray, out: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: black-border fraction, content centroid shift, and the affine recovered from landmarks.

    Albumentations maps ``s`` to ``t + R S (s - c) + c`` with ``R = [[cos, sin], [-sin, cos]]``; three
    landmark pairs give ``R S`` and ``t`` exactly, hence the x/y scales, the angle and the shift.
    """
    h, w = inp.shape[1:3]
    centre = np.array([w / 2 - 0.5, h / 2 - 0.5])
    src, dst = landmarks(inp) - centre, landmarks(out) - centre
    ones = np.ones((len(inp), 3, 1))
    # dst = [src 1] @ [[A^T], [t]]: solve per image.
    solution = np.linalg.solve(np.concatenate([src, ones], -1), dst)  # (N, 3, 2)
    matrix, shift = solution[:, :2].transpose(0, 2, 1), solution[:, 2]
    return {
        "border": (out.max(-1) < 10).mean((1, 2)),
        "centroid_dx": dst.mean(1)[:, 0] - src.mean(1)[:, 0],
        "centroid_dy": dst.mean(1)[:, 1] - src.mean(1)[:, 1],
        "scale_x": np.hypot(matrix[:, 0, 0], matrix[:, 1, 0]),
        "scale_y": np.hypot(matrix[:, 0, 1], matrix[:, 1, 1]),
        "angle": np.degrees(np.arctan2(-matrix[:, 1, 0], matrix[:, 0, 0])),
        "shift_x": shift[:, 0],
        "shift_y": shift[:, 1],
    }


def ks_limit(n_a: int, n_b: int) -> float:
    """KS distances above this mean "different distributions".

    The first term is the 99.9 % critical value for two samples of one distribution (0.087 for 1000
    against 1000, 0.12 for 500 against 500); the 0.03 leaves room for the documented small systematic
    differences (uint8 truncation inside albumentations, OpenCV's fixed-point warp). A range off by 2x
    moves the distance of the statistic it governs to about 0.16-0.5.
    """
    return 1.95 * np.sqrt((n_a + n_b) / (n_a * n_b)) + 0.03


def mismatches(step: str, p: float, images: np.ndarray, device_step=None) -> list[str]:
    """What differs between the device step (or ``device_step``) and the loader step; [] if nothing."""
    ref = loader_path(step, p, images, seed=1)
    dev = device_path(step, p, images, seed=2, step=device_step)
    problems = []
    frac_ref, frac_dev = changed(images, ref).mean(), changed(images, dev).mean()
    if abs(frac_dev - p) > 0.07 or abs(frac_dev - frac_ref) > 0.1:
        problems.append(f"fraction changed: device {frac_dev:.3f}, loader {frac_ref:.3f}, p {p}")
    stats = {
        "shift_scale_rotate": affine_stats,
        "color_jitter": colour_stats,
        "coarse_dropout": dropout_stats,
    }
    if step == "hflip":
        flipped = images[:, :, ::-1]
        same_ref = (ref == flipped).reshape(len(images), -1).all(1).mean()
        same_dev = (dev == flipped).reshape(len(images), -1).all(1).mean()
        if abs(same_dev - p) > 0.07 or abs(same_dev - same_ref) > 0.1:
            problems.append(f"fraction flipped: device {same_dev:.3f}, loader {same_ref:.3f}, p {p}")
        return problems
    memo = (step, p, images.shape, images.ctypes.data)
    if memo not in _LOADER_STATS:
        _LOADER_STATS[memo] = stats[step](images, ref)
    stats_ref, stats_dev = _LOADER_STATS[memo], stats[step](images, dev)
    for key in stats_ref:
        a, b = stats_ref[key], stats_dev[key]
        if key == "hue_shift":
            # OpenCV's 8-bit HSV (hue in 2-degree steps, truncated) makes albumentations' hue shift
            # discrete and about 1 degree low on average, so compare mean and standard deviation.
            if abs(a.mean() - b.mean()) > 2.0 or not 0.8 < b.std() / a.std() < 1.25:
                problems.append(
                    f"{key}: mean {b.mean():.2f} vs {a.mean():.2f}, std {b.std():.2f} vs {a.std():.2f}"
                )
            continue
        distance = ks_distance(a, b)
        if distance > ks_limit(len(a), len(b)):
            problems.append(
                f"{key}: KS {distance:.3f}; device quantiles {np.quantile(b, [0.1, 0.5, 0.9]).round(3)}, "
                f"loader {np.quantile(a, [0.1, 0.5, 0.9]).round(3)}"
            )
    return problems


# ------------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These tensors are tiny: intra-op threads only add overhead (a lot of it on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def colours() -> np.ndarray:
    return colour_images(N_COLOUR, seed=3)


@pytest.fixture(scope="module")
def probes() -> np.ndarray:
    return probe_images(N_PROBE, seed=4)


def test_registries_have_the_same_names_in_the_same_order():
    assert DEVICE_AUGMENTATIONS.names() == AUGMENTATIONS.names()


def test_device_ranges_are_the_albumentations_ranges():
    """The parameter ranges are read back from the albumentations transforms the loader builds."""
    affine = AUGMENTATIONS.get("shift_scale_rotate")(1.0)
    device_affine = DEVICE_AUGMENTATIONS.get("shift_scale_rotate")
    assert affine.scale == {"x": device_affine.scale, "y": device_affine.scale}
    assert affine.translate_percent == {"x": device_affine.translate, "y": device_affine.translate}
    assert tuple(affine.rotate) == device_affine.rotate
    assert affine.border_mode == 0 and not affine.keep_ratio and affine.interpolation == cv2.INTER_LINEAR
    jitter, device_jitter = AUGMENTATIONS.get("color_jitter")(1.0), DEVICE_AUGMENTATIONS.get("color_jitter")
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert tuple(getattr(jitter, name)) == pytest.approx(getattr(device_jitter, name)), name
    dropout, device_dropout = (
        AUGMENTATIONS.get("coarse_dropout")(1.0),
        DEVICE_AUGMENTATIONS.get("coarse_dropout"),
    )
    assert tuple(dropout.num_holes_range) == device_dropout.num_holes
    assert tuple(dropout.hole_height_range) == device_dropout.hole_height
    assert tuple(dropout.hole_width_range) == device_dropout.hole_width
    assert dropout.fill == 0


def test_unknown_names_are_rejected():
    with pytest.raises(UnknownName, match="blur"):
        DeviceAugment({"hflip": 0.5, "blur": 0.5})
    with pytest.raises(UnknownName):
        DEVICE_AUGMENTATIONS.check(["nope"])
    with pytest.raises(ValueError, match="probability"):
        DeviceAugment({"hflip": 1.5})


def test_shape_dtype_device_preserved_and_rejects_non_uint8(colours):
    batch = torch.from_numpy(colours[:16])
    augment = DeviceAugment(dict.fromkeys(DEVICE_AUGMENTATIONS.names(), 1.0), seed=0)
    out = augment(batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8 and out.device == batch.device
    assert out.is_contiguous()
    assert normalize_batch(out, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)).shape == (16, 3, 32, 24)
    with pytest.raises(ValueError, match="uint8 NHWC"):
        augment(batch.float())
    with pytest.raises(ValueError, match="uint8 NHWC"):
        augment(batch.permute(0, 3, 1, 2).contiguous())


def test_probability_zero_is_the_identity(colours):
    batch = torch.from_numpy(colours[:32])
    for augment in (
        DeviceAugment(dict.fromkeys(DEVICE_AUGMENTATIONS.names(), 0.0), seed=0),
        DeviceAugment({}),
    ):
        assert augment.steps == []
        assert torch.equal(augment(batch), batch)


def test_same_seed_same_output_different_seed_different(colours):
    batch = torch.from_numpy(colours[:64])
    config = dict.fromkeys(DEVICE_AUGMENTATIONS.names(), 0.5)
    first, again = DeviceAugment(config, seed=7), DeviceAugment(config, seed=7)
    out = first(batch)
    assert torch.equal(out, again(batch))
    assert not torch.equal(out, DeviceAugment(config, seed=8)(batch))
    # The stream moves on from call to call; reseed restarts it (the trainer reseeds per fold and epoch).
    assert not torch.equal(first(batch), out)
    first.reseed(7)
    assert torch.equal(first(batch), out)
    assert torch.equal(batch, torch.from_numpy(colours[:64]))  # the input is not modified


def test_hflip_p1_is_torch_flip(colours):
    batch = torch.from_numpy(colours[:32])
    assert torch.equal(DeviceAugment({"hflip": 1.0})(batch), torch.flip(batch, dims=[2]))


def test_steps_apply_in_registry_order(colours):
    """Registry order (hflip, then dropout) whatever the order of the config mapping."""
    batch = torch.from_numpy(colours[:32])
    augment = DeviceAugment({"coarse_dropout": 1.0, "hflip": 1.0}, seed=5)
    assert [name for name, _, _ in augment.steps] == ["hflip", "coarse_dropout"]
    x = batch.permute(0, 3, 1, 2).float()
    gen = torch.Generator().manual_seed(5)
    flip_then_drop = CoarseDropout()(HorizontalFlip()(x, 1.0, gen), 1.0, gen)
    gen = torch.Generator().manual_seed(5)
    drop_then_flip = HorizontalFlip()(CoarseDropout()(x, 1.0, gen), 1.0, gen)
    as_nhwc = lambda t: t.round().byte().permute(0, 2, 3, 1)  # noqa: E731
    out = augment(batch)
    assert torch.equal(out, as_nhwc(flip_then_drop))
    assert not torch.equal(out, as_nhwc(drop_then_flip))


def test_affine_matrix_matches_albumentations_warp(probes):
    """With given parameters the device warp is albumentations' matrix and OpenCV's warp, to a grey level."""
    from albumentations.augmentations.geometric import functional as fgeometric

    img = probes[0]
    h, w = img.shape[:2]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    for sx, sy, angle, tx, ty in [
        (1.08, 0.92, 8.0, 1, -2),
        (0.92, 1.05, -7.0, -1, 2),
        (1.0, 1.0, 30.0, 0, 0),
    ]:
        matrix = fgeometric.create_affine_transformation_matrix(
            {"x": tx, "y": ty}, {"x": 0, "y": 0}, {"x": sx, "y": sy}, angle, fgeometric.center((h, w))
        )
        expected = cv2.warpAffine(
            img, matrix[:2], (w, h), flags=cv2.INTER_LINEAR, borderMode=0, borderValue=0
        )
        theta = affine_theta(h, w, *(torch.tensor([float(v)]) for v in (sx, sy, angle, tx, ty)))
        got = warp_affine(x, theta).round().clamp(0, 255).byte()[0].permute(1, 2, 0).numpy()
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_stays_on_cuda_and_is_seeded(colours):
    batch = torch.from_numpy(colours[:64]).cuda()
    config = dict.fromkeys(DEVICE_AUGMENTATIONS.names(), 0.5)
    augment = DeviceAugment(config, seed=3)
    out = augment(batch)
    assert out.device == batch.device and out.dtype == torch.uint8 and out.shape == batch.shape
    assert torch.equal(out, DeviceAugment(config, seed=3)(batch))
    assert not torch.equal(out, batch)
    assert torch.equal(DeviceAugment({"hflip": 1.0})(batch), batch.flip(2))


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_hflip_distribution_matches_loader(colours, p):
    assert mismatches("hflip", p, colours) == []


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_affine_distribution_matches_loader(probes, p):
    assert mismatches("shift_scale_rotate", p, probes) == []


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_color_jitter_distribution_matches_loader(colours, p):
    assert mismatches("color_jitter", p, colours) == []


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_coarse_dropout_distribution_matches_loader(colours, p):
    assert mismatches("coarse_dropout", p, colours) == []


def _flip_vertically(x, p, gen):
    chosen = torch.rand(x.shape[0], generator=gen, device=x.device) < p
    return torch.where(chosen.view(-1, 1, 1, 1), x.flip(2), x)


BROKEN = {
    "hflip upside down": ("hflip", _flip_vertically),
    "hflip at half the probability": ("hflip", lambda x, p, gen: HorizontalFlip()(x, p / 2, gen)),
    "jitter at half the probability": ("color_jitter", lambda x, p, gen: ColorJitter()(x, p / 2, gen)),
    "scale 2x wide": ("shift_scale_rotate", replace(Affine(), scale=(0.84, 1.16))),
    "scale 2x narrow": ("shift_scale_rotate", replace(Affine(), scale=(0.96, 1.04))),
    "rotate 2x wide": ("shift_scale_rotate", replace(Affine(), rotate=(-16.0, 16.0))),
    "rotate 2x narrow": ("shift_scale_rotate", replace(Affine(), rotate=(-4.0, 4.0))),
    "translate 2x wide": ("shift_scale_rotate", replace(Affine(), translate=(-0.1, 0.1))),
    "translate 2x narrow": ("shift_scale_rotate", replace(Affine(), translate=(-0.025, 0.025))),
    "brightness 2x wide": ("color_jitter", replace(ColorJitter(), brightness=(0.6, 1.4))),
    "brightness 2x narrow": ("color_jitter", replace(ColorJitter(), brightness=(0.9, 1.1))),
    "contrast 2x wide": ("color_jitter", replace(ColorJitter(), contrast=(0.6, 1.4))),
    "contrast 2x narrow": ("color_jitter", replace(ColorJitter(), contrast=(0.9, 1.1))),
    "saturation 2x wide": ("color_jitter", replace(ColorJitter(), saturation=(0.6, 1.4))),
    "saturation 2x narrow": ("color_jitter", replace(ColorJitter(), saturation=(0.9, 1.1))),
    "hue 2x wide": ("color_jitter", replace(ColorJitter(), hue=(-0.04, 0.04))),
    "hue 2x narrow": ("color_jitter", replace(ColorJitter(), hue=(-0.01, 0.01))),
    "holes 2x many": ("coarse_dropout", replace(CoarseDropout(), num_holes=(1, 8))),
    "holes 2x few": ("coarse_dropout", replace(CoarseDropout(), num_holes=(1, 2))),
    "hole height 2x": ("coarse_dropout", replace(CoarseDropout(), hole_height=(0.1, 0.3))),
    "hole height 0.5x": ("coarse_dropout", replace(CoarseDropout(), hole_height=(0.025, 0.075))),
    "hole width 2x": ("coarse_dropout", replace(CoarseDropout(), hole_width=(0.1, 0.3))),
    "hole width 0.5x": ("coarse_dropout", replace(CoarseDropout(), hole_width=(0.025, 0.075))),
}


@pytest.mark.parametrize("breakage", list(BROKEN))
def test_statistics_catch_wrong_ranges(colours, probes, breakage):
    """The distribution checks above would fail for a device step with a range off by 2x either way."""
    step, broken = BROKEN[breakage]
    images = probes if step == "shift_scale_rotate" else colours
    assert mismatches(step, 1.0, images, device_step=broken) != []
