"""The raw dataset layout: find the images and their labels, pair images with masks, read metadata, report
problems.

Three layouts are read. The COVID-19 Radiography Database's: `<Class>/images/*.png`, `<Class>/masks/*.png`
and `<Class>.metadata.xlsx`. Class folders holding their images directly (`<Class>/*.png|jpg|dcm`), as
other hospitals' data often arrives. And a flat folder of images with a CSV or XLSX label file that names
each image and its label. A label (or class folder name) becomes a class through an explicit mapping or by
already being a class name; one that maps to none is reported with its files, never guessed.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlparse

from cxrcore.labels import CLASSES, canonical_class, class_index

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima"})
IMAGE_SUFFIXES = (
    frozenset({".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".bmp", ".tif", ".tiff", ".webp", ".jp2"})
    | DICOM_SUFFIXES
)  # .jfif: a JPEG as Windows names it; .webp and .jp2 as some viewers export (Pillow reads both)
LABEL_FILE_SUFFIXES = (".csv", ".xlsx")
# Label file columns tried in order when --file-column / --label-column are not given; compared without
# case, spaces, underscores or hyphens, so "FILE NAME", "file_name" and "Filename" all read "filename".
FILE_COLUMNS = ("filename", "file", "imagefile", "imagename", "image", "imageid", "imageindex", "path",
                "filepath", "imagepath")  # fmt: skip
LABEL_COLUMNS = ("label", "class", "finding", "diagnosis")
PATIENT_COLUMNS = ("patientid", "patient", "subjectid", "subject", "patientnumber", "mrn",
                   "medicalrecordnumber", "patid")  # fmt: skip
"""Label file columns taken for the patient, compared like FILE_COLUMNS (NIH's "Patient ID", MIMIC's
subject_id)."""
MIN_SIDE = 64
"""Images smaller than this on either side are refused (`cxr data ingest --min-side`)."""
MASK_ASPECT_TOLERANCE = 0.05
"""How much the aspect ratios of an image and its mask may differ before the pair is mismatched."""
LISTED = 20
"""Files named per problem in messages; the JSON reports keep every one."""

# Hosts that serve many unrelated collections: the first path segment names the collection.
_COLLECTION_HOSTS = frozenset({"github.com", "kaggle.com", "gitlab.com", "huggingface.co"})
_METADATA_SUFFIX = ".metadata.xlsx"
_COLUMN_SEPARATORS = re.compile(r"[\s_\-]+")

ClassMapper = Callable[[str], str | None]
_LabelRow = tuple[str, str, str | None, str]  # file, label, URL, patient: one row of a label file


class LayoutError(ValueError):
    """The folder holds no usable dataset; the message says what was expected."""


@dataclass(frozen=True)
class ManifestEntry:
    """One image of the raw dataset, with its mask (if any) and where it came from."""

    image_path: str
    mask_path: str | None
    label: str
    file: str
    url: str | None
    source: str
    patient: str = ""
    """The patient the label file names ("" where it names none): a patient's images share a split."""


@dataclass(frozen=True)
class LabelFile:
    """A CSV or XLSX naming each image of a flat folder and its label; a column left None is found by name
    (FILE_COLUMNS, LABEL_COLUMNS, PATIENT_COLUMNS). A URL column, when there is one, gives each image's
    source; a patient column its patient ("none": no patient column)."""

    path: str
    label_column: str | None = None
    file_column: str | None = None
    patient_column: str | None = None

    @classmethod
    def from_flags(
        cls,
        labels: str | None,
        label_column: str | None = None,
        file_column: str | None = None,
        patient_column: str | None = None,
    ) -> LabelFile | None:
        """The label file that --labels and its column flags describe; None for class folders."""
        chosen = (patient_column or "").strip().lower()
        if labels is not None and chosen == PATIENT_FOLDER:
            raise LayoutError(
                "--patient-column folder: the patients are the folders below each class folder; a label "
                "file's images lie in one folder, so name its patient column instead"
            )
        if labels is None:  # `--patient-column none` or `folder` stand alone (none: no DICOM PatientID)
            named = patient_column is not None and chosen not in ("none", PATIENT_FOLDER)
            if label_column is not None or file_column is not None or named:
                raise LayoutError(
                    "--label-column, --file-column and --patient-column name columns of a label file: pass "
                    "--labels FILE too"
                )
            return None
        return cls(labels, label_column, file_column, patient_column)


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
    label_file: dict[str, str | None] | None = None
    """The label file and the columns read from it (path, file_column, label_column, url_column,
    patient_column)."""
    unmapped: dict[str, list[str]] = field(default_factory=dict)
    """Label (or class folder name) → the images it labels, for labels that map to no class."""
    conflicting_labels: dict[str, list[str]] = field(default_factory=dict)
    """Image → its labels, for images the label file gives labels of different classes."""
    missing_files: list[str] = field(default_factory=list)
    """Files the label file names that are not in the folder."""
    unlabelled: list[str] = field(default_factory=list)
    """Images in the folder that the label file does not name."""
    unknown_folders: list[str] = field(default_factory=list)
    orphan_masks: list[str] = field(default_factory=list)
    unmatched_metadata: dict[str, list[str]] = field(default_factory=dict)
    unreadable: list[dict[str, str]] = field(default_factory=list)
    """Images ingest would refuse (undecodable, too small, blank), each with why."""
    mask_problems: list[dict[str, str]] = field(default_factory=list)
    """Masks ingest would leave out (undecodable, another shape, no lung or only lung), each with why."""
    duplicate_groups: list[list[str]] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    """Files in the class folders (or the flat folder, but label files) that are not images by their
    suffix, nor DICOMs by their bytes: not read (a GIF, a PDF report, a DICOM of another byte order)."""
    warnings: list[str] = field(default_factory=list)
    """What the scan read otherwise than a user may expect: mask folders not read, a label CSV read as
    Windows-1252, a metadata workbook without a file name column."""
    checked_files: bool = False

    @property
    def usable(self) -> bool:
        """True when at least one image of a known class is (as far as checked) readable."""
        return sum(r.images - r.unreadable for r in self.classes.values()) > 0

    @property
    def sources(self) -> dict[str, int]:
        """Images per source (metadata URL host), most first: the names --test-sources takes."""
        counts = Counter(entry.source for entry in self.entries)
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    def refusal(self) -> str | None:
        """Why ingest stops unless told to leave images out (labels mapping to no class, or to two); None
        when every labelled image has exactly one class."""
        if not self.unmapped and not self.conflicting_labels:
            return None
        count = sum(map(len, self.unmapped.values())) + len(self.conflicting_labels)
        lines = [f"no cxr class for {count} of the images under {self.root}:"]
        for label, paths in sorted(self.unmapped.items()):
            lines.append(
                f"  label {label!r} maps to no class ({len(paths)}): {format_paths(paths, self.root)}"
            )
        conflicting = sorted(self.conflicting_labels.items())
        for path, labels in conflicting[:LISTED]:
            named = ", ".join(map(repr, labels))
            lines.append(f"  {format_paths([path], self.root)} has labels of different classes: {named}")
        if len(conflicting) > LISTED:
            lines.append(f"  and {len(conflicting) - LISTED} more images with labels of different classes")
        advice = []
        if self.unmapped:
            advice.append(
                f'map each label to a class with --map "LABEL=CLASS,..." (classes: {", ".join(CLASSES)})'
            )
        if conflicting:  # no --map mends two rows that disagree: the label file must
            advice.append("give each image one label in the label file (its rows above disagree)")
        lines.append(f"{', or '.join(advice)}, or leave these images out with --skip-unmapped")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "usable": self.usable,
            "checked_files": self.checked_files,
            # In the classes' own order (COVID, Lung_Opacity, Normal, Viral Pneumonia), whatever the folders'.
            "classes": {
                name: dataclasses.asdict(self.classes[name])
                for name in sorted(self.classes, key=lambda name: CLASSES.index(name))
            },
            "totals": dataclasses.asdict(_sum_reports(self.classes.values())),
            "sources": self.sources,
            "label_file": self.label_file,
            "refusal": self.refusal(),
            "unmapped": self.unmapped,
            "conflicting_labels": self.conflicting_labels,
            "missing_files": self.missing_files,
            "unlabelled": self.unlabelled,
            "unknown_folders": self.unknown_folders,
            "orphan_masks": self.orphan_masks,
            "unmatched_metadata": self.unmatched_metadata,
            "unreadable": self.unreadable,
            "mask_problems": self.mask_problems,
            "duplicate_groups": self.duplicate_groups,
            "skipped_files": self.skipped_files,
            "warnings": self.warnings,
        }


def scan_layout(
    root: str | os.PathLike[str],
    label_file: LabelFile | None = None,
    label_map: Mapping[str, str] | None = None,
) -> LayoutScan:
    """Scan a raw dataset folder without decoding any image.

    Without a label file, `root` holds class folders (or wraps exactly one folder of them, up to three levels
    down):
    spelled with spaces, underscores or another case, images in `<Class>/images/` or directly in
    `<Class>/`, masks in `<Class>/masks/` paired by file stem. With one, `root` is a flat folder of images.
    `label_map` maps the dataset's own labels (or folder names), compared without case, to classes.
    """
    to_class = class_mapper(label_map or {})
    warnings: list[str] = []
    try:
        with _warnings_kept(warnings):
            if label_file is None:
                scan = _scan_class_folders(_find_dataset_root(Path(root), to_class), to_class)
            else:
                scan = _scan_flat_folder(Path(root), label_file, to_class)
        if not scan.entries:
            raise LayoutError(scan.refusal() or _nothing_found(scan))
    except BaseException:
        log_warnings(warnings)  # no report will carry them
        raise
    scan.warnings = warnings
    return scan


def log_warnings(warnings: Iterable[str]) -> None:
    """Log a scan's warnings: for a run that stops before the report that would have carried them."""
    for warning in warnings:
        log.warning("%s", warning)


@contextmanager
def _warnings_kept(into: list[str]) -> Iterator[None]:
    """The warnings this module logs while the block runs, kept in `into` rather than logged: the scan's
    report carries them (`cxr data check`, its --json, ingest_report.json), printed once, with the rest."""

    def keep(record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        into.append(record.getMessage())
        return False

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def check_layout(
    root: str | os.PathLike[str],
    label_file: LabelFile | None = None,
    label_map: Mapping[str, str] | None = None,
    *,
    workers: int | None = None,
    min_side: int = MIN_SIDE,
) -> LayoutScan:
    """scan_layout plus a full decode of every image and mask with ingest's checks (`image_problem`,
    `mask_problem`), and exact-duplicate detection."""
    from cxrcore.data.transforms import ImageDecodeError

    scan = scan_layout(root, label_file, label_map)

    def inspect(entry: ManifestEntry) -> tuple[str | None, str | None, str | None]:
        """The image's digest, or why ingest would refuse it; why it would leave its mask out."""
        try:
            data = Path(entry.image_path).read_bytes()
            image = decode_image(data, entry.image_path)
        except OSError as exc:
            return None, read_problem(entry.image_path, exc), None
        except ImageDecodeError as exc:
            return None, str(exc), None
        if problem := image_problem(image, min_side):
            return None, problem, None
        digest = hashlib.sha256(data).hexdigest()
        if not entry.mask_path:
            return digest, None, None
        try:
            mask = decode_image(Path(entry.mask_path).read_bytes(), entry.mask_path)
        except OSError as exc:
            return digest, None, read_problem(entry.mask_path, exc)
        except ImageDecodeError as exc:
            return digest, None, str(exc)
        return digest, None, mask_problem(mask, image.shape)

    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = list(pool.map(inspect, scan.entries))

    by_digest: dict[str, list[ManifestEntry]] = defaultdict(list)
    for entry, (digest, problem, mask_trouble) in zip(scan.entries, results, strict=True):
        if problem is not None:
            scan.unreadable.append({"path": entry.image_path, "reason": problem})
            scan.classes[entry.label].unreadable += 1
        elif digest is not None:
            by_digest[digest].append(entry)
        if mask_trouble is not None and entry.mask_path:
            scan.mask_problems.append({"path": entry.mask_path, "reason": mask_trouble})
    for same in by_digest.values():
        if len(same) > 1:
            ordered = sorted(same, key=lambda entry: entry.image_path)
            scan.duplicate_groups.append([entry.image_path for entry in ordered])
            for entry in ordered[1:]:
                scan.classes[entry.label].exact_duplicates += 1
    scan.duplicate_groups.sort()
    scan.checked_files = True
    return scan


def image_problem(image: np.ndarray, min_side: int) -> str | None:
    """Why a decoded image is no use for training (too small, blank), or None."""
    height, width = image.shape
    if min(height, width) < min_side:
        return f"image too small ({width}×{height}, minimum side {min_side})"
    if image.min() == image.max():
        return f"blank image (every pixel is {image.min()})"
    return None


def mask_problem(mask: np.ndarray, image_shape: tuple[int, ...]) -> str | None:
    """Why a decoded lung mask is no use for its image (another shape, no lung or only lung), or None."""
    from cxrcore.data.transforms import lung_pixels

    height, width = image_shape[:2]
    if abs(mask.shape[1] / mask.shape[0] - width / height) > MASK_ASPECT_TOLERANCE:
        return f"mask shape {mask.shape[1]}×{mask.shape[0]} does not match image {width}×{height}"
    lung = lung_pixels(mask)
    if lung.all() or not lung.any():
        marked = "every pixel" if lung.all() else "no pixel"
        return f"mask marks {marked} as lung; a lung mask marks the lungs white (or 1) on black"
    if (border := _border_share(lung)) > INVERTED_BORDER_SHARE:
        return (
            f"mask marks {border:.0%} of the image's border as lung, as an inverted mask does "
            "(lungs black on white); a lung mask marks the lungs white (or 1) on black"
        )
    return None


INVERTED_BORDER_SHARE = 0.5
"""The share of an image's outer frame (BORDER_FRACTION of each side) a mask may mark as lung: a lung mask
marks little of it (the real sample's 30 masks: 2 % on average, 16 % at most), an inverted one almost all."""
BORDER_FRACTION = 0.05


def _border_share(lung: np.ndarray) -> float:
    """The share of the frame around `lung` (BORDER_FRACTION of each side, at least a pixel) marked lung."""
    import numpy as np

    height, width = lung.shape
    rows, columns = max(1, round(height * BORDER_FRACTION)), max(1, round(width * BORDER_FRACTION))
    frame = np.ones_like(lung, dtype=bool)
    frame[rows:-rows, columns:-columns] = False
    return float(lung[frame].mean())


def read_problem(path: str | Path, exc: OSError) -> str:
    """Why a file could not be read, as check and ingest report it: a link whose target is gone says so
    and names the target ("No such file or directory" alone had sent users looking for the link itself).

    >>> import errno, tempfile
    >>> link = Path(tempfile.mkdtemp()) / "a.png"
    >>> link.symlink_to("/gone/a.png")
    >>> read_problem(link, FileNotFoundError(errno.ENOENT, "No such file or directory"))
    'cannot read file: a link to /gone/a.png, which does not exist'
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"cannot read file: a link to {_printable(os.readlink(path))}, which does not exist"
    return f"cannot read file: {exc.strerror or exc}"


def decode_image(data: bytes, name: str = "") -> np.ndarray:
    """A dataset file as uint8 grayscale: DICOM exactly as `cxr serve` decodes an upload, anything else
    with `decode_gray`. DICOM is told by its bytes, by a .dcm/.dicom name (files without a preamble), or,
    for a name without an image suffix, by bytes that start as a bare dataset does.
    Raises ImageDecodeError for every file that cannot be used, naming why, and DecoderUnavailableError
    when the machine cannot start the decoder of a compressed DICOM (no fault of the file)."""
    from cxrcore.data.transforms import DecoderUnavailableError, ImageDecodeError, decode_gray
    from cxrcore.decode import UnsupportedImageTypeError, decode_upload

    try:
        if not is_dicom(data, name):
            return decode_gray(data)
        return decode_upload(data, "application/dicom")
    except (ImageDecodeError, DecoderUnavailableError):
        raise
    except UnsupportedImageTypeError as exc:  # multi-frame or compressed beyond the installed plugins
        raise ImageDecodeError(str(exc)) from exc
    except Exception as exc:  # a decoder's own failure on an odd file: that file is unreadable, not the run
        raise ImageDecodeError(f"cannot decode: {type(exc).__name__}: {exc}") from exc


def is_dicom(data: bytes, name: str = "") -> bool:
    """Whether a dataset file is DICOM: by its bytes ("DICM" after the preamble), by a .dcm/.dicom name (a
    file without the preamble), or, named without an image suffix, by bytes that start as a bare dataset
    does (as _is_image_file found it)."""
    from cxrcore.decode import sniff_format

    suffix = Path(name).suffix.lower()
    if sniff_format(data) == "dicom" or suffix in DICOM_SUFFIXES:
        return True
    return (not suffix or suffix[1:].isdigit()) and _bare_dicom(data[:8])


DICOM_PATIENT = "PatientID (DICOM)"
"""An ingest report's patient column where the patients are the DICOMs' own (0010,0020)."""
PATIENT_FOLDER = "folder"
"""`--patient-column folder`: each image's patient is the first folder below its class folder (below its
`images/`), as exports nest a patient's films (`COVID/P0123/1.png`); the report's column names it so."""


def folder_patient(file: str) -> str:
    """The patient a class folder's image is filed under (`PATIENT_FOLDER`): the first folder of its path
    from the class folder, `images/` passed over; "" for an image directly in the class folder.

    >>> folder_patient("P0123/study-1/a.png"), folder_patient("images/P7/a.png"), folder_patient("a.png")
    ('P0123', 'P7', '')
    """
    folders = file.split("/")[:-1]
    if folders and folders[0].casefold() == "images":
        folders = folders[1:]
    return _patient_id(folders[0]) if folders else ""


def dicom_patient(data: bytes, name: str = "") -> str:
    """The PatientID (0010,0020) of DICOM bytes (is_dicom), stripped; "" for any other file, a DICOM without
    one, or a header that cannot be read (the pixels' decode says why)."""
    if not is_dicom(data, name):
        return ""
    import pydicom

    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        return _patient_id(header.get("PatientID", "") or "")
    except Exception:
        return ""


def class_mapper(label_map: Mapping[str, str]) -> ClassMapper:
    """label → class through `label_map` (keys compared without case), else the class the label names."""
    folded = {key.strip().casefold(): CLASSES[class_index(value)] for key, value in label_map.items()}

    def to_class(label: str) -> str | None:
        return folded.get(label.strip().casefold()) or canonical_class(label)

    return to_class


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


def format_paths(paths: Iterable[str], root: str, limit: int = LISTED) -> str:
    """Paths (shown relative to `root` when inside it), comma-separated, cut after `limit` with a count;
    a control character in a name (a newline, an escape sequence) shown as its escape, not sent to the
    terminal, which it had split lines of or re-coloured.

    >>> format_paths(["/raw/COVID/a\\nb.png", "/raw/COVID/\\x1b[2Jc.png"], "/raw")
    'COVID/a\\\\nb.png, COVID/\\\\x1b[2Jc.png'
    """
    items = list(paths)
    prefix = root.rstrip(os.sep) + os.sep
    shown = [_printable(p.removeprefix(prefix)) for p in items[:limit]]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(shown) + more


def _printable(name: str) -> str:
    """`name` with its control characters as Python escapes (`\\n`, `\\x1b`), the rest as it is."""
    if name.isprintable():
        return name
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in name)


_ROOT_DEPTH = 3
"""Folders below RAW searched for the one holding the class folders: archives wrap a dataset in one or two
(`chest_xray/train/NORMAL`, as the pediatric set unpacks)."""
_ROOT_WIDTH = 200
"""More folders than this at one depth are a patient tree, not wrappers: the search stops there."""


def _find_dataset_root(root: Path, to_class: ClassMapper) -> Path:
    """RAW, or the one folder below it (up to _ROOT_DEPTH levels) that holds class folders; several such
    folders (a dataset's own train/test/val) are refused, naming them."""
    if not root.is_dir():
        raise LayoutError(f"{root} is not a folder")
    level = [root]
    for _ in range(_ROOT_DEPTH + 1):
        holding = [folder for folder in level if any(to_class(child.name) for child in _folders(folder))]
        if len(holding) == 1:
            return holding[0]
        if len(holding) > 1:
            names = ", ".join(sorted(folder.relative_to(root).as_posix() for folder in holding))
            raise LayoutError(f"{root} holds several datasets ({names}); point at one of them")
        level = [child for folder in level for child in _folders(folder)]
        if not level or len(level) > _ROOT_WIDTH:
            break
    return root


def _folders(folder: Path) -> list[Path]:
    """A folder's sub-folders but hidden ones, and never mask folders or `images/`: they hold no classes."""
    try:
        children = list(folder.iterdir())
    except OSError:
        return []
    return [
        p for p in children if p.is_dir() and not p.name.startswith(".") and not _is_class_subfolder(p.name)
    ]


def _scan_class_folders(base: Path, to_class: ClassMapper) -> LayoutScan:
    scan = LayoutScan(root=str(base))
    metadata_files = _metadata_files(base, to_class)
    read: dict[str, Path] = {}  # each class folder read, by its real path
    folders_of: dict[str, list[str]] = {}
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = to_class(folder.name)
        if label is None:
            _note_unknown_folder(folder, scan)
            continue
        if (same := read.get(real := os.path.realpath(folder))) is not None:
            # `normal -> Normal`: its images had been counted, ingested and split twice
            log.warning("%s is %s (a link to it): its images are read once, as %s's", folder, same, same)
            continue
        read[real] = folder
        folders_of.setdefault(label, []).append(f"{folder.name}/")
        report = scan.classes.setdefault(label, ClassReport())
        _scan_class(folder, label, report, scan, metadata_files.get(label), to_class)
    for label, names in folders_of.items():
        if len(names) > 1:  # `covid/` beside `COVID/`: one class, which a user may not have meant
            log.warning("%d folders are read as class %s: %s", len(names), label, ", ".join(names))
    _warn_skipped(scan.skipped_files, base)
    return scan


def _warn_skipped(paths: list[str], root: Path) -> None:
    """One warning naming the files a scan did not read as images, by suffix, and the first of them."""
    if not paths:
        return
    suffixes = Counter(os.path.splitext(path)[1].lower() or "(no suffix)" for path in paths)
    kinds = ", ".join(f"{suffix} {n}" for suffix, n in suffixes.most_common())
    log.warning(
        "%d file(s) are not images and were not read (%s): %s; an image in another format is read once "
        "converted to PNG (or DICOM with its preamble)",
        len(paths), kinds, format_paths(paths, str(root), limit=5),
    )  # fmt: skip


def _note_unknown_folder(folder: Path, scan: LayoutScan) -> None:
    """A folder named like no class: its images have an unmapped label; without images it is only noted.
    `images/` and mask folders are never labels themselves, even when RAW points one level too deep."""
    images = [] if _is_class_subfolder(folder.name) else _class_files(folder).images
    if images:
        scan.unmapped[folder.name] = [image.path for image in images]
    else:
        scan.unknown_folders.append(str(folder))


def _metadata_files(base: Path, to_class: ClassMapper) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in base.iterdir():
        if path.is_file() and path.name.lower().endswith(_METADATA_SUFFIX):
            label = to_class(path.name[: -len(_METADATA_SUFFIX)])
            if label is not None:
                found[label] = path
    return found


def _image_paths(folder: Path) -> list[Path]:
    """Image files directly in a folder, sorted, told as the class folders' scan tells them (a DICOM named
    by UID or without an extension by its bytes); hidden files (macOS `._*` forks among them) skipped."""
    return sorted(
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.is_file() and _is_image_file(p.name, str(p))
    )


class _ImageFile(NamedTuple):
    """An image file found below a folder."""

    key: str
    """Its path from the folder without the suffix, `images/` and its mask folder, case-folded: an image and
    its mask share one."""
    path: str
    relative: str
    """Its path from the folder, with `/` between folders."""
    stem: str
    """Its name without the suffix, case-folded: what a metadata sheet names."""


class _Found(NamedTuple):
    """The image files below a folder, the masks among them, and the other files (paths), not read."""

    images: list[_ImageFile]
    masks: list[_ImageFile]
    others: list[str]


def _file_stem(name: str) -> str:
    """A file name without its image suffix. A name whose last dot starts no image suffix is its own stem:
    a DICOM named by UID (1.2.840.113619.2.55.3.1000) has no extension, and cutting `.1000` would give it
    the stem of every image of that study, to pair with their masks and metadata rows."""
    stem, suffix = os.path.splitext(name)
    return stem if suffix.lower() in IMAGE_SUFFIXES else name


_MASK_WORDS = frozenset({"mask", "masks", "lungmask", "lungmasks", "segmask", "segmasks"})


def _is_mask_folder(name: str) -> bool:
    """A folder of masks, however a dataset names it: `masks` (the Kaggle database), `lung masks`
    (COVID-QU-Ex, by the same authors), `mask`, `Masks`, `lung_masks`, `LungMasks`. Its files are never
    X-rays, at any depth. A word of its name, not a part of one: `DAMASKE^HANS`, a patient folder as a
    PACS export names it, holds X-rays."""
    words = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+", name)
    return any(word.casefold() in _MASK_WORDS for word in words)


def _is_class_subfolder(name: str) -> bool:
    return name.casefold() == "images" or _is_mask_folder(name)


def _is_image_file(name: str, path: str) -> bool:
    """An image by its suffix; a file without one, or with a number for one (a UID such as
    1.2.840.113619.2.55.3.1234), is a DICOM when its bytes say so, as PACS exports name them: "DICM" after
    the preamble, or a bare dataset (no preamble, as `dcmwrite` without file meta and older modalities
    write it) starting with a tag of group 0002 or 0008, which were skipped without a word."""
    suffix = os.path.splitext(name)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix and not suffix[1:].isdigit():
        return False
    try:
        with open(path, "rb") as file:
            head = file.read(132)
    except OSError:
        return False
    return head[128:] == b"DICM" or _bare_dicom(head)


def _bare_dicom(head: bytes) -> bool:
    """Whether bytes start as a DICOM dataset without its preamble: a tag of group 0002 (file meta) or 0008
    (identification), little endian, as every dataset's first element is."""
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00")


_SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})
"""Files Windows' Explorer leaves in a folder of pictures: not the user's, never listed as skipped."""


def _images_under(folder: Path, skip: frozenset[str] = frozenset()) -> _Found:
    """Image files in `folder` and every folder below it (one per patient or study, as exports nest them),
    but not in hidden folders or, directly in `folder`, those named in `skip` (case-folded). In name
    order, a folder's files before its sub-folders'.

    A mask folder at any depth holds masks, not images: those of one per folder (`_mask_folder`) are keyed
    as if they sat beside it, and `images/` adds nothing to keys either, so `masks/p1/x.png`,
    `p1/masks/x.png` and `p1/lung masks/x.png` each pair with `p1/x.png` and `p1/images/x.png`."""
    found = _Found([], [], [])
    seen: set[str] = set()  # folders already walked, by real path: a link to a parent is walked once

    def walk(directory: str, prefix: str, key_prefix: str, into: list[_ImageFile]) -> None:
        real = os.path.realpath(directory)
        if real in seen:
            return
        seen.add(real)
        with os.scandir(directory) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
        below = []
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name.casefold() in _SYSTEM_FILES:  # hidden, macOS `._*` forks too
                continue
            if entry.is_dir():  # through links too
                if prefix or name.casefold() not in skip:
                    below.append(entry)
            elif _is_image_file(name, entry.path):
                stem = _file_stem(name)
                into.append(_ImageFile(fold(key_prefix + stem), entry.path, prefix + name, fold(stem)))
            else:
                found.others.append(entry.path)
        in_images = into is found.images
        for entry in below:
            if not (in_images and _is_mask_folder(entry.name)):
                key = "" if entry.name.casefold() == "images" else f"{entry.name}/"
                walk(entry.path, f"{prefix}{entry.name}/", key_prefix + key, into)
        if in_images and (masks := _mask_folder(directory, below)):
            walk(masks.path, f"{prefix}{masks.name}/", key_prefix, found.masks)

    walk(str(folder), "", "", found.images)
    return found


def _mask_folder(directory: str, folders: list[os.DirEntry[str]]) -> os.DirEntry[str] | None:
    """The mask folder among a folder's sub-folders whose masks are read. Where there are several, a lung
    mask folder first (COVID-QU-Ex puts `infection masks` beside `lung masks`, and cxr's masks are lungs),
    then one named `masks`, then the first by name; the warning names the others, which are not read."""
    candidates = [entry for entry in folders if _is_mask_folder(entry.name)]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    chosen = min(
        candidates, key=lambda e: ("lung" not in e.name.casefold(), e.name.casefold() != "masks", e.name)
    )
    others = ", ".join(repr(entry.name) for entry in candidates if entry is not chosen)
    log.warning("%s: masks read from %r only, not from %s", directory, chosen.name, others)
    return chosen


def image_files(folder: str | os.PathLike[str]) -> list[str]:
    """Every image file below `folder` as the scan finds them (by suffix, or DICOM by its bytes), sorted,
    but those in mask folders below it (`cxr predict COVID/` sends the X-rays, not their masks)."""
    return [image.path for image in _images_under(Path(folder)).images]


def _class_files(folder: Path) -> _Found:
    """A class folder's images, those in `images/` (keyed from there) and any elsewhere in the folder, and
    its masks, from mask folders at any depth."""
    images_dir = _subfolder(folder, "images")
    if images_dir is None:
        return _images_under(folder)
    inside = _images_under(images_dir)
    beside = _images_under(folder, skip=frozenset({"images"}))
    return _Found(inside.images + beside.images, inside.masks + beside.masks, inside.others + beside.others)


def _subfolder(folder: Path, name: str) -> Path | None:
    return next((p for p in folder.iterdir() if p.is_dir() and p.name.casefold() == name), None)


def _scan_class(
    folder: Path,
    label: str,
    report: ClassReport,
    scan: LayoutScan,
    metadata_path: Path | None,
    to_class: ClassMapper,
) -> None:
    images, mask_files, others = _class_files(folder)
    scan.skipped_files.extend(others)
    _refuse_nested_classes(folder, label, images, to_class)
    masks = _masks_by_image_key(mask_files, {image.key for image in images})
    kept = set(masks.values())
    for mask in mask_files:  # `COVID-3.png` and `.PNG`: one image, one mask; the other had gone unsaid
        if mask.path not in kept:
            other = masks.get(mask.key) or masks.get(_MASK_SUFFIX.sub("", mask.key)) or ""
            shown = format_paths([other], str(folder))
            scan.mask_problems.append(
                {"path": mask.path, "reason": f"a second mask for the same image (the one read: {shown})"}
            )
    urls = _read_metadata(metadata_path) if metadata_path else {}

    for image in images:
        url = urls.get(image.stem)
        scan.entries.append(
            ManifestEntry(
                image_path=image.path,
                mask_path=masks.get(image.key),
                label=label,
                file=image.relative,
                url=url,
                source=source_of(url),
            )
        )
    keys = {image.key for image in images}
    paired = sum(1 for image in images if image.key in masks)
    report.images += len(images)
    report.masks += len(masks)
    report.pairs += paired
    report.images_without_mask += len(images) - paired
    orphans = sorted(masks[key] for key in masks.keys() - keys)
    report.masks_without_image += len(orphans)
    scan.orphan_masks.extend(orphans)
    if metadata_path is not None:
        report.metadata_matched += sum(1 for image in images if image.stem in urls)
        unmatched = sorted(urls.keys() - {image.stem for image in images})
        report.metadata_unmatched += len(unmatched)
        if unmatched:
            scan.unmatched_metadata[str(metadata_path)] = unmatched


def _refuse_nested_classes(folder: Path, label: str, images: list[_ImageFile], to_class: ClassMapper) -> None:
    """Stop where a folder below a class folder is named as another class: its images would all be
    labelled `label`. It happens when RAW wraps a dataset's splits, `chest_xray/{train,test}/{NORMAL,
    PNEUMONIA}`, and `chest_xray` is mapped to a class to get past "maps to no class"."""
    nested: dict[str, str] = {}
    for parent in sorted({PurePosixPath(image.relative).parent for image in images}):
        for depth in range(1, len(parent.parts) + 1):
            name = parent.parts[depth - 1]
            other = None if name.casefold() == "images" else to_class(name)
            if other is not None and other != label:
                nested.setdefault(PurePosixPath(*parent.parts[:depth]).as_posix(), other)
                break
    if nested:
        named = format_paths([f"{path}/ ({other})" for path, other in nested.items()], "")
        raise LayoutError(
            f"{folder}, read as class {label}, holds folders named as other classes: {named}; each image "
            f"below it would be labelled {label}. Point RAW at the folder that holds the class folders "
            "(one split of a dataset that has several), or rename those folders"
        )


_MASK_SUFFIX = re.compile(r"[ _.-]?(lungs?[ _-]?)?mask$")
"""How a mask's name may end where its image's does not: `CHNCXR_0001_0_mask.png` (the Shenzhen set),
`a-mask.png`, `a_lung_mask.png`."""


def _masks_by_image_key(masks: list[_ImageFile], image_keys: set[str]) -> dict[str, str]:
    """Each mask's path by the key of the image it pairs with: the same key, or, for a mask whose name adds
    `_mask` (or the like) to its image's, the key without it, where no mask has that image's name. A mask
    that pairs with no image keeps its own key: the scan reports it as an orphan. One that adds `_mask` to
    the name of an image that has a mask already is left out: the scan reports it as a second mask."""
    paired: dict[str, str] = {}
    renamed = []
    for mask in masks:
        stripped = _MASK_SUFFIX.sub("", mask.key)
        if mask.key not in image_keys and stripped != mask.key and stripped in image_keys:
            renamed.append((stripped, mask))
        else:
            paired.setdefault(mask.key, mask.path)
    for key, mask in renamed:
        paired.setdefault(key, mask.path)
    return paired


def _scan_flat_folder(root: Path, label_file: LabelFile, to_class: ClassMapper) -> LayoutScan:
    """The images directly in `root`, labelled by the label file's rows."""
    if not root.is_dir():
        raise LayoutError(f"{root} is not a folder")
    rows, columns = _read_label_rows(label_file)
    scan = LayoutScan(root=str(root), label_file=columns)
    images = _image_paths(root)
    read = set(images)
    scan.skipped_files = [
        str(p)
        for p in sorted(root.iterdir())
        if p not in read and not p.name.startswith(".") and p.suffix.lower() not in LABEL_FILE_SUFFIXES
        and p.name.casefold() not in _SYSTEM_FILES and p.is_file()
    ]  # fmt: skip
    _warn_skipped(scan.skipped_files, root)
    find = _image_finder(root, images)
    labels_of: dict[Path, list[str]] = {}
    url_of: dict[Path, str | None] = {}
    patient_of: dict[Path, str] = {}
    missing: dict[str, None] = {}
    for name, label, url, patient in rows:
        path = find(name)
        if path is None:
            missing[name] = None
            continue
        labels_of.setdefault(path, []).append(label)
        url_of.setdefault(path, url)
        patient_of.setdefault(path, patient)
    for path, labels in labels_of.items():
        _add_labelled_image(scan, path, labels, url_of[path], to_class, patient_of[path])
    scan.classes = {name: scan.classes[name] for name in CLASSES if name in scan.classes}
    scan.unmapped = dict(sorted(scan.unmapped.items()))
    scan.missing_files = list(missing)
    scan.unlabelled = [str(p) for p in images if p not in labels_of]
    return scan


def _add_labelled_image(
    scan: LayoutScan, path: Path, labels: list[str], url: str | None, to_class: ClassMapper, patient: str = ""
) -> None:
    """Enter one image the label file names: a manifest entry when its labels give exactly one class."""
    distinct = list(dict.fromkeys(labels))
    classes = {to_class(label) for label in distinct}
    if len(classes) > 1:
        scan.conflicting_labels[str(path)] = distinct
        return
    label = classes.pop()
    if label is None:
        scan.unmapped.setdefault(distinct[0], []).append(str(path))
        return
    scan.entries.append(ManifestEntry(str(path), None, label, path.name, url, source_of(url), patient))
    report = scan.classes.setdefault(label, ClassReport())
    report.images += 1
    report.images_without_mask += 1


def fold(name: str) -> str:
    """A file name as names are compared: without case, and composed (NFC). A name copied from macOS often
    arrives decomposed (NFD: "Mu\u0308ller"), and a label file's, typed, composed: they looked the same in
    the error that said no image was named."""
    import unicodedata

    return unicodedata.normalize("NFC", name).casefold()


def _image_finder(root: Path, images: list[Path]) -> Callable[[str], Path | None]:
    """How a label file's file value finds its image: a path relative to RAW (or absolute) that exists,
    else the file name in RAW, with or without its extension, compared without case."""
    by_name = {fold(p.name): p for p in images}
    stems = {p: fold(_file_stem(p.name)) for p in images}
    counts = Counter(stems.values())
    by_stem = {stem: p for p, stem in stems.items() if counts[stem] == 1}  # x.png + x.dcm: ask

    def find(value: str) -> Path | None:
        posix = PurePosixPath(value.replace("\\", "/"))
        if len(posix.parts) > 1 and (root / posix).is_file():
            return root / posix
        name = fold(posix.name)
        return by_name.get(name) or by_stem.get(_file_stem(name))

    return find


def _read_label_rows(label_file: LabelFile) -> tuple[list[_LabelRow], dict[str, str | None]]:
    """(file, label, URL) per row with a file name, and the columns they were read from."""
    path = label_file.path
    frame = _read_label_frame(Path(path), label_file.file_column)
    columns = [str(c) for c in frame.columns]
    file_column = _pick_column(columns, label_file.file_column, FILE_COLUMNS, "--file-column", "file", path)
    label_column = _pick_column(
        columns, label_file.label_column, LABEL_COLUMNS, "--label-column", "label", path
    )
    url_column = next((c for c in columns if _column_key(c) == "url"), None)
    urls = frame[url_column] if url_column else [""] * len(frame)
    patient_column = _patient_column(columns, label_file.patient_column, path)
    patients = frame[patient_column] if patient_column else [""] * len(frame)
    rows = [
        (str(name).strip(), str(label).strip(), str(url).strip() or None, _patient_id(patient))
        for name, label, url, patient in zip(
            frame[file_column], frame[label_column], urls, patients, strict=True
        )
        if str(name).strip()
    ]
    used = {"path": path, "file_column": file_column, "label_column": label_column, "url_column": url_column}
    return rows, {**used, "patient_column": patient_column}


def _patient_id(value: Any) -> str:
    """A patient id as ids are compared: stripped, composed (NFC: "Müller" typed and copied alike)."""
    import unicodedata

    return unicodedata.normalize("NFC", str(value).strip())


def _patient_column(columns: list[str], wanted: str | None, path: str) -> str | None:
    """The label file's patient column: the one --patient-column names, else one named like a patient's
    (PATIENT_COLUMNS), else None; "none" takes none."""
    if wanted is not None and wanted.strip().lower() == "none":
        return None
    if wanted is not None:
        return _pick_column(columns, wanted, PATIENT_COLUMNS, "--patient-column", "patient", path)
    keys = {_column_key(column): column for column in reversed(columns)}
    return next((keys[key] for key in PATIENT_COLUMNS if key in keys), None)


HEADER_ROWS = 10
"""Rows of a label workbook searched for its header: an export puts a title and a date above it."""


def _read_label_frame(path: Path, file_column: str | None = None) -> Any:
    import pandas as pd

    if not path.is_file():
        raise LayoutError(f"--labels: {path} {'is not a file' if path.exists() else 'does not exist'}")
    if path.suffix.lower() not in LABEL_FILE_SUFFIXES:
        raise LayoutError(f"--labels: {path} is neither CSV nor XLSX (expected a .csv or .xlsx file)")
    if path.suffix.lower() != ".csv":
        sheet = _read_xlsx(path, "--labels: ", na_filter=False, header=None)
        if sheet.empty:
            return sheet
        # The header: the first row among the top ones holding the file column (by --file-column's name or
        # a FILE_COLUMNS one), else the first row, read as before.
        wanted = {_column_key(file_column)} if file_column else set(FILE_COLUMNS)
        at = next(
            (row for row in range(min(HEADER_ROWS, len(sheet)))
             if any(_column_key(str(cell)) in wanted for cell in sheet.iloc[row])),
            0,
        )  # fmt: skip
        cells = [str(cell) for cell in sheet.iloc[at]]
        header = [cell if cell.strip() else f"Unnamed: {i}" for i, cell in enumerate(cells)]
        return sheet.iloc[at + 1 :].set_axis(header, axis=1).reset_index(drop=True)
    # UTF-8 (with Excel's byte-order mark or without), else Windows-1252: what Excel's plain "CSV" saves
    # in Western European locales, an accented name (`Pneumonie virale`, `café.png`) a byte not UTF-8.
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            # sep=None sniffs the delimiter: spreadsheets export ';' where ',' is the decimal mark.
            frame = pd.read_csv(
                path, dtype=str, na_filter=False, sep=None, engine="python", encoding=encoding
            )
        except UnicodeDecodeError:
            continue
        except (ValueError, OSError) as exc:
            raise LayoutError(f"--labels: cannot read {path}: {exc}") from exc
        except csv.Error as exc:  # empty, a byte-order mark or blank lines only: no delimiter to sniff
            raise LayoutError(
                f"--labels: cannot read {path} as a table ({exc}): is it empty? It needs a header row (file "
                "and label columns) and a row per image"
            ) from exc
        if encoding != "utf-8-sig":
            log.warning("%s is not UTF-8: read as Windows-1252 (Excel's CSV in Western locales)", path)
        return frame
    raise LayoutError(f"--labels: {path} is neither UTF-8 nor Windows-1252 text: save it as CSV UTF-8")


MAX_SHEET_CELLS = 50_000_000
"""Cells a workbook's sheet may span (rows × columns up to its farthest cell): calamine builds the whole
grid, so a 4.9 KB workbook with one cell at XFD1048576 asked for 550 GB and aborted the process (an
outside review). Kaggle's sheets span 21,000 × 4."""
MAX_SHEET_XML_BYTES = 128 * 1024**2
"""A sheet's XML, unpacked, that the size check reads whole: Kaggle's 21,000-row sheets are about 3 MB."""
_CELL_REF = re.compile(rb'<c r="([A-Z]{1,3})([0-9]{1,7})"')


def _check_sheet_sizes(path: Path, prefix: str = "") -> None:
    """Refuse a workbook whose sheets span more than MAX_SHEET_CELLS, before calamine reads it."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return  # .xls, or not a workbook: calamine says what it is
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not (info.filename.startswith("xl/worksheets/") and info.filename.endswith(".xml")):
                continue
            if info.file_size > MAX_SHEET_XML_BYTES:  # read whole below: a bound on memory and time
                raise LayoutError(
                    f"{prefix}{path}: a sheet of {info.file_size:,} bytes unpacked is no metadata"
                )
            rows = columns = 0
            for letters, number in _CELL_REF.findall(archive.read(info)):
                column = 0
                for letter in letters:
                    column = column * 26 + letter - 64
                rows, columns = max(rows, int(number)), max(columns, column)
            if rows * columns > MAX_SHEET_CELLS:
                raise LayoutError(
                    f"{prefix}{path}: a sheet spans {rows:,} rows × {columns:,} columns (a cell far out, "
                    f"as at XFD1048576): over {MAX_SHEET_CELLS:,} cells; delete the stray cells or the sheet"
                )


def _read_xlsx(path: Path, prefix: str = "", **options: Any) -> Any:
    """A workbook's first sheet as strings. calamine reads it ten times faster than openpyxl (pandas'
    default until pandas 4): the scan runs in the driver, on sheets of 10,000 rows and more."""
    import pandas as pd
    from python_calamine import CalamineError

    _check_sheet_sizes(path, prefix)
    try:
        return pd.read_excel(path, dtype=str, engine="calamine", **options)
    except (ValueError, OSError, CalamineError) as exc:
        raise LayoutError(f"{prefix}cannot read {path} as an Excel workbook: {exc}") from exc


def _column_key(name: str) -> str:
    return _COLUMN_SEPARATORS.sub("", name).casefold()


def _pick_column(
    columns: list[str], wanted: str | None, candidates: tuple[str, ...], flag: str, what: str, path: str
) -> str:
    """The column `wanted` names (compared like FILE_COLUMNS), or the first candidate present."""
    by_key: dict[str, str] = {}
    for column in columns:
        by_key.setdefault(_column_key(column), column)
    if wanted is not None:
        found = by_key.get(_column_key(wanted))
        if found is None:
            close = difflib.get_close_matches(wanted, columns, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LayoutError(
                f"{flag}: {path} has no column {wanted!r}{hint}; its columns: {', '.join(columns)}"
            )
        return found
    found = next((by_key[key] for key in candidates if key in by_key), None)
    if found is None:
        raise LayoutError(
            f"{path}: no column is recognisably the {what} column; name it with {flag} "
            f"(columns: {', '.join(columns)})"
        )
    return found


def _nothing_found(scan: LayoutScan) -> str:
    """Why a scan found no labelled image, and what to change."""
    base = Path(scan.root)
    folders = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if scan.label_file is None:
        if scan.classes:  # class folders, all without an image
            named = ", ".join(name for name in folders if str(base / name) not in scan.unknown_folders)
            return (
                f"the class folders under {base} ({named}) hold no image files: expected PNG, JPEG, BMP, "
                "TIFF or DICOM files in them, in images/ or in folders below (a folder whose name says "
                "mask holds masks)"
            )
        found = ", ".join(folders) or "no folders"
        if loose := _image_paths(base):
            found += f", and {len(loose)} images directly inside: pass --labels FILE to label those"
        return (
            f"no class folder with images under {base}: expected class folders named like "
            f"{', '.join(CLASSES)} holding images/*.png (and optionally masks/*.png) or the images "
            f"directly; found: {found}"
        )
    label_path, file_column = scan.label_file["path"], scan.label_file["file_column"]
    if not scan.unlabelled:
        hint = f"; it holds folders ({', '.join(folders)}): without --labels, those are class folders"
        return f"no images directly in {base}: with --labels, RAW is a flat folder of images" + (
            hint if folders else ""
        )
    if not scan.missing_files:
        return f"--labels: {label_path} names no files (no row has a value in column {file_column!r})"
    return (
        f"no image in {base} is named in column {file_column!r} of {label_path}: it names e.g. "
        f"{', '.join(scan.missing_files[:3])}, the folder holds e.g. "
        f"{', '.join(Path(p).name for p in scan.unlabelled[:3])}; choose the column with --file-column"
    )


_URL_COLUMNS = ("url", "sourceurl", "link", "source")
"""A metadata sheet's URL column, tried in order and compared like FILE_COLUMNS."""
_HEADER_ROWS = 10
"""Rows of each metadata sheet searched for its header: a title or a note may sit above it."""


def _read_metadata(path: Path) -> dict[str, str | None]:
    """FILE NAME (case-folded stem) → URL from a `<Class>.metadata.xlsx`; empty when it names no files.
    The file column is found as a label file's is (FILE_COLUMNS), the URL column by its usual names."""
    table = _metadata_table(path)
    if table is None:
        return {}
    header, rows = table
    name_at = _column_at(header, FILE_COLUMNS)
    url_at = _column_at(header, _URL_COLUMNS)
    urls: dict[str, str | None] = {}
    url_values = rows[url_at] if url_at is not None else [None] * len(rows)
    for name, url in zip(rows[name_at], url_values, strict=True):  # iterrows took 0.1 ms a row
        if not isinstance(name, str) or not name.strip():
            continue
        stem = _file_stem(Path(name.strip()).name)
        urls[fold(stem)] = url.strip() if isinstance(url, str) and url.strip() else None
    return urls


def _metadata_table(path: Path) -> tuple[list[Any], Any] | None:
    """The header cells and the rows below them (columns by position) of the first sheet of a metadata
    workbook with a file name column: the first row of the Kaggle sheets; other workbooks put a note sheet
    first, or a title above the header. None, with a warning naming what the sheets hold, when none has
    one: metadata only gives sources, and without it they are `unknown`, as for a class without a sheet.
    Each sheet is read once, whole (calamine parses a whole sheet even for its first rows), as strings. A
    workbook that cannot be read at all stops the scan, naming what it is for."""
    import pandas as pd
    from python_calamine import CalamineError

    found = []
    _check_sheet_sizes(path)
    try:
        with pd.ExcelFile(path, engine="calamine") as workbook:
            for sheet in workbook.sheet_names:
                rows = pd.read_excel(workbook, sheet_name=sheet, header=None, dtype=str)
                for at, cells in enumerate(rows.head(_HEADER_ROWS).itertuples(index=False)):
                    if _column_at(cells, FILE_COLUMNS) is not None:
                        return list(cells), rows.iloc[at + 1 :]
                first = [cell for cell in rows.iloc[0] if isinstance(cell, str)] if len(rows) else []
                found.append(f"sheet {sheet!r}: {', '.join(first) or 'empty'}")
    except (ValueError, OSError, CalamineError) as exc:
        raise LayoutError(
            f"cannot read {path} as an Excel workbook: {exc}; it gives each image's source URL: replace it, "
            "or move it away"
        ) from exc
    log.warning(
        "%s: no sheet has a file name column (FILE NAME, filename, image, path, ...) in its first %d rows "
        "(%s): the source of its images is unknown",
        path, _HEADER_ROWS, "; ".join(found),
    )  # fmt: skip
    return None


def _column_at(cells: Iterable[Any], keys: tuple[str, ...]) -> int | None:
    """Where the header cell named like the first of `keys` there is sits (compared like FILE_COLUMNS)."""
    at: dict[str, int] = {}
    for index, cell in enumerate(cells):
        if isinstance(cell, str):
            at.setdefault(_column_key(cell), index)
    return next((at[key] for key in keys if key in at), None)


def _sum_reports(reports: Iterable[ClassReport]) -> ClassReport:
    total: Counter[str] = Counter()
    for report in reports:
        total.update(dataclasses.asdict(report))
    return ClassReport(**total)
