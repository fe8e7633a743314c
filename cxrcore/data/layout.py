"""The raw dataset layout: find class folders, pair images with masks, read metadata, report problems."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from cxrcore.labels import CLASSES, canonical_class

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
# Hosts that serve many unrelated collections: the first path segment names the collection.
_COLLECTION_HOSTS = frozenset({"github.com", "kaggle.com", "gitlab.com", "huggingface.co"})
_METADATA_SUFFIX = ".metadata.xlsx"


@dataclass(frozen=True)
class ManifestEntry:
    """One image of the raw dataset, with its mask (if any) and where it came from."""

    image_path: str
    mask_path: str | None
    label: str
    file: str
    url: str | None
    source: str


@dataclass
class ClassReport:
    """What the scan found for one class."""

    images: int = 0
    masks: int = 0
    pairs: int = 0
    images_without_mask: int = 0
    masks_without_image: int = 0
    metadata_matched: int = 0
    metadata_unmatched: int = 0
    unreadable: int = 0
    exact_duplicates: int = 0


@dataclass
class LayoutScan:
    """The result of scanning a raw dataset folder: the manifest plus everything worth reporting."""

    root: str
    entries: list[ManifestEntry] = field(default_factory=list)
    classes: dict[str, ClassReport] = field(default_factory=dict)
    unknown_folders: list[str] = field(default_factory=list)
    orphan_masks: list[str] = field(default_factory=list)
    unmatched_metadata: dict[str, list[str]] = field(default_factory=dict)
    unreadable: list[dict[str, str]] = field(default_factory=list)
    duplicate_groups: list[list[str]] = field(default_factory=list)
    checked_files: bool = False

    @property
    def usable(self) -> bool:
        """True when at least one image of a known class is (as far as checked) readable."""
        return sum(r.images - r.unreadable for r in self.classes.values()) > 0

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "usable": self.usable,
            "checked_files": self.checked_files,
            "classes": {name: dataclasses.asdict(report) for name, report in self.classes.items()},
            "totals": dataclasses.asdict(_sum_reports(self.classes.values())),
            "unknown_folders": self.unknown_folders,
            "orphan_masks": self.orphan_masks,
            "unmatched_metadata": self.unmatched_metadata,
            "unreadable": self.unreadable,
            "duplicate_groups": self.duplicate_groups,
        }


class LayoutError(ValueError):
    """The folder holds no usable dataset; the message says what was expected."""


def scan_layout(root: str | os.PathLike[str]) -> LayoutScan:
    """Scan a folder laid out like the COVID-19 Radiography Database, without decoding any image.

    Accepts the dataset folder itself or a parent holding exactly one such folder. Class folders may
    be spelled with spaces, underscores or another case; images live in `<Class>/images/` (or directly
    in `<Class>/` as in older releases), masks in `<Class>/masks/`, paired by file stem.
    """
    base = _find_dataset_root(Path(root))
    scan = LayoutScan(root=str(base))
    metadata_files = _metadata_files(base)
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = canonical_class(folder.name)
        if label is None:
            scan.unknown_folders.append(str(folder))
            continue
        report = scan.classes.setdefault(label, ClassReport())
        _scan_class(folder, label, report, scan, metadata_files.get(label))
    if not scan.entries:
        found = ", ".join(sorted(p.name for p in base.iterdir() if p.is_dir())) or "nothing"
        raise LayoutError(
            f"no images found under {base}: expected class folders named like {', '.join(CLASSES)} "
            f"holding images/*.png (and optionally masks/*.png); found: {found}"
        )
    return scan


def check_layout(root: str | os.PathLike[str], *, workers: int | None = None) -> LayoutScan:
    """scan_layout plus a full decode of every image and mask and exact-duplicate detection."""
    from cxrcore.data.transforms import ImageDecodeError, decode_gray

    scan = scan_layout(root)

    def inspect(path: str) -> tuple[str, str | None, str | None]:
        data = Path(path).read_bytes()
        try:
            decode_gray(data)
        except ImageDecodeError as exc:
            return path, None, str(exc)
        return path, hashlib.sha256(data).hexdigest(), None

    paths = [e.image_path for e in scan.entries] + [e.mask_path for e in scan.entries if e.mask_path]
    label_of = {e.image_path: e.label for e in scan.entries}
    label_of.update({e.mask_path: e.label for e in scan.entries if e.mask_path})
    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = list(pool.map(inspect, paths))

    by_digest: dict[str, list[str]] = defaultdict(list)
    image_paths = {e.image_path for e in scan.entries}
    for path, digest, error in results:
        if error is not None:
            scan.unreadable.append({"path": path, "reason": error})
            if path in image_paths:
                scan.classes[label_of[path]].unreadable += 1
        elif path in image_paths and digest is not None:
            by_digest[digest].append(path)
    for paths_with_digest in by_digest.values():
        if len(paths_with_digest) > 1:
            scan.duplicate_groups.append(sorted(paths_with_digest))
            for path in paths_with_digest[1:]:
                scan.classes[label_of[path]].exact_duplicates += 1
    scan.duplicate_groups.sort()
    scan.checked_files = True
    return scan


def source_of(url: str | None) -> str:
    """A coarse source name for a metadata URL (host, plus the collection on github-like hosts)."""
    if not url:
        return "unknown"
    parsed = urlparse(url.strip())
    host = (parsed.hostname or "").removeprefix("www.")
    if not host:
        return "unknown"
    segments = [s for s in parsed.path.split("/") if s]
    if host in _COLLECTION_HOSTS and segments:
        return f"{host}/{segments[0]}"
    return host


def _find_dataset_root(root: Path) -> Path:
    if not root.is_dir():
        raise LayoutError(f"{root} is not a folder")
    children = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if any(canonical_class(p.name) for p in children):
        return root
    candidates = [p for p in children if any(canonical_class(c.name) for c in p.iterdir() if c.is_dir())]
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(sorted(p.name for p in candidates))
        raise LayoutError(f"{root} holds several datasets ({names}); point at one of them")
    return root


def _metadata_files(base: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in base.iterdir():
        if path.is_file() and path.name.lower().endswith(_METADATA_SUFFIX):
            label = canonical_class(path.name[: -len(_METADATA_SUFFIX)])
            if label is not None:
                found[label] = path
    return found


def _image_files(folder: Path) -> dict[str, Path]:
    """Image files in a folder keyed by case-folded stem."""
    if not folder.is_dir():
        return {}
    return {
        p.stem.casefold(): p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    }


def _subfolder(folder: Path, name: str) -> Path | None:
    return next((p for p in folder.iterdir() if p.is_dir() and p.name.casefold() == name), None)


def _scan_class(
    folder: Path, label: str, report: ClassReport, scan: LayoutScan, metadata_path: Path | None
) -> None:
    images_dir = _subfolder(folder, "images") or folder
    masks_dir = _subfolder(folder, "masks")
    images = _image_files(images_dir)
    masks = _image_files(masks_dir) if masks_dir else {}
    urls = _read_metadata(metadata_path) if metadata_path else {}

    for stem, image in images.items():
        mask = masks.get(stem)
        url = urls.get(stem)
        scan.entries.append(
            ManifestEntry(
                image_path=str(image),
                mask_path=str(mask) if mask else None,
                label=label,
                file=image.name,
                url=url,
                source=source_of(url),
            )
        )
    report.images += len(images)
    report.masks += len(masks)
    report.pairs += len(images.keys() & masks.keys())
    report.images_without_mask += len(images.keys() - masks.keys())
    orphans = sorted(str(masks[s]) for s in masks.keys() - images.keys())
    report.masks_without_image += len(orphans)
    scan.orphan_masks.extend(orphans)
    if metadata_path is not None:
        report.metadata_matched += len(images.keys() & urls.keys())
        unmatched = sorted(urls.keys() - images.keys())
        report.metadata_unmatched += len(unmatched)
        if unmatched:
            scan.unmatched_metadata[str(metadata_path)] = unmatched


_NAME_COLUMN = re.compile(r"file\s*_?name", re.IGNORECASE)


def _read_metadata(path: Path) -> dict[str, str | None]:
    """FILE NAME (case-folded stem) → URL from a `<Class>.metadata.xlsx`."""
    import pandas as pd

    frame = pd.read_excel(path, dtype=str)
    name_col = next((c for c in frame.columns if _NAME_COLUMN.fullmatch(str(c).strip())), None)
    url_col = next((c for c in frame.columns if str(c).strip().upper() == "URL"), None)
    if name_col is None:
        raise LayoutError(f"{path}: no 'FILE NAME' column (columns: {', '.join(map(str, frame.columns))})")
    urls: dict[str, str | None] = {}
    for _, row in frame.iterrows():
        name = row[name_col]
        if not isinstance(name, str) or not name.strip():
            continue
        stem = (
            Path(name.strip()).stem if Path(name.strip()).suffix.lower() in IMAGE_SUFFIXES else name.strip()
        )
        url = row[url_col] if url_col is not None else None
        urls[stem.casefold()] = url.strip() if isinstance(url, str) and url.strip() else None
    return urls


def _sum_reports(reports: Iterable[ClassReport]) -> ClassReport:
    total: Counter[str] = Counter()
    for report in reports:
        total.update(dataclasses.asdict(report))
    return ClassReport(**total)
