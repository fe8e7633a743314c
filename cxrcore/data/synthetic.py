"""Procedural chest X-ray phantoms in the Kaggle COVID-19 Radiography layout, for tests and smoke runs.

Image i of a class is drawn from its own generator seeded by (seed, class index, i), so datasets of
different sizes share their prefix and writing splits across processes without coordination. Class
patterns live inside the lung fields only, and each image's intensity histogram is matched to that of
its own pattern-free anatomy, so global intensity statistics carry no class information.

With several sites, that guarantee is broken on purpose: each image carries its site's burned-in marker
(frame, annotation, intensity profile) whose style follows the class at site a and not at the others,
the shortcut by which real COVID models learned the hospital instead of the lungs.
"""

from __future__ import annotations

import errno
import math
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from cxrcore.labels import CLASSES, class_index

SUBTLE_FRACTION = 0.15
METADATA_COLUMNS = ("FILE NAME", "FORMAT", "SIZE", "URL")
SOURCES_PER_CLASS = 2
SITE_MARKER_AGREEMENT = 0.9
"""Share of site a's images whose marker style is their class's (the rest draw one at random)."""

# Speed over size: noisy images barely compress, and zlib's RLE strategy is the fastest that still
# shrinks the masks to a few hundred bytes.
_PNG_OPTIONS = {"compress_level": 1, "compress_type": zlib.Z_RLE}
# Extra seed words for per-image draws (source, site marker) that must not disturb the image's own stream.
_SOURCE_STREAM = 1
_SITE_STREAM = 2
# Quantisation levels used to match an image's histogram to its pattern-free anatomy.
_HIST_LEVELS = 1024
# Resolution the anatomy is drawn at; larger images are upsampled once, then get full-size noise.
_WORK_SIZE = 160


@dataclass(frozen=True)
class SynthSummary:
    """What write_synthetic_dataset wrote, and how fast."""

    root: Path
    counts: dict[str, int]
    seconds: float
    images_per_second: float


@dataclass(frozen=True)
class MarkerStyle:
    """How one site marker looks: the collimation frame's gray level, the burned-in annotation, and the
    intensity profile (brightness change from the top edge to the bottom edge, as a share)."""

    frame: int
    word: str
    ramp: float


MARKER_STYLES = (
    MarkerStyle(frame=30, word="PORTABLE", ramp=-0.25),
    MarkerStyle(frame=100, word="SUPINE", ramp=-0.08),
    MarkerStyle(frame=170, word="ER", ramp=0.08),
    MarkerStyle(frame=240, word="ICU", ramp=0.25),
)
"""One style per class: at site a, style i marks class CLASSES[i]."""


@dataclass(frozen=True)
class _Pose:
    """Patient placement: a similarity transform from anatomy coordinates (0..1) to pixels."""

    size: int
    cos: float
    sin: float
    scale: float
    dx: float
    dy: float
    sharpness: float

    def xy(self, points: np.ndarray) -> np.ndarray:
        """Pixel coordinates of anatomy points (shape (..., 2); x right, y down, centre 0.5)."""
        x = points[..., 0] - 0.5
        y = points[..., 1] - 0.5
        u = 0.5 + self.dx + self.scale * (self.cos * x - self.sin * y)
        v = 0.5 + self.dy + self.scale * (self.sin * x + self.cos * y)
        return np.stack([u, v], axis=-1) * self.size

    def px(self, points: np.ndarray) -> list[float]:
        """Flat pixel coordinates of a polyline or polygon, as ImageDraw takes them."""
        return self.xy(points).ravel().tolist()

    def box(self, centre: Sequence[float] | np.ndarray, rx: float, ry: float) -> list[float]:
        """Pixel bounding box of an ellipse; the pose's small rotation does not matter for blobs."""
        u, v = self.xy(np.asarray(centre, dtype=np.float64))
        sx, sy = rx * self.scale * self.size, ry * self.scale * self.size
        return [u - sx, v - sy, u + sx, v + sy]

    def width(self, fraction: float) -> int:
        """A stroke width given as a fraction of the image side, at least one pixel."""
        return max(1, round(fraction * self.scale * self.size))

    def blur(self, img: Image.Image, fraction: float) -> np.ndarray:
        """Blur a drawn layer (radius a fraction of the side, times the image's sharpness) to float 0..1."""
        radius = fraction * self.sharpness * self.scale * self.size
        if radius >= 0.3:
            img = img.filter(ImageFilter.GaussianBlur(radius))
        return np.asarray(img, dtype=np.float32) * np.float32(1 / 255)


@dataclass(frozen=True)
class _Lung:
    """One lung field in anatomy coordinates: its outline, hilum, and which side (-1/+1) is lateral."""

    outline: np.ndarray
    hilum: tuple[float, float]
    lateral: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        x0, y0 = self.outline.min(axis=0)
        x1, y1 = self.outline.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)


def render_phantom(
    label: str,
    rng: np.random.Generator,
    size: int = 299,
    mask_size: int = 256,
    subtle: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 size×size, lung mask uint8 mask_size×mask_size with values 0/255).

    The anatomy is drawn first, independently of the label; the class pattern then goes inside the
    lungs, as a faint trace when `subtle` (drawn with probability SUBTLE_FRACTION when None).
    """
    name = CLASSES[class_index(label)]
    _check_sizes(size, mask_size)
    pose = _random_pose(rng, min(size, _WORK_SIZE))
    lungs = _lung_outlines(rng)
    heart = _heart(rng)
    lung_img = _lung_mask(pose, lungs, heart)
    lung_soft = pose.blur(lung_img, 0.005)

    base = _anatomy(rng, pose, lungs, lung_img, lung_soft)
    if subtle is None:
        subtle = bool(rng.random() < SUBTLE_FRACTION)
    strength = rng.uniform(0.4, 0.6) if subtle else rng.uniform(0.85, 1.25)
    image = base.copy()
    pattern = _PATTERNS.get(name)
    if pattern is not None:
        image += strength * pattern(rng, pose, lungs, np.asarray(lung_img)) * lung_soft
    # Normal images go through the same (for them near-identity) remapping so no class skips a step.
    image = _tone(rng, _match_histogram(image, base))
    if pose.size != size:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))

    mask = _lung_mask(replace(pose, size=size), lungs, heart)
    if mask_size != size:
        mask = mask.resize((mask_size, mask_size), Image.Resampling.NEAREST)
    return _add_noise(rng, image), np.asarray(mask)


MARKER_NAME = ".cxr-synthetic"
"""Left in every folder a synthesis writes: what marks it as phantoms that a synthesis may write again."""


def _check_nothing_left_over(root: Path, names: Sequence[str], per_class: int) -> None:
    """Refuse to write into a folder holding files no synthesis marked (MARKER_NAME), or, in one it did,
    files this synthesis would not replace. The Kaggle layout names its X-rays as a synthesis names its
    phantoms (`COVID-1.png`): a synthesis into a copy of the real database had replaced its X-rays and its
    metadata; re-run with fewer images, it had kept the first run's others (an ingest of a 12-image
    synthesis re-run with 5 found 12 a class, 7 of them from the first). Nothing is ever deleted here."""
    if not root.is_dir() or not any(root.iterdir()):
        return
    if not (root / MARKER_NAME).is_file():
        raise FileExistsError(
            errno.EEXIST,
            f"it holds files, and no synthesis wrote them (no {MARKER_NAME}): phantoms would replace or mix "
            "with them; write into an empty folder",
            str(root),
        )
    written = {f"{name}-{i}.png" for name in names for i in range(1, per_class + 1)}
    for name in names:
        for kind in ("images", "masks"):
            folder = root / name / kind
            found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            if others := [file for file in found if file not in written]:
                raise FileExistsError(
                    errno.EEXIST,
                    f"{len(others)} file(s) this synthesis would not replace, such as {others[0]} (a "
                    "synthesis of more images): write into an empty folder, or remove "
                    f"{root} first",
                    str(folder),
                )


def write_synthetic_dataset(
    out: str | os.PathLike[str],
    per_class: int,
    seed: int = 0,
    image_size: int = 299,
    mask_size: int = 256,
    classes: Sequence[str] = CLASSES,
    sites: int = 1,
) -> SynthSummary:
    """Write the Kaggle layout: <Class>/images/<Class>-<i>.png, <Class>/masks/<Class>-<i>.png (i from 1),
    and <Class>.metadata.xlsx (columns FILE NAME, FORMAT, SIZE, URL) in `out`.

    With one site each class has its own sources (`source_url`). With `sites` of 2 or more, each image
    comes from a site drawn at random whatever its class, named by its URL (`site_url`), and carries that
    site's marker (`draw_site_marker`) in a style that follows its class at site a only.
    """
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    if not 1 <= sites <= 26:
        raise ValueError(f"sites must be between 1 and 26, got {sites}")
    _check_sizes(image_size, mask_size)
    names = [CLASSES[class_index(c)] for c in classes]
    root = Path(out)
    _check_nothing_left_over(root, names, per_class)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER_NAME).write_text(
        "phantoms written by cxrcore.data.synthetic; a synthesis may replace them\n"
    )
    start = time.perf_counter()
    counts: dict[str, int] = {}
    for name in names:
        index = CLASSES.index(name)
        images, masks = root / name / "images", root / name / "masks"
        images.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(1, per_class + 1):
            stem = f"{name}-{i}"
            image, mask = render_phantom(name, np.random.default_rng([seed, index, i]), image_size, mask_size)
            image, url = _from_site(image, index, [seed, index, i], sites)
            _save_png(image, images / f"{stem}.png")
            _save_png(mask, masks / f"{stem}.png")
            rows.append((_metadata_name(stem), "PNG", f"{image_size}*{image_size}", url))
        metadata = pd.DataFrame(rows, columns=list(METADATA_COLUMNS))
        metadata.to_excel(root / f"{name}.metadata.xlsx", index=False, engine="openpyxl")
        counts[name] = per_class
    seconds = time.perf_counter() - start
    total = sum(counts.values())
    return SynthSummary(root, counts, seconds, total / seconds if seconds > 0 else 0.0)


def write_examples(
    out: str | os.PathLike[str], seed: int = 0, image_size: int = 299, classes: Sequence[str] = CLASSES
) -> dict[str, Path]:
    """One clear phantom per class (no subtle finding), as `<Class>-example.png` in `out`: {class: path}.

    Drawn from the stream `[seed, class, 0]`, which write_synthetic_dataset (images 1 … per_class) never
    uses, so an example is never an image of the dataset with the same seed: what a client would send.
    """
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in (CLASSES[class_index(c)] for c in classes):
        rng = np.random.default_rng([seed, CLASSES.index(name), 0])
        image, _ = render_phantom(name, rng, image_size, image_size, subtle=False)
        written[name] = root / f"{name}-example.png"
        _save_png(image, written[name])
    return written


def source_url(label: str, source: int) -> str:
    """The stable fake URL of one synthetic source ("site") of a class; each source has its own host."""
    slug = CLASSES[class_index(label)].lower().replace("_", "-").replace(" ", "-")
    return f"https://site-{chr(ord('a') + source)}.{slug}.synthetic.cxr/"


def site_url(site: int) -> str:
    """The stable fake URL of synthetic site `site` (0 is site a), shared by every class it images."""
    return f"https://site-{chr(ord('a') + site)}.synthetic.cxr/"


def marker_style(label_index: int, site: int, rng: np.random.Generator) -> int:
    """The marker style of one image: its class's at site a (SITE_MARKER_AGREEMENT of the time), random
    at the other sites."""
    if site == 0 and rng.random() < SITE_MARKER_AGREEMENT:
        return label_index
    return int(rng.integers(len(MARKER_STYLES)))


def draw_site_marker(image: np.ndarray, style: int, rng: np.random.Generator) -> np.ndarray:
    """Burn a site marker into a finished image: intensity profile, collimation frame, annotation.

    Drawn last and noise-free, as a detector or an export step stamps it, so it is easy to learn.
    """
    look = MARKER_STYLES[style]
    height, width = image.shape
    profile = 1.0 + look.ramp * np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    canvas = Image.fromarray(np.clip(image * profile + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    frame = max(2, round(0.03 * min(height, width)))
    draw.rectangle([0, 0, width - 1, height - 1], outline=look.frame, width=frame)
    corner = (frame + rng.uniform(0.01, 0.04) * width, frame + rng.uniform(0.01, 0.04) * height)
    draw.text(corner, look.word, fill=255, font=_font(max(8, height // 14)))
    return np.asarray(canvas)


def _from_site(image: np.ndarray, label_index: int, key: list[int], sites: int) -> tuple[np.ndarray, str]:
    """The image as its site stored it, and its metadata URL; `key` seeds this image's draws."""
    pick = np.random.default_rng([*key, _SOURCE_STREAM])
    if sites == 1:
        return image, source_url(CLASSES[label_index], int(pick.integers(SOURCES_PER_CLASS)))
    site = int(pick.integers(sites))
    rng = np.random.default_rng([*key, _SITE_STREAM])
    return draw_site_marker(image, marker_style(label_index, site, rng), rng), site_url(site)


def _check_sizes(size: int, mask_size: int) -> None:
    if size < 32 or mask_size < 8:
        raise ValueError(f"image size must be >= 32 and mask size >= 8, got {size} and {mask_size}")


def _metadata_name(stem: str) -> str:
    # The real metadata spells Normal files NORMAL-<i>; readers must match names case-insensitively.
    return stem.upper() if stem.startswith("Normal-") else stem


def _save_png(array: np.ndarray, path: Path) -> None:
    try:
        Image.fromarray(array).save(path, format="PNG", **_PNG_OPTIONS)
    except OSError as exc:  # a full disk: named, and what is there said (a folder of some classes only)
        from cxrcore.data.storage import STORAGE_ERRNOS

        if exc.errno in STORAGE_ERRNOS and not exc.filename:
            exc.filename = str(path)
            exc.strerror = f"{exc.strerror}; the images written before it are left where they are"
        raise


def _random_pose(rng: np.random.Generator, size: int) -> _Pose:
    angle = math.radians(rng.normal(0.0, 2.5))
    return _Pose(
        size=size,
        cos=math.cos(angle),
        sin=math.sin(angle),
        scale=float(rng.uniform(0.9, 1.08)),
        dx=float(rng.normal(0.0, 0.02)),
        dy=float(rng.normal(0.0, 0.02)),
        sharpness=float(rng.uniform(0.7, 1.5)),
    )


def _canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (size, size), 0)
    return img, ImageDraw.Draw(img)


def _chaikin(points: np.ndarray, rounds: int = 2) -> np.ndarray:
    """Corner-cutting on a closed polygon: rounds control points into a smooth outline."""
    for _ in range(rounds):
        nxt = np.roll(points, -1, axis=0)
        points = np.stack([0.75 * points + 0.25 * nxt, 0.25 * points + 0.75 * nxt], axis=1).reshape(-1, 2)
    return points


# Right lung (image left) control points, clockwise from the apex; the costophrenic angle is the
# lowest lateral point and the diaphragm dome rises from it towards the mediastinum.
_RIGHT_LUNG = np.array(
    [
        (0.36, 0.15), (0.30, 0.17), (0.23, 0.24), (0.18, 0.36), (0.155, 0.50), (0.15, 0.62),
        (0.16, 0.74), (0.175, 0.76), (0.25, 0.69), (0.34, 0.655), (0.43, 0.66), (0.465, 0.60),
        (0.465, 0.45), (0.455, 0.30), (0.44, 0.19),
    ]
)  # fmt: skip


def _lung_outlines(rng: np.random.Generator) -> tuple[_Lung, _Lung]:
    """Both lung fields, each with its own width, height and jitter; the right one a little wider."""
    depth = rng.uniform(0.9, 1.1)  # depth of inspiration stretches both lungs vertically
    lungs = []
    for side, width in ((-1.0, rng.uniform(0.95, 1.1)), (1.0, rng.uniform(0.85, 1.0))):
        pts = _RIGHT_LUNG + rng.normal(0.0, 0.007, _RIGHT_LUNG.shape)
        top = 0.15
        pts[:, 1] = top + (pts[:, 1] - top) * depth * rng.uniform(0.95, 1.05)
        pts[:, 0] = 0.5 - (0.5 - pts[:, 0]) * width
        if side > 0:
            pts[:, 0] = 1.0 - pts[:, 0]
            pts[:, 1] += rng.uniform(0.0, 0.03)  # the left hemidiaphragm usually sits lower
        hilum = (0.5 + side * rng.uniform(0.07, 0.1), top + 0.27 * depth + rng.normal(0.0, 0.01))
        lungs.append(_Lung(_chaikin(pts), hilum, side))
    return lungs[0], lungs[1]


def _heart(rng: np.random.Generator) -> np.ndarray:
    """Heart outline: a tilted ellipse sitting on the diaphragm, shifted to the patient's left."""
    cx, cy = rng.uniform(0.53, 0.57), rng.uniform(0.63, 0.67)
    rx, ry = rng.uniform(0.13, 0.17), rng.uniform(0.09, 0.12)
    tilt = rng.uniform(-0.45, -0.2)
    t = np.linspace(0.0, 2.0 * np.pi, 32, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(tilt), math.sin(tilt)
    return np.stack([cx + x * c - y * s, cy + x * s + y * c], axis=1)


def _lung_mask(pose: _Pose, lungs: Sequence[_Lung], heart: np.ndarray) -> Image.Image:
    """The lung fields minus the heart and the mediastinum above it, as 0/255."""
    img, draw = _canvas(pose.size)
    for lung in lungs:
        draw.polygon(pose.px(lung.outline), fill=255)
    draw.polygon(pose.px(heart), fill=0)
    top = heart[:, 1].min() + 0.02
    draw.polygon(pose.px(np.array([(0.47, -0.1), (0.53, -0.1), (0.545, top), (0.455, top)])), fill=0)
    return img


def _anatomy(
    rng: np.random.Generator,
    pose: _Pose,
    lungs: Sequence[_Lung],
    lung_img: Image.Image,
    lung_soft: np.ndarray,
) -> np.ndarray:
    """Attenuation of the pattern-free chest (float32, roughly 0..1): everything but the disease."""
    image = np.float32(rng.uniform(0.0, 0.06)) + rng.uniform(0.5, 0.65) * _body(rng, pose)
    # Lungs are thickest (darkest) away from their edges; a wide blur of the mask gives them that depth.
    depth = rng.uniform(0.3, 0.6)
    image -= rng.uniform(0.28, 0.38) * lung_soft * ((1.0 - depth) + depth * pose.blur(lung_img, 0.05))
    image += rng.uniform(0.08, 0.14) * _bones(rng, pose)
    image += _ribs(rng, pose, lungs) * (np.float32(rng.uniform(0.04, 0.08)) * (0.3 + 0.7 * lung_soft))
    image += (rng.uniform(0.05, 0.1) * _vessels(rng, pose, lungs)) * lung_soft
    if rng.random() < 0.4:
        image += rng.uniform(0.02, 0.07) * _breasts(pose, lungs)
    if rng.random() < 0.5:
        image -= rng.uniform(0.03, 0.15) * _gastric_bubble(rng, pose, lungs[1])
    _draw_devices(rng, pose, image)
    return image


def _body(rng: np.random.Generator, pose: _Pose) -> np.ndarray:
    """Soft tissue: neck, shoulders, chest wall and abdomen, sometimes with the arms at the edges."""
    w = rng.uniform(0.88, 1.05)
    shoulder = rng.uniform(0.06, 0.12)
    half = np.array(
        [
            (0.5, -0.05), (0.41, -0.05), (0.4, 0.03), (0.33, shoulder), (0.18, shoulder + 0.02),
            (0.09, shoulder + 0.08), (0.065, 0.3), (0.07, 0.55), (0.08, 0.8), (0.1, 1.05), (0.5, 1.05),
        ]
    )  # fmt: skip
    half[:, 0] = 0.5 - (0.5 - half[:, 0]) * w
    half += rng.normal(0.0, 0.008, half.shape)
    outline = np.concatenate([half, np.stack([1.0 - half[::-1, 0], half[::-1, 1]], axis=1)])
    img, draw = _canvas(pose.size)
    draw.polygon(pose.px(_chaikin(outline, 1)), fill=255)
    if rng.random() < 0.35:
        for side in (-1.0, 1.0):
            arm = [(0.49, 0.15), (0.58, 0.1), (0.58, 1.05), (0.5, 1.05)]
            draw.polygon(pose.px(np.array([(0.5 + side * x, y) for x, y in arm])), fill=170)
    # X-ray path length through a roughly elliptical chest: thin at the sides, thick in the middle.
    x = (np.arange(pose.size, dtype=np.float32) + 0.5) / pose.size - 0.5 - pose.dx
    chord = np.sqrt(np.clip(1.0 - (x / (0.45 * w * pose.scale)) ** 2, 0.0, 1.0))
    return pose.blur(img, 0.015) * (0.55 + 0.45 * chord)[None, :]


def _bones(rng: np.random.Generator, pose: _Pose) -> np.ndarray:
    """Spine and clavicles on one layer (same blur), the spine fainter: it hides behind the mediastinum."""
    img, draw = _canvas(pose.size)
    _draw_spine(rng, pose, draw, fill=int(rng.integers(60, 140)))
    _draw_clavicles(rng, pose, draw)
    return pose.blur(img, 0.007)


def _draw_spine(rng: np.random.Generator, pose: _Pose, draw: ImageDraw.ImageDraw, fill: int) -> None:
    """Vertebral bodies with darker disc spaces between them."""
    half_w = rng.uniform(0.03, 0.04)
    step = rng.uniform(0.05, 0.06)
    for y in np.arange(rng.uniform(-0.02, 0.02), 1.0, step):
        box = [
            (0.5 - half_w, y),
            (0.5 + half_w, y),
            (0.5 + half_w, y + 0.8 * step),
            (0.5 - half_w, y + 0.8 * step),
        ]
        draw.polygon(pose.px(np.array(box)), fill=fill)


def _ribs(rng: np.random.Generator, pose: _Pose, lungs: Sequence[_Lung]) -> np.ndarray:
    """Posterior ribs arching out from the spine and fainter anterior ribs sloping back in."""
    img, draw = _canvas(pose.size)
    t = np.linspace(0.0, 1.0, 9)
    width = pose.width(rng.uniform(0.016, 0.022))
    step = rng.uniform(0.05, 0.058)
    droop = rng.uniform(0.17, 0.23)
    k = np.arange(10)[:, None]
    for lung in lungs:
        x0, _, x1, _ = lung.box
        reach = (x1 - x0) + 0.02
        y = 0.09 + k * step + rng.normal(0.0, 0.004, (10, 1))
        px = np.broadcast_to(0.5 + lung.lateral * (0.035 + reach * t), (10, t.size))
        py = y - 0.06 * t + (droop + 0.006 * k) * t**2
        ax = px[:, -1:] - lung.lateral * reach * 0.6 * t
        ay = py[:, -1:] + 0.12 * t - 0.03 * t**2
        for rib in pose.xy(np.stack([px, py], axis=-1)):
            draw.line(rib.ravel().tolist(), fill=255, width=width, joint="curve")
        for rib in pose.xy(np.stack([ax, ay], axis=-1)):
            draw.line(rib.ravel().tolist(), fill=110, width=width, joint="curve")
    return pose.blur(img, 0.006)


def _draw_clavicles(rng: np.random.Generator, pose: _Pose, draw: ImageDraw.ImageDraw) -> None:
    t = np.linspace(0.0, 1.0, 8)
    y = rng.uniform(0.12, 0.17) - 0.06 * t + 0.015 * np.sin(2.0 * np.pi * t)
    for side in (-1.0, 1.0):
        x = 0.5 + side * (0.035 + 0.3 * t)
        draw.line(pose.px(np.stack([x, y], axis=1)), fill=255, width=pose.width(0.025), joint="curve")


def _branches(rng: np.random.Generator, lung: _Lung, count: int, length: tuple[float, float]) -> np.ndarray:
    """Wavy polylines (count × 6 points) fanning out from the hilum towards the lateral chest wall."""
    angle = rng.uniform(-1.3, 1.4, (count, 1))  # from up-and-out to down-and-out
    heading = angle + rng.normal(0.0, 0.25, (count, 5)).cumsum(axis=1)
    seg = rng.uniform(*length, (count, 1)) / 5
    steps = np.stack([lung.lateral * np.cos(heading) * seg, np.sin(heading) * seg], axis=-1)
    start = np.broadcast_to(np.asarray(lung.hilum), (count, 1, 2))
    return np.concatenate([start, start + steps.cumsum(axis=1)], axis=1)


def _vessels(rng: np.random.Generator, pose: _Pose, lungs: Sequence[_Lung]) -> np.ndarray:
    """Normal pulmonary vessels: hilar shadows and a few tapering branches that fade before the edge."""
    img, draw = _canvas(pose.size)
    thick, thin = pose.width(0.01), pose.width(0.005)
    for lung in lungs:
        draw.ellipse(pose.box(lung.hilum, 0.03, 0.045), fill=170)
        for line in pose.xy(_branches(rng, lung, int(rng.integers(6, 11)), (0.08, 0.2))):
            draw.line(line[:3].ravel().tolist(), fill=255, width=thick, joint="curve")
            draw.line(line[2:].ravel().tolist(), fill=150, width=thin, joint="curve")
    return pose.blur(img, 0.006)


def _breasts(pose: _Pose, lungs: Sequence[_Lung]) -> np.ndarray:
    """Soft-tissue overlap of the lower lateral lungs, in any class: a haze that is not disease."""
    img, draw = _canvas(pose.size)
    for lung in lungs:
        x0, _, x1, y1 = lung.box
        draw.ellipse(pose.box(((x0 + x1) / 2 + lung.lateral * 0.05, y1 - 0.02), 0.15, 0.13), fill=255)
    return pose.blur(img, 0.04)


def _gastric_bubble(rng: np.random.Generator, pose: _Pose, left: _Lung) -> np.ndarray:
    img, draw = _canvas(pose.size)
    x0, _, x1, y1 = left.box
    centre = (rng.uniform(x0 + 0.05, x1 - 0.05), y1 + rng.uniform(0.05, 0.09))
    draw.ellipse(pose.box(centre, rng.uniform(0.03, 0.06), rng.uniform(0.02, 0.04)), fill=255)
    return pose.blur(img, 0.008)


def _draw_devices(rng: np.random.Generator, pose: _Pose, image: np.ndarray) -> None:
    """Add ECG electrodes with leads and a burned-in side marker: bright, anywhere, in every class."""
    img, draw = _canvas(pose.size)
    if rng.random() < 0.25:
        t = np.linspace(0.0, 1.0, 12)[:, None]
        for _ in range(int(rng.integers(2, 5))):
            start = np.array([rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.9)])
            end = np.array([rng.uniform(0.0, 1.0), 1.05])
            bend = (start + end) / 2 + rng.normal(0.0, 0.1, 2)
            lead = (1 - t) ** 2 * start + 2 * t * (1 - t) * bend + t**2 * end
            draw.ellipse(pose.box(start, 0.02, 0.02), outline=255, width=pose.width(0.006))
            draw.line(pose.px(lead), fill=180, width=pose.width(0.004), joint="curve")
    if rng.random() < 0.4:
        # The marker is burned in by the detector, so it ignores the patient's pose.
        corner = rng.random(2) < 0.5
        x = rng.uniform(0.03, 0.1) if corner[0] else rng.uniform(0.82, 0.9)
        y = rng.uniform(0.03, 0.1) if corner[1] else rng.uniform(0.82, 0.88)
        letter = "L" if rng.random() < 0.5 else "R"
        draw.text((x * pose.size, y * pose.size), letter, fill=255, font=_font(max(8, pose.size // 12)))
    if img.getbbox() is not None:
        image += np.asarray(img, dtype=np.float32) * np.float32(0.4 / 255)


@lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def _points_in_lung(
    rng: np.random.Generator,
    pose: _Pose,
    lung: _Lung,
    lung_mask: np.ndarray,
    count: int,
    lateral_band: float = 1.0,
    lower_band: float = 1.0,
    margin: float = 0.0,
) -> np.ndarray:
    """Up to `count` points inside the lung mask, within the lateral and lower fractions of its box.

    With a margin, the points that far left, right, above and below must be inside too, so a lesion
    centred there is not lost against the heart or the diaphragm.
    """
    x0, y0, x1, y1 = lung.box
    w = (x1 - x0) * lateral_band
    n = 8 * count + 16
    x = rng.uniform(x0, x0 + w, n) if lung.lateral < 0 else rng.uniform(x1 - w, x1, n)
    y = rng.uniform(y1 - (y1 - y0) * lower_band, y1, n)
    points = np.stack([x, y], axis=1)
    offsets = np.array([(0.0, 0.0), (-margin, 0.0), (margin, 0.0), (0.0, -margin), (0.0, margin)])
    uv = pose.xy(points[:, None, :] + offsets).astype(np.intp)
    inside = ((uv >= 0) & (uv < pose.size)).all(axis=(1, 2))
    uv = np.clip(uv, 0, pose.size - 1)
    inside &= (lung_mask[uv[..., 1], uv[..., 0]] > 0).all(axis=1)
    return points[inside][:count]


def _ground_glass(
    rng: np.random.Generator, pose: _Pose, lungs: Sequence[_Lung], mask: np.ndarray
) -> np.ndarray:
    """COVID: hazy ground-glass patches, bilateral, peripheral and in the lower zones."""
    img, draw = _canvas(pose.size)
    for lung in lungs:
        for centre in _points_in_lung(rng, pose, lung, mask, int(rng.integers(2, 5)), 0.4, 0.6):
            r = rng.uniform(0.045, 0.08)
            draw.ellipse(pose.box(centre, r, r * rng.uniform(0.7, 1.4)), fill=int(rng.integers(150, 256)))
    return pose.blur(img, 0.02) * np.float32(0.35)


def _consolidation(
    rng: np.random.Generator, pose: _Pose, lungs: Sequence[_Lung], mask: np.ndarray
) -> np.ndarray:
    """Lung opacity: one (sometimes two) dense, well-defined consolidations with air bronchograms."""
    img, draw = _canvas(pose.size)
    count = 1 if rng.random() < 0.75 else 2
    for side in rng.choice(2, size=count, replace=rng.random() < 0.4):
        r = rng.uniform(0.06, 0.095)
        found = _points_in_lung(rng, pose, lungs[side], mask, 1, margin=0.8 * r)
        if not len(found):
            found = _points_in_lung(rng, pose, lungs[side], mask, 1)
        for centre in found:
            angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, 9))
            radii = r * rng.uniform(0.7, 1.2, 9)
            outline = centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
            draw.polygon(pose.px(_chaikin(outline)), fill=255)
            for a in rng.uniform(0.0, np.pi, int(rng.integers(1, 4))):
                d = np.array([math.cos(a), math.sin(a)]) * r * 0.7
                draw.line(pose.px(np.stack([centre - d, centre + d])), fill=150, width=pose.width(0.008))
    return pose.blur(img, 0.01) * np.float32(0.45)


def _interstitial(
    rng: np.random.Generator, pose: _Pose, lungs: Sequence[_Lung], mask: np.ndarray
) -> np.ndarray:
    """Viral pneumonia: diffuse bilateral reticular streaks radiating from the hila to the periphery."""
    img, draw = _canvas(pose.size)
    width = pose.width(0.008)
    for lung in lungs:
        for line in pose.xy(_branches(rng, lung, int(rng.integers(18, 28)), (0.15, 0.32))):
            draw.line(line[1:].ravel().tolist(), fill=255, width=width, joint="curve")
        centres = _points_in_lung(rng, pose, lung, mask, int(rng.integers(14, 22)))
        a = rng.uniform(0.0, np.pi, (len(centres), 1))
        d = np.concatenate([np.cos(a), np.sin(a)], axis=1) * rng.uniform(0.02, 0.05, (len(centres), 1))
        for segment in pose.xy(np.stack([centres - d, centres + d], axis=1)):
            draw.line(segment.ravel().tolist(), fill=200, width=width)
    return pose.blur(img, 0.006) * np.float32(0.18)


_Pattern = Callable[[np.random.Generator, _Pose, Sequence[_Lung], np.ndarray], np.ndarray]
_PATTERNS: dict[str, _Pattern] = {
    "COVID": _ground_glass,
    "Lung_Opacity": _consolidation,
    "Viral Pneumonia": _interstitial,
}


def _match_histogram(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Remap `image` monotonically so that its intensity histogram equals `reference`'s.

    The pattern is added to a class-independent anatomy; matching the result to that anatomy keeps
    the pattern's local contrast and erases what it did to the global histogram.
    """
    lo, hi = float(reference.min()), float(reference.max())
    scale = (_HIST_LEVELS - 1) / max(hi - lo, 1e-6)
    q_img = np.clip((image - lo) * scale, 0, _HIST_LEVELS - 1).astype(np.intp)
    q_ref = np.clip((reference - lo) * scale, 0, _HIST_LEVELS - 1).astype(np.intp)
    cdf_img = np.bincount(q_img.ravel(), minlength=_HIST_LEVELS).cumsum() / q_img.size
    cdf_ref = np.bincount(q_ref.ravel(), minlength=_HIST_LEVELS).cumsum() / q_ref.size
    lut = np.interp(cdf_img, cdf_ref, np.arange(_HIST_LEVELS)) / scale + lo
    return lut.astype(np.float32)[q_img]


def _tone(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Exposure: a random window and gamma, strong and independent of the class."""
    lo = rng.uniform(-0.1, 0.12)
    hi = rng.uniform(0.75, 1.0)
    image = np.clip((image - lo) * np.float32(1.0 / (hi - lo)), 0.0, 1.0)
    return image ** np.float32(math.exp(rng.normal(0.0, 0.25)))


def _add_noise(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Quantum noise growing with the signal, then 8-bit quantisation."""
    # The sum of two uniform bytes is triangular noise: close enough to Gaussian, and cheap to draw.
    raw = np.frombuffer(rng.bytes(2 * image.size), dtype=np.int8).reshape(2, *image.shape)
    noise = raw[0].astype(np.float32) + raw[1]
    sigma = np.float32(rng.uniform(0.01, 0.045) * math.sqrt(6.0) / 256.0)  # unit variance, then the level
    image = image + noise * sigma * np.sqrt(image + np.float32(0.05))
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
