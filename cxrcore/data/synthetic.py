"""Procedural chest X-ray phantoms in the Kaggle COVID-19 Radiography layout, for tests and smoke runs.

Each image is drawn from its own generator seeded by (seed, class index, image number), so datasets of
different sizes share their prefix and the work splits across processes without coordination. The
class patterns live inside the lung fields only, and every image's intensity histogram is matched to
that of its own pattern-free anatomy, so global intensity statistics carry no class information.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
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

# Speed over size: level 1 makes files ~10% larger than level 6 and writing several times faster.
_PNG_COMPRESS_LEVEL = 1
# Extra stream index for per-image draws that must not disturb the image's own stream.
_SOURCE_STREAM = 1
# Quantisation levels used to match an image's histogram to its pattern-free anatomy.
_HIST_LEVELS = 1024
# Resolution the anatomy is drawn at; larger images are upsampled from it (their blur is real anyway).
_WORK_SIZE = 160

Points = list[tuple[float, float]]


@dataclass(frozen=True)
class SynthSummary:
    """What write_synthetic_dataset wrote, and how fast."""

    root: Path
    counts: dict[str, int]
    seconds: float
    images_per_second: float


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

    def px(self, points: np.ndarray) -> Points:
        """Pixel coordinates of anatomy points (N×2, x right, y down, centre 0.5)."""
        x = points[:, 0] - 0.5
        y = points[:, 1] - 0.5
        u = 0.5 + self.dx + self.scale * (self.cos * x - self.sin * y)
        v = 0.5 + self.dy + self.scale * (self.sin * x + self.cos * y)
        return list(zip((u * self.size).tolist(), (v * self.size).tolist(), strict=True))

    def width(self, fraction: float) -> int:
        """A stroke width given as a fraction of the image side, at least one pixel."""
        return max(1, round(fraction * self.scale * self.size))

    def blur(self, img: Image.Image, fraction: float) -> np.ndarray:
        """Gaussian-blur a drawn layer (radius a fraction of the side) and return it as float 0..1."""
        radius = fraction * self.sharpness * self.scale * self.size
        if radius >= 0.3:
            img = img.filter(ImageFilter.GaussianBlur(radius))
        return np.asarray(img, dtype=np.float32) * np.float32(1 / 255)


@dataclass(frozen=True)
class _Lung:
    """One lung field in anatomy coordinates: its outline, hilum and which side is lateral."""

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

    The anatomy is drawn first and independently of the label; the class pattern is then added inside
    the lungs, scaled down to a faint trace when `subtle` (drawn at random when None).
    """
    name = CLASSES[class_index(label)]
    if size < 32 or mask_size < 8:
        raise ValueError(f"size must be >= 32 and mask_size >= 8, got size={size}, mask_size={mask_size}")
    # Everything is smooth at the detector's resolution, so draw at a working size and upsample once.
    pose = _random_pose(rng, min(size, _WORK_SIZE))
    lungs = _lung_outlines(rng)
    heart = _heart(rng)
    lung_img = _lung_mask(pose, lungs, heart)
    lung_hard = np.asarray(lung_img)
    lung_soft = pose.blur(lung_img, 0.005)

    base = _anatomy(rng, pose, lungs, heart, lung_img, lung_soft)
    if subtle is None:
        subtle = bool(rng.random() < SUBTLE_FRACTION)
    strength = rng.uniform(0.35, 0.55) if subtle else rng.uniform(0.8, 1.2)
    pattern = _PATTERNS[name](rng, pose, lungs, lung_hard) if name in _PATTERNS else None
    image = base if pattern is None else _match_histogram(base + strength * pattern * lung_soft, base)
    if pose.size != size:
        image = np.asarray(Image.fromarray(image, mode="F").resize((size, size), Image.Resampling.BILINEAR))

    image = _expose(rng, image)
    full = _lung_mask(replace(pose, size=size), lungs, heart)
    mask = full.resize((mask_size, mask_size), Image.Resampling.NEAREST)
    return image, np.asarray(mask)


def write_synthetic_dataset(
    out: str | os.PathLike[str],
    per_class: int,
    seed: int = 0,
    image_size: int = 299,
    mask_size: int = 256,
    classes: Sequence[str] = CLASSES,
) -> SynthSummary:
    """Write the Kaggle layout: <Class>/images/<Class>-<i>.png, <Class>/masks/<Class>-<i>.png (i from 1),
    and <Class>.metadata.xlsx (columns FILE NAME, FORMAT, SIZE, URL) in `out`."""
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    names = [CLASSES[class_index(c)] for c in classes]
    root = Path(out)
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
            _save_png(image, images / f"{stem}.png")
            _save_png(mask, masks / f"{stem}.png")
            source = np.random.default_rng([seed, index, i, _SOURCE_STREAM]).integers(SOURCES_PER_CLASS)
            rows.append((_metadata_name(stem), "PNG", f"{image_size}*{image_size}", source_url(name, source)))
        pd.DataFrame(rows, columns=list(METADATA_COLUMNS)).to_excel(
            root / f"{name}.metadata.xlsx", index=False, engine="openpyxl"
        )
        counts[name] = per_class
    seconds = time.perf_counter() - start
    total = sum(counts.values())
    return SynthSummary(root, counts, seconds, total / seconds if seconds > 0 else 0.0)


def source_url(label: str, source: int) -> str:
    """The stable fake URL of one synthetic source ("site") of a class; each has its own host."""
    slug = CLASSES[class_index(label)].lower().replace("_", "-").replace(" ", "-")
    return f"https://site-{chr(ord('a') + int(source))}.{slug}.synthetic.cxr/"


def _metadata_name(stem: str) -> str:
    # The real metadata spells Normal files NORMAL-<i>; readers must match names case-insensitively.
    return stem.upper() if stem.startswith("Normal-") else stem


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array, mode="L").save(path, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)


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
    """Corner-cutting on a closed polygon: rounds the control points into a smooth outline."""
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
        if side > 0:
            pts[:, 1] += rng.uniform(0.0, 0.03)  # the left hemidiaphragm usually sits lower
        pts[:, 0] = 0.5 - (0.5 - pts[:, 0]) * width
        if side > 0:
            pts[:, 0] = 1.0 - pts[:, 0]
        outline = _chaikin(pts)
        hilum = (0.5 + side * rng.uniform(0.07, 0.1), 0.15 + 0.27 * depth + rng.normal(0.0, 0.01))
        lungs.append(_Lung(outline, hilum, side))
    return lungs[0], lungs[1]


def _heart(rng: np.random.Generator) -> np.ndarray:
    """Heart outline: a tilted ellipse shifted to the patient's left that cuts the medial lower lungs."""
    cx = rng.uniform(0.53, 0.57)
    cy = rng.uniform(0.63, 0.67)
    rx, ry = rng.uniform(0.13, 0.17), rng.uniform(0.09, 0.12)
    tilt = rng.uniform(-0.45, -0.2)
    t = np.linspace(0.0, 2.0 * np.pi, 32, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    return np.stack(
        [cx + x * math.cos(tilt) - y * math.sin(tilt), cy + x * math.sin(tilt) + y * math.cos(tilt)], axis=1
    )


def _mediastinum(heart: np.ndarray) -> np.ndarray:
    """The central soft-tissue band from the neck to the heart, which no lung field covers."""
    top = heart[:, 1].min() + 0.02
    return np.array([(0.47, 0.0), (0.53, 0.0), (0.545, top), (0.455, top)])


def _lung_mask(pose: _Pose, lungs: Sequence[_Lung], heart: np.ndarray) -> Image.Image:
    img, draw = _canvas(pose.size)
    for lung in lungs:
        draw.polygon(pose.px(lung.outline), fill=255)
    draw.polygon(pose.px(heart), fill=0)
    draw.polygon(pose.px(_mediastinum(heart)), fill=0)
    return img


def _anatomy(
    rng: np.random.Generator,
    pose: _Pose,
    lungs: Sequence[_Lung],
    heart: np.ndarray,
    lung_img: Image.Image,
    lung_soft: np.ndarray,
) -> np.ndarray:
    """Attenuation of the pattern-free chest (float32, roughly 0..1): everything but the disease."""
    image = np.float32(rng.uniform(0.0, 0.06)) + rng.uniform(0.5, 0.65) * _body(rng, pose)
    image += rng.uniform(0.0, 0.04) * _heart_density(pose, heart)
    # Lungs are thickest (darkest) away from their edges; the wide blur gives them that depth.
    depth = rng.uniform(0.3, 0.6)
    image -= rng.uniform(0.28, 0.38) * lung_soft * ((1.0 - depth) + depth * pose.blur(lung_img, 0.05))
    image += rng.uniform(0.03, 0.06) * _spine(rng, pose)
    image += _ribs(rng, pose, lungs) * (np.float32(rng.uniform(0.04, 0.08)) * (0.3 + 0.7 * lung_soft))
    image += rng.uniform(0.08, 0.14) * _clavicles(rng, pose)
    image += (rng.uniform(0.05, 0.1) * _vessels(rng, pose, lungs)) * lung_soft
    image += rng.uniform(0.0, 0.07) * _breasts(rng, pose, lungs)
    image -= rng.uniform(0.0, 0.15) * _gastric_bubble(rng, pose, lungs[1])
    image += _devices(rng, pose)
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
    outline = _chaikin(np.concatenate([half, np.stack([1.0 - half[::-1, 0], half[::-1, 1]], axis=1)]), 1)
    img, draw = _canvas(pose.size)
    draw.polygon(pose.px(outline), fill=255)
    if rng.random() < 0.35:
        for side in (-1.0, 1.0):
            arm = np.array(
                [
                    (0.5 + side * 0.49, 0.15),
                    (0.5 + side * 0.58, 0.1),
                    (0.5 + side * 0.58, 1.0),
                    (0.5 + side * 0.5, 1.0),
                ]
            )
            draw.polygon(pose.px(arm), fill=170)
    # X-ray path length through a roughly elliptical chest: thin at the sides, thick in the middle.
    x = (np.arange(pose.size, dtype=np.float32) + 0.5) / pose.size - 0.5 - pose.dx
    chord = np.sqrt(np.clip(1.0 - (x / (0.45 * w * pose.scale)) ** 2, 0.0, 1.0))
    return pose.blur(img, 0.015) * (0.55 + 0.45 * chord)[None, :]


def _heart_density(pose: _Pose, heart: np.ndarray) -> np.ndarray:
    img, draw = _canvas(pose.size)
    draw.polygon(pose.px(heart), fill=255)
    return pose.blur(img, 0.01)


def _spine(rng: np.random.Generator, pose: _Pose) -> np.ndarray:
    """Vertebral bodies with darker disc spaces, seen faintly through the mediastinum."""
    img, draw = _canvas(pose.size)
    half_w = rng.uniform(0.03, 0.04)
    step = rng.uniform(0.05, 0.06)
    y = rng.uniform(-0.02, 0.02)
    while y < 1.0:
        box = np.array(
            [
                (0.5 - half_w, y),
                (0.5 + half_w, y),
                (0.5 + half_w, y + step * 0.8),
                (0.5 - half_w, y + step * 0.8),
            ]
        )
        draw.polygon(pose.px(box), fill=255)
        y += step
    return pose.blur(img, 0.008)


def _ribs(rng: np.random.Generator, pose: _Pose, lungs: Sequence[_Lung]) -> np.ndarray:
    """Posterior ribs arching out from the spine and fainter anterior ribs sloping back in."""
    img, draw = _canvas(pose.size)
    t = np.linspace(0.0, 1.0, 9)
    width = pose.width(rng.uniform(0.016, 0.022))
    step = rng.uniform(0.05, 0.058)
    droop = rng.uniform(0.17, 0.23)
    for lung in lungs:
        x0, y0, x1, y1 = lung.box
        reach = (x1 - x0) + 0.02
        for k in range(10):
            y = 0.09 + k * step + rng.normal(0.0, 0.004)
            px = 0.5 + lung.lateral * (0.035 + reach * t)
            py = y - 0.06 * t + (droop + 0.006 * k) * t**2
            draw.line(pose.px(np.stack([px, py], axis=1)), fill=255, width=width, joint="curve")
            ax = px[-1] - lung.lateral * reach * 0.6 * t
            ay = py[-1] + 0.12 * t - 0.03 * t**2
            draw.line(pose.px(np.stack([ax, ay], axis=1)), fill=110, width=width, joint="curve")
    return pose.blur(img, 0.006)


def _clavicles(rng: np.random.Generator, pose: _Pose) -> np.ndarray:
    img, draw = _canvas(pose.size)
    t = np.linspace(0.0, 1.0, 8)
    y0 = rng.uniform(0.12, 0.17)
    for side in (-1.0, 1.0):
        x = 0.5 + side * (0.035 + 0.3 * t)
        y = y0 - 0.06 * t + 0.015 * np.sin(np.pi * t * 2.0)
        draw.line(pose.px(np.stack([x, y], axis=1)), fill=255, width=pose.width(0.025), joint="curve")
    return pose.blur(img, 0.006)


def _branches(
    rng: np.random.Generator,
    start: tuple[float, float],
    lateral: float,
    count: int,
    length: tuple[float, float],
) -> list[np.ndarray]:
    """Wavy polylines fanning out from a hilum towards the lateral chest wall."""
    lines = []
    for _ in range(count):
        angle = rng.uniform(-1.3, 1.4)  # from up-and-out to down-and-out
        steps = rng.normal(0.0, 0.25, 5).cumsum() + angle
        seg = rng.uniform(*length) / 5
        dx = lateral * np.cos(steps) * seg
        dy = np.sin(steps) * seg
        pts = np.stack(
            [np.r_[start[0], start[0] + dx.cumsum()], np.r_[start[1], start[1] + dy.cumsum()]], axis=1
        )
        lines.append(pts)
    return lines


def _vessels(rng: np.random.Generator, pose: _Pose, lungs: Sequence[_Lung]) -> np.ndarray:
    """Normal pulmonary vessels: a few tapering branches that fade before the periphery."""
    img, draw = _canvas(pose.size)
    for lung in lungs:
        draw.ellipse(_ellipse_box(pose, lung.hilum, 0.03, 0.045), fill=170)
        for line in _branches(rng, lung.hilum, lung.lateral, int(rng.integers(6, 11)), (0.08, 0.2)):
            px = pose.px(line)
            draw.line(px[:3], fill=255, width=pose.width(0.01), joint="curve")
            draw.line(px[2:], fill=150, width=pose.width(0.005), joint="curve")
    return pose.blur(img, 0.006)


def _breasts(rng: np.random.Generator, pose: _Pose, lungs: Sequence[_Lung]) -> np.ndarray:
    """Soft-tissue overlap over the lower lateral lungs, present regardless of class."""
    img, draw = _canvas(pose.size)
    if rng.random() < 0.4:
        for lung in lungs:
            x0, y0, x1, y1 = lung.box
            centre = ((x0 + x1) / 2 + lung.lateral * 0.05, y1 - 0.02)
            draw.ellipse(_ellipse_box(pose, centre, 0.15, 0.13), fill=255)
    return pose.blur(img, 0.04)


def _gastric_bubble(rng: np.random.Generator, pose: _Pose, left: _Lung) -> np.ndarray:
    img, draw = _canvas(pose.size)
    if rng.random() < 0.5:
        x0, y0, x1, y1 = left.box
        centre = (rng.uniform(x0 + 0.05, x1 - 0.05), y1 + rng.uniform(0.05, 0.09))
        draw.ellipse(_ellipse_box(pose, centre, rng.uniform(0.03, 0.06), rng.uniform(0.02, 0.04)), fill=255)
    return pose.blur(img, 0.008)


def _devices(rng: np.random.Generator, pose: _Pose) -> np.ndarray:
    """Burned-in side marker and ECG electrodes with leads: bright, anywhere, in every class."""
    img, draw = _canvas(pose.size)
    if rng.random() < 0.25:
        for _ in range(int(rng.integers(2, 5))):
            centre = (rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.9))
            draw.ellipse(_ellipse_box(pose, centre, 0.02, 0.02), outline=255, width=pose.width(0.006))
            start, end = np.array(centre), np.array([rng.uniform(0.0, 1.0), 1.05])
            bend = (start + end) / 2 + rng.normal(0.0, 0.1, 2)
            t = np.linspace(0.0, 1.0, 12)[:, None]
            lead = (1 - t) ** 2 * start + 2 * t * (1 - t) * bend + t**2 * end
            draw.line(pose.px(lead), fill=180, width=pose.width(0.004), joint="curve")
    if rng.random() < 0.4:
        # The marker is burned in after positioning, so it ignores the pose.
        size = pose.size
        font = _font(max(8, size // 12))
        x = rng.uniform(0.03, 0.1) * size if rng.random() < 0.5 else rng.uniform(0.82, 0.9) * size
        y = rng.uniform(0.03, 0.1) * size if rng.random() < 0.5 else rng.uniform(0.82, 0.88) * size
        draw.text((x, y), "L" if rng.random() < 0.5 else "R", fill=255, font=font)
    return np.asarray(img, dtype=np.float32) * np.float32(0.4 / 255)


@lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def _ellipse_box(pose: _Pose, centre: tuple[float, float], rx: float, ry: float) -> list[float]:
    """Pixel bounding box of an axis-aligned ellipse; rotation is small enough to ignore for blobs."""
    ((u, v),) = pose.px(np.array([centre]))
    sx, sy = rx * pose.scale * pose.size, ry * pose.scale * pose.size
    return [u - sx, v - sy, u + sx, v + sy]


def _sample_in_lung(
    rng: np.random.Generator,
    pose: _Pose,
    lung: _Lung,
    lung_hard: np.ndarray,
    lateral_band: float = 1.0,
    lower_band: float = 1.0,
    margin: float = 0.0,
) -> tuple[float, float]:
    """A point inside the lung's mask, restricted to its lateral and lower fractions of the box.

    With a margin, the points that far left, right, above and below must be inside too, so a lesion
    centred there is not lost against the heart or the diaphragm.
    """
    x0, y0, x1, y1 = lung.box
    w = (x1 - x0) * lateral_band
    offsets = np.array([(0.0, 0.0), (-margin, 0.0), (margin, 0.0), (0.0, -margin), (0.0, margin)])
    point = ((x0 + x1) / 2, (y0 + y1) / 2)
    for _ in range(40):
        x = rng.uniform(x0, x0 + w) if lung.lateral < 0 else rng.uniform(x1 - w, x1)
        y = rng.uniform(y1 - (y1 - y0) * lower_band, y1)
        uv = np.array(pose.px(offsets + (x, y))).astype(np.intp)
        inside = (uv >= 0).all() and (uv < pose.size).all() and lung_hard[uv[:, 1], uv[:, 0]].all()
        if inside:
            return x, y
        point = (x, y)
    return point


def _ground_glass(
    rng: np.random.Generator, pose: _Pose, lungs: Sequence[_Lung], lung_hard: np.ndarray
) -> np.ndarray:
    """COVID: hazy ground-glass patches, bilateral, peripheral and in the lower zones."""
    img, draw = _canvas(pose.size)
    for lung in lungs:
        for _ in range(int(rng.integers(2, 5))):
            centre = _sample_in_lung(rng, pose, lung, lung_hard, lateral_band=0.4, lower_band=0.6)
            r = rng.uniform(0.045, 0.08)
            draw.ellipse(
                _ellipse_box(pose, centre, r, r * rng.uniform(0.7, 1.4)), fill=int(rng.integers(150, 256))
            )
    return pose.blur(img, 0.02) * np.float32(0.35)


def _consolidation(
    rng: np.random.Generator, pose: _Pose, lungs: Sequence[_Lung], lung_hard: np.ndarray
) -> np.ndarray:
    """Lung opacity: one (sometimes two) dense, well-defined consolidations with air bronchograms."""
    img, draw = _canvas(pose.size)
    count = 1 if rng.random() < 0.75 else 2
    for lung in rng.choice(np.array(lungs, dtype=object), size=count, replace=rng.random() < 0.4):
        r = rng.uniform(0.06, 0.095)
        centre = _sample_in_lung(rng, pose, lung, lung_hard, margin=0.8 * r)
        angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, 9))
        radii = r * rng.uniform(0.7, 1.2, 9)
        outline = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], axis=1)
        draw.polygon(pose.px(_chaikin(outline, 2)), fill=255)
        for _ in range(int(rng.integers(1, 4))):
            a = rng.uniform(0.0, np.pi)
            d = np.array([np.cos(a), np.sin(a)]) * r * 0.7
            line = np.array([np.asarray(centre) - d, np.asarray(centre) + d])
            draw.line(pose.px(line), fill=150, width=pose.width(0.008))
    return pose.blur(img, 0.01) * np.float32(0.45)


def _interstitial(
    rng: np.random.Generator, pose: _Pose, lungs: Sequence[_Lung], lung_hard: np.ndarray
) -> np.ndarray:
    """Viral pneumonia: diffuse bilateral reticular streaks radiating from the hila to the periphery."""
    img, draw = _canvas(pose.size)
    width = pose.width(0.008)
    for lung in lungs:
        for line in _branches(rng, lung.hilum, lung.lateral, int(rng.integers(18, 28)), (0.15, 0.32)):
            draw.line(pose.px(line[1:]), fill=255, width=width, joint="curve")
        for _ in range(int(rng.integers(14, 22))):
            centre = np.array(_sample_in_lung(rng, pose, lung, lung_hard))
            a = rng.uniform(0.0, np.pi)
            d = np.array([np.cos(a), np.sin(a)]) * rng.uniform(0.02, 0.05)
            draw.line(pose.px(np.array([centre - d, centre + d])), fill=200, width=width)
    return pose.blur(img, 0.004) * np.float32(0.16)


_PATTERNS = {"COVID": _ground_glass, "Lung_Opacity": _consolidation, "Viral Pneumonia": _interstitial}


def _match_histogram(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Remap `image` monotonically so its intensity histogram equals `reference`'s.

    The pattern is drawn on top of a class-independent anatomy; matching the diseased image to that
    anatomy keeps the pattern's local contrast while erasing what it did to the global histogram.
    """
    lo, hi = float(reference.min()), float(reference.max())
    scale = (_HIST_LEVELS - 1) / max(hi - lo, 1e-6)
    levels = np.arange(_HIST_LEVELS, dtype=np.float64)
    q_img = np.clip((image - lo) * scale, 0, _HIST_LEVELS - 1).astype(np.intp)
    q_ref = np.clip((reference - lo) * scale, 0, _HIST_LEVELS - 1).astype(np.intp)
    cdf_img = np.bincount(q_img.ravel(), minlength=_HIST_LEVELS).cumsum() / q_img.size
    cdf_ref = np.bincount(q_ref.ravel(), minlength=_HIST_LEVELS).cumsum() / q_ref.size
    lut = (np.interp(cdf_img, cdf_ref, levels) / scale + lo).astype(np.float32)
    return lut[q_img]


def _expose(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Detector response: random window, gamma and quantum noise, independent of the class."""
    lo = rng.uniform(-0.1, 0.12)
    hi = rng.uniform(0.75, 1.0)
    image = np.clip((image - lo) * np.float32(1.0 / (hi - lo)), 0.0, 1.0)
    image **= np.float32(math.exp(rng.normal(0.0, 0.25)))
    # Two uniforms make triangular noise (unit variance after scaling): near-Gaussian, twice as cheap.
    noise = rng.random((2, *image.shape), dtype=np.float32).sum(axis=0) - np.float32(1.0)
    sigma = np.float32(rng.uniform(0.01, 0.045) * math.sqrt(6.0))
    image += noise * sigma * np.sqrt(image + np.float32(0.05))
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
