"""Synthetic phantoms: the exact Kaggle layout, determinism per seed, learnable classes, no shortcuts."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFilter
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from cxrcore.cli import main
from cxrcore.data.synthetic import (
    MARKER_STYLES,
    METADATA_COLUMNS,
    SOURCES_PER_CLASS,
    render_phantom,
    site_url,
    source_url,
    write_examples,
    write_synthetic_dataset,
)
from cxrcore.labels import CLASSES
from tests.conftest import write_png, xray

PER_CLASS = 3
TRAIN_PER_CLASS, TEST_PER_CLASS = 150, 50


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    summary = write_synthetic_dataset(root, per_class=PER_CLASS, seed=3)
    assert summary.root == root
    assert summary.counts == dict.fromkeys(CLASSES, PER_CLASS)
    assert summary.seconds > 0 and summary.images_per_second > 0
    return root


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def test_files_are_laid_out_like_the_kaggle_dataset(written: Path) -> None:
    expected = {f"{c}.metadata.xlsx" for c in CLASSES} | set(CLASSES) | {".cxr-synthetic"}  # hidden: no class
    assert {p.name for p in written.iterdir()} == expected
    for name in CLASSES:
        stems = [f"{name}-{i}" for i in range(1, PER_CLASS + 1)]
        assert {p.name for p in (written / name).iterdir()} == {"images", "masks"}
        for folder, size in (("images", 299), ("masks", 256)):
            files = sorted(p.name for p in (written / name / folder).iterdir())
            assert files == sorted(f"{s}.png" for s in stems)
            for file in files:
                with Image.open(written / name / folder / file) as img:
                    assert (img.format, img.mode, img.size) == ("PNG", "L", (size, size))


def test_masks_are_binary_and_cover_a_plausible_share_of_the_lungs(written: Path) -> None:
    for mask_path in written.glob("*/masks/*.png"):
        mask = _pixels(mask_path)
        assert set(np.unique(mask)) == {0, 255}, mask_path
        assert 0.15 <= (mask > 0).mean() <= 0.5, mask_path


def test_metadata_has_the_real_columns_and_one_row_per_image(written: Path) -> None:
    urls: dict[str, set[str]] = {}
    for name in CLASSES:
        frame = pd.read_excel(written / f"{name}.metadata.xlsx", engine="openpyxl")
        assert list(frame.columns) == list(METADATA_COLUMNS) == ["FILE NAME", "FORMAT", "SIZE", "URL"]
        assert len(frame) == PER_CLASS
        files = {p.stem.casefold() for p in (written / name / "images").iterdir()}
        assert {n.casefold() for n in frame["FILE NAME"]} == files
        assert set(frame["FORMAT"]) == {"PNG"}
        assert set(frame["SIZE"]) == {"299*299"}
        urls[name] = set(frame["URL"])
        assert urls[name] <= {source_url(name, s) for s in range(SOURCES_PER_CLASS)}
    # Like the real data, Normal's metadata names differ in case from its files.
    normal = pd.read_excel(written / "Normal.metadata.xlsx", engine="openpyxl")
    assert list(normal["FILE NAME"]) == [f"NORMAL-{i}" for i in range(1, PER_CLASS + 1)]
    all_sources = [source_url(c, s) for c in CLASSES for s in range(SOURCES_PER_CLASS)]
    assert len(set(all_sources)) == len(all_sources)
    assert all(u.startswith("https://") for u in all_sources)


def _tree(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): _pixels(p) for p in sorted(root.glob("*/*/*.png"))}


def test_same_seed_same_pixels_and_smaller_sets_are_prefixes(tmp_path: Path) -> None:
    for folder, per_class, seed in (("a", 3, 5), ("b", 3, 5), ("c", 5, 5), ("d", 3, 6)):
        write_synthetic_dataset(
            tmp_path / folder, per_class, seed, image_size=64, mask_size=32, classes=("COVID", "Normal")
        )
    a, b, c, d = (_tree(tmp_path / x) for x in "abcd")
    assert a.keys() == b.keys() == d.keys() and len(a) == 12
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(a[k], c[k]) for k in a)
    assert len(c) == 20
    images = [k for k in a if "/images/" in k]
    assert not any(np.array_equal(a[k], d[k]) for k in images)
    meta = [pd.read_excel(tmp_path / x / "COVID.metadata.xlsx", engine="calamine") for x in "ac"]
    pd.testing.assert_frame_equal(meta[0], meta[1].head(3))


def test_with_two_sites_the_marker_follows_the_class_at_site_a_only(tmp_path: Path) -> None:
    per_class = 24
    write_synthetic_dataset(tmp_path, per_class, seed=4, image_size=64, mask_size=32, sites=2)
    frames = np.array([style.frame for style in MARKER_STYLES])
    agreement: dict[str, list[bool]] = {site_url(0): [], site_url(1): []}
    for index, name in enumerate(CLASSES):
        metadata = pd.read_excel(tmp_path / f"{name}.metadata.xlsx", engine="openpyxl")
        assert set(metadata["URL"]) == set(agreement)  # every class at both sites
        for i, url in enumerate(metadata["URL"], start=1):
            image = _pixels(tmp_path / name / "images" / f"{name}-{i}.png")
            edge = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(float)
            style = int(np.abs(frames - np.median(edge)).argmin())  # the frame's gray level reads the style
            agreement[url].append(style == index)
    assert np.mean(agreement[site_url(0)]) > 0.8  # the shortcut: at site a the marker names the class
    assert np.mean(agreement[site_url(1)]) < 0.45  # at site b it is chance (0.25)


def test_synth_sites_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", str(tmp_path / "raw"), "--per-class", "1", "--sites", "2"]) == 0
    out = capsys.readouterr().out
    assert (
        "sites: site-a.synthetic.cxr (marker follows the class), site-b.synthetic.cxr (marker random)" in out
    )
    assert "--test-sources site-b.synthetic.cxr" in out
    assert main(["data", "synth", str(tmp_path / "raw"), "--sites", "0"]) == 2


def test_render_phantom_shapes_determinism_and_errors() -> None:
    image, mask = render_phantom(
        "Viral Pneumonia", np.random.default_rng(1), size=96, mask_size=40, subtle=True
    )
    assert (image.dtype, image.shape, mask.dtype, mask.shape) == (np.uint8, (96, 96), np.uint8, (40, 40))
    again, _ = render_phantom("viral pneumonia", np.random.default_rng(1), size=96, mask_size=40, subtle=True)
    assert np.array_equal(image, again)
    with pytest.raises(ValueError, match="expected one of"):
        render_phantom("Tuberculosis", np.random.default_rng(0))
    with pytest.raises(ValueError, match="per_class"):
        write_synthetic_dataset("unused", per_class=-1)


@pytest.mark.parametrize("label", CLASSES)
def test_mask_matches_the_dark_lung_fields_of_the_image(label: str) -> None:
    for i in range(4):
        image, mask = render_phantom(label, np.random.default_rng([9, i]), mask_size=299)
        lungs = mask > 0
        # The band just outside the lungs (chest wall, heart, diaphragm) must be brighter than inside.
        grown = np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(15))) > 0
        ring = grown & ~lungs
        assert image[lungs].mean() < image[ring].mean() - 10, (label, i)


def render_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-size images, labels, and a train mask (per class the first TRAIN_PER_CLASS images)."""
    images, labels, train = [], [], []
    for index, name in enumerate(CLASSES):
        for i in range(1, TRAIN_PER_CLASS + TEST_PER_CLASS + 1):
            images.append(render_phantom(name, np.random.default_rng([seed, index, i]))[0])
            labels.append(index)
            train.append(i <= TRAIN_PER_CLASS)
    return np.stack(images), np.array(labels), np.array(train)


def stats_accuracy(images: np.ndarray, labels: np.ndarray, train: np.ndarray) -> float:
    """Held-out accuracy of a logistic regression on global intensity statistics alone."""
    counts = np.stack([np.bincount(row, minlength=256) for row in images.reshape(len(images), -1)])
    p = counts / counts.sum(axis=1, keepdims=True)
    levels = np.arange(256)
    mean = p @ levels
    std = np.sqrt(np.maximum(p @ levels**2 - mean**2, 0.0))
    cdf = p.cumsum(axis=1)
    quantiles = np.array([0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99])
    percentiles = (cdf[:, :, None] >= quantiles).argmax(axis=1)
    hist = p.reshape(len(p), 32, 8).sum(axis=2)
    features = np.concatenate([mean[:, None], std[:, None], percentiles, hist], axis=1)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(features[train], labels[train])
    return float(model.score(features[~train], labels[~train]))


def cnn_accuracy(images: np.ndarray, labels: np.ndarray, train: np.ndarray, epochs: int = 16) -> float:
    """Held-out accuracy of a small CNN trained on 64 px downsampled images, deterministically (0.91 after 12
    or 16 epochs, 0.935 after 30, at about 0.4 s an epoch)."""
    small = np.stack([np.asarray(Image.fromarray(a).resize((64, 64), Image.Resampling.BOX)) for a in images])
    x = small.astype(np.float32)
    # Per-image standardisation: the exposure is random by design, so undo its linear part.
    x = (x - x.mean(axis=(1, 2), keepdims=True)) / (x.std(axis=(1, 2), keepdims=True) + 1e-6)
    x_all, y_all = torch.from_numpy(x[:, None]), torch.from_numpy(labels)
    x_train, y_train = x_all[train], y_all[train]
    batch = 32
    threads = torch.get_num_threads()
    # One thread: on a busy 2-core machine two OpenMP threads spin-waited for each other and this
    # took 150 s instead of 6 s; one thread takes seconds however busy the machine is.
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = _small_cnn(width=16, blocks=4, classes=len(CLASSES))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
        steps = epochs * -(-len(y_train) // batch)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
        generator = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(y_train), generator=generator).split(batch):
                # Left-right flips are class-neutral (they only move the heart) and curb overfitting.
                flip = torch.rand(len(idx), generator=generator) < 0.5
                xb = torch.where(flip[:, None, None, None], x_train[idx].flip(3), x_train[idx])
                loss = nn.functional.cross_entropy(model(xb), y_train[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval()
        with torch.no_grad():
            predicted = model(x_all[~train]).argmax(dim=1)
    finally:
        torch.set_num_threads(threads)
    return float((predicted == y_all[~train]).float().mean())


class _MeanMaxPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def _small_cnn(width: int, blocks: int, classes: int) -> nn.Module:
    """Strided conv blocks, then average- and max-pooled features into a linear classifier."""
    channels = [1] + [width * 2**k for k in range(blocks)]
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(itertools.pairwise(channels)):
        kernel = 5 if i == 0 else 3
        conv = nn.Conv2d(c_in, c_out, kernel, stride=2, padding=kernel // 2)
        layers += [conv, nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, _MeanMaxPool(), nn.Dropout(0.2), nn.Linear(2 * channels[-1], classes))


@pytest.fixture(scope="module")
def phantoms() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return render_split(seed=2024)


def test_global_intensity_statistics_do_not_reveal_the_class(
    phantoms: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    # Mean, spread, percentiles and a 32-bin histogram; chance is 0.25.
    assert stats_accuracy(*phantoms) < 0.5


def test_a_small_cnn_learns_the_classes(phantoms: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    assert cnn_accuracy(*phantoms) > 0.85


def test_examples_are_one_new_image_per_class_never_one_of_the_dataset(tmp_path: Path) -> None:
    examples = write_examples(tmp_path / "examples", seed=3, image_size=64)
    assert sorted(examples) == sorted(CLASSES)
    write_synthetic_dataset(tmp_path / "raw", per_class=3, seed=3, image_size=64, mask_size=64)
    for label, path in examples.items():
        assert path.name == f"{label}-example.png"
        example = np.asarray(Image.open(path))
        assert example.shape == (64, 64)
        dataset = [np.asarray(Image.open(p)) for p in (tmp_path / "raw" / label / "images").glob("*.png")]
        assert len(dataset) == 3 and not any(np.array_equal(example, image) for image in dataset)
    again = write_examples(tmp_path / "again", seed=3, image_size=64)
    assert all(again[c].read_bytes() == examples[c].read_bytes() for c in CLASSES)  # reproducible


def test_a_synthesis_never_mixes_with_files_it_would_not_replace(tmp_path: Path) -> None:
    """From Python, a re-run with fewer images kept the first run's others: an ingest found 12 a class
    where the second run wrote 5 (its metadata listing 5)."""
    write_synthetic_dataset(tmp_path / "raw", per_class=3, seed=0, image_size=64, mask_size=64)
    write_synthetic_dataset(tmp_path / "raw", per_class=3, seed=1, image_size=64, mask_size=64)  # replaced
    with pytest.raises(
        FileExistsError, match=r"1 file\(s\) this synthesis would not replace, such as COVID-3\.png"
    ):
        write_synthetic_dataset(tmp_path / "raw", per_class=2, seed=1, image_size=64, mask_size=64)
    assert len(list((tmp_path / "raw/COVID/images").iterdir())) == 3  # nothing written, nothing deleted
    # A folder no synthesis marked, as a copy of the real database, whose X-rays are named as phantoms are:
    # a synthesis of as many images had replaced them and their metadata.
    real = tmp_path / "real"
    write_png(real / "COVID/images/COVID-1.png", xray(1, 64))
    before = (real / "COVID/images/COVID-1.png").read_bytes()
    with pytest.raises(FileExistsError, match="no synthesis wrote them"):
        write_synthetic_dataset(real, per_class=50, seed=0, image_size=64, mask_size=64)
    assert (real / "COVID/images/COVID-1.png").read_bytes() == before and not (
        real / "COVID.metadata.xlsx"
    ).exists()


def test_the_demo_writes_its_phantoms_afresh_and_never_over_files_it_did_not_mark(tmp_path: Path) -> None:
    from cxrcore.config import ConfigError
    from cxrcore.pipeline import _own_raw

    raw = tmp_path / "cxr-demo/raw"
    write_synthetic_dataset(raw, per_class=3, seed=0, image_size=64, mask_size=64)
    assert _own_raw(raw) == raw and not raw.exists()  # its own: written again with any --per-class
    write_png(raw / "COVID/images/COVID-1.png", xray(1, 64))  # an earlier cxr's demo, or anyone's files
    with pytest.raises(ConfigError, match="no synthesis of this cxr marked as its own"):
        _own_raw(raw)
    assert (raw / "COVID/images/COVID-1.png").is_file()
