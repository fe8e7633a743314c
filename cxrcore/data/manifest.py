"""A registered model's data manifest: every image of the dataset it was trained on, by content, with its
class, split and source.

A card names its dataset by folder and fingerprint. The folder stays where training ran: another hospital
that receives the model through a registry has the card and the weights but not the data, so it could not
tell whether its own validation images were among the model's training images (public sets copy each
other's pictures), and a dataset ingested again in place left no record of which images the model saw.
`cxr models register` keeps the manifest in the version's folder (`MANIFEST_NAME`, Parquet: sha256, phash,
label, split and source of each row: about 70 bytes an image, 1.5 MB for the full Kaggle database), and
`cxr evaluate` finds copies of the model's train and val images in any data with it, wherever the
registry is read.

The manifest proves itself: the digest of its (sha256, label, split) rows is the fingerprint the card
records (what ingest records and every reader checks), so a manifest edited or swapped since is refused.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

MANIFEST_NAME = "data_manifest.parquet"
"""The manifest's file in a registry version's folder."""
COLUMNS = ("sha256", "phash", "label", "split", "source", "mask_sha256")
"""What the manifest keeps of each row: no pixels. All but sha256, label and split where the dataset has
them (mask_sha256: datasets an earlier cxr wrote have none)."""


class ManifestError(ValueError):
    """No manifest can be made (the dataset unreadable here, or not the one the card names), or the one
    found does not match its card: the message says which, in a clause that follows "no data manifest: "."""


def dataset_manifest(dataset: str, fingerprint: str | None) -> tuple[Any, dict[str, Any]]:
    """The manifest of `dataset` (a pyarrow Table sorted by split, label and sha256, so that one dataset
    always gives the same bytes) and what the card's block records of its dataset: the columns its
    fingerprint covers, and its near-duplicate distance (`near_duplicate_bits` of its ingest, what `cxr
    evaluate` counts as a near copy) where recorded, when its fingerprint is `fingerprint`, the card's.
    Raises ManifestError saying why not."""
    import pyarrow.compute as pc

    from cxrcore.data.ingest import fingerprint_columns, parquet_files, phash_of, read_report, read_table

    if not dataset or not fingerprint:
        raise ManifestError(f"the card records no {'fingerprint' if dataset else 'dataset'}")
    try:
        report = read_report(dataset)
        present = set(parquet_files(dataset).schema.names) | {"split"}
        table = read_table(dataset, [name for name in COLUMNS if name in present])
    except (OSError, ValueError) as exc:  # gone, unreadable, changed since its ingest (DatasetError)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ManifestError(f"its dataset {dataset} cannot be read here: {reason}") from None
    found = report.get("fingerprint")  # its rows' own, which read_table checked them against
    if found != fingerprint:
        raise ManifestError(
            f"its dataset {dataset} was ingested again since the model was trained on it (fingerprint "
            f"{found}, the card's {fingerprint})"
        )
    order = pc.sort_indices(table, [("split", "ascending"), ("label", "ascending"), ("sha256", "ascending")])
    table = table.take(order).combine_chunks()
    bits = report.get("config", {}).get("near_duplicate_bits")
    return table, {
        "fingerprint_columns": list(fingerprint_columns(report)),
        "phash_of": phash_of(report),
        **({"near_duplicate_bits": int(bits)} if bits is not None else {}),
    }


def manifest_bytes(table: Any) -> bytes:
    """The manifest as Parquet: zstd, no statistics (the hashes would be their own min and max)."""
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_statistics=False)
    return sink.getvalue()


def manifest_block(table: Any, dataset: dict[str, Any], content: bytes) -> dict[str, Any]:
    """What a card's `data.manifest` records of a manifest written beside it as `content` (`dataset`: what
    dataset_manifest gave with it)."""
    import hashlib

    import pyarrow.compute as pc

    counts = pc.value_counts(table["split"]).to_pylist()
    return {
        "file": MANIFEST_NAME,
        "sha256": hashlib.sha256(content).hexdigest(),
        "images": table.num_rows,
        "by_split": {str(item["values"]): int(item["counts"]) for item in sorted(counts, key=str)},
        **dataset,
    }


def read_manifest(folder: str | Path, data: dict[str, Any]) -> Any | None:
    """The manifest kept in a checkpoint `folder` whose card's `data` block is `data` (a pyarrow Table),
    None where its card records none. Raises ManifestError where the file is missing, is not the file
    registered (its sha256, where the card records it) or does not give the card's fingerprint: edited,
    damaged, swapped or lost since registration."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxrcore.data.ingest import fingerprint_columns, table_digest

    block = data.get("manifest")
    if not isinstance(block, dict) or not block.get("file"):
        return None
    path = Path(folder) / MANIFEST_NAME  # by its own name: `file` is what the card says, not a path to follow
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(
            f"{path} is missing (the card records one of {block.get('images')} images)"
        ) from None
    except OSError as exc:
        raise ManifestError(f"{path} cannot be read: {exc.strerror or exc}") from None
    found = hashlib.sha256(content).hexdigest()
    if block.get("sha256") and found != block["sha256"]:
        raise ManifestError(
            f"{path} is not the file registered (sha256 {found[:12]}…, the card's "
            f"{str(block['sha256'])[:12]}…): it was changed or damaged since the model was registered"
        )
    try:
        table = pq.read_table(pa.BufferReader(content))
        digest = table_digest(table, fingerprint_columns(block))
    except (OSError, ValueError, KeyError) as exc:  # cut, not Parquet, a column missing
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ManifestError(f"{path} cannot be read: {reason}") from None
    if digest != data.get("fingerprint"):
        raise ManifestError(
            f"{path} holds other rows (fingerprint {digest}) than the dataset the card names "
            f"(fingerprint {data.get('fingerprint')}): it was changed since the model was registered"
        )
    return table
