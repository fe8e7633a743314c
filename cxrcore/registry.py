"""Model registry: numbered, immutable versions of checkpoints with their reports, and movable aliases.

The store is a local folder or a URI (s3://, gs://, file://), read and written through pyarrow:

    REG/<model name>/v<N>/card.json          the checkpoint's card, its `version` set to "<name>:<N>"
    REG/<model name>/v<N>/model.safetensors  the weights (a checkpoint's train_state.pt is not kept)
    REG/<model name>/v<N>/report/...         optional: an evaluation report (report.html, metrics.json, PNGs)
    REG/aliases.json                         {"production": "dual_cnn:3", ...}
    REG/aliases.log.jsonl                    every move of an alias: when, from, to, by whom

A registered card whose segmenter is a version of this registry (named by its folder, its URI or this
machine's cached copy of it) names it by its place in the registry, readable wherever the registry is;
on an object store, a card naming its segmenter by a local path is refused.

A version is written once and never changed. Several processes may register and promote at once:

- Numbers: a new version takes the number after the highest folder present and claims that folder
  exclusively before writing: mkdir on a local filesystem (atomic, also on NFS); on an object store,
  which has no exclusive create (pyarrow exposes no conditional write), a marker file that withdraws
  when anything else is in the folder (strongly consistent listing, as S3 and GCS give, makes two
  winners impossible). The loser of a race tries the next number, so numbers are never reused.
- Visibility: card.json is written last (temporary name, then renamed), so readers skip a version
  folder without one: a registration still running, or one killed midway (its number stays used).
  A failed registration removes its folder. A killed one cannot: `interrupted()` lists what such
  registrations left and `clean()` frees it, keeping a small tombstone so that the number stays used.
  A local registration holds a flock on its version folder until its card is written, and `clean()`
  leaves a folder it cannot lock alone, whatever its age (`--older-than 0` had emptied one still being
  copied, and the registration then published a card without weights). `register_once` looks for the
  checkpoint and registers it under REG/.register.lock, so two processes registering one checkpoint at
  the same moment make one version, not two.
- Aliases: `promote` reads, changes and replaces aliases.json under an exclusive lock (flock on
  REG/.lock, released by the kernel even when the holder is killed) and replaces the file whole (a
  temporary file and a rename), so readers, who take no lock, see the old or the new aliases, never a
  mix, and concurrent promotions of different aliases all land. On an object store the replacement is
  one object write (atomic) but there is no lock: two promotions at the same moment may lose one of the
  two moves (last writer wins), so promote from one process at a time there.

>>> registry = ModelRegistry("cxr-runs/registry")  # doctest: +SKIP
>>> registry.register("cxr-runs/dual/checkpoint_epoch_009", report="reports/dual").ref  # doctest: +SKIP
'dual_cnn:1'
>>> registry.promote("dual_cnn:1").aliases, registry.local_checkpoint("production")  # doctest: +SKIP
(('production',), PosixPath('.../cxr-runs/registry/dual_cnn/v1'))
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from cxrcore import provenance
from cxrcore.data.storage import (
    cache_folder,
    cache_key,
    exists,
    file_sha256,
    name_the_place,
    open_lock_file,
    read_text,
    remove,
    resolve,
    write_bytes,
    write_text,
)
from cxrcore.data.storage import copy as _copy

if TYPE_CHECKING:
    from cxrcore.checkpoint import ModelCard

# cxrcore.checkpoint (and so torch) is imported where it is used: the `cxr` script imports this
# module for RegistryError and should start in a blink.

ALIASES_NAME = "aliases.json"
HISTORY_NAME = "aliases.log.jsonl"
"""Every move of an alias, one JSON line each, appended under the registry's lock: when, which alias, from
which version to which, by whom (user, host, pid) and with which cxr. aliases.json holds only the present."""
PRODUCTION = "production"
"""The alias `cxr serve` answers with by default, and `cxr tune` points at its winner."""
LOCK_NAME = ".lock"
REGISTER_LOCK_NAME = ".register.lock"
REPORT_NAME = "report"
EVALUATIONS_NAME = "evaluations"
"""A version's folder of evaluations added after its registration (`add_evaluation`): one folder each,
numbered, and EVALUATIONS_NAME.jsonl, the index of what each found, appended to."""
_ALIAS = re.compile(r"[a-z][a-z0-9_-]*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_VERSION_DIR = re.compile(r"v(\d+)")
_CLAIM_PREFIX = ".claim-"
_REGISTRATION_FIELDS = {
    "version": None,
    "weights_sha256": None,
    "registered_at": None,
    "registered_from": None,
    "sealed_at": None,
    "report_sha256": None,
    "segmenter_weights_sha256": None,
    "card_sha256": None,
    "registered_by": None,
}
"""What the registry adds to a checkpoint's card: set aside to tell whether a version holds a checkpoint
(`_as_checkpoint`), with `data.manifest`."""
TOMBSTONE_NAME = ".interrupted"
"""Left in a cleaned version folder: the number stays used, and the folder is not reported again."""
_MAX_ATTEMPTS = 100
_LIST_ATTEMPTS = 3


DATA_REPORT_FILES = ("predictions.csv",)
"""Files of an evaluation report that a registered version leaves out: each names the dataset's files, as
a hospital's names may identify a patient, and a registry is copied to serving nodes and shared."""


class RegistryError(KeyError, ValueError):
    """An unknown model reference or a bad alias (a KeyError to lookups, a ValueError to input checks)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: where it is stored, its card, and the aliases pointing at it."""

    name: str
    version: int
    uri: str
    """the version folder (a local path, or a URI when the registry is one)."""
    card: ModelCard
    aliases: tuple[str, ...] = ()
    report: str | None = None
    """the report folder registered with it, if any."""

    @property
    def ref(self) -> str:
        """The reference that names this version in every command: "dual_cnn:3"."""
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class Registration:
    """What `ModelRegistry.register_once` did: the version holding the checkpoint, whether it was there
    already, and the lung segmenter version it names (with whether that was registered now)."""

    version: ModelVersion
    found: bool
    segmenter: ModelVersion | None = None
    segmenter_registered: bool = False
    report_added: bool = False
    """whether the version, found, got the report given now (it had none)"""


@dataclass(frozen=True)
class Sealed:
    """What `ModelRegistry.seal` added to a version an earlier cxr registered."""

    ref: str
    weights_sha256: str | None
    """the hash recorded now, None where the card had one already"""
    manifest: dict[str, Any] | None
    """the card's new `data.manifest` block (`missing` says why none could be made), None where it had one"""
    card: bool = False
    """whether the card's own hash (`card_sha256`) was recorded now: the card as it is now"""
    problem: str | None = None
    """why the version was not sealed: its card was edited since its hash was recorded"""


@dataclass(frozen=True)
class Interrupted:
    """What a registration that never finished (killed midway) left in a version folder."""

    name: str
    version: int
    uri: str
    files: int
    bytes: int
    age_s: float | None
    """seconds since anything in the folder last changed; None where the store gives no times."""


class ModelRegistry:
    """Versions of trained models at a local folder or URI; see the module docstring for the layout."""

    def __init__(self, root: str | Path, *, cache_dir: str | Path | None = None) -> None:
        self.root = str(root)
        self._fs, self._path = resolve(self.root)
        self._local = isinstance(self._fs, pafs.LocalFileSystem)
        self._cache_dir = Path(cache_dir) if cache_dir else None

    @property
    def _cache(self) -> Path:
        """Where a remote registry's versions are copied, `~` expanded when first needed: a local registry
        never is, and a container with no home folder (HOME unset, a user without a passwd entry) listed
        and showed versions only after a traceback (a review, session 54)."""
        return (self._cache_dir or cache_folder("registry")).expanduser()

    def __repr__(self) -> str:
        return f"ModelRegistry({self.root!r})"

    def registered_as(self, checkpoint: str | Path, segmenter: str | None = None) -> ModelVersion | None:
        """The version holding `checkpoint` already (the same card but for its version, the same weights), or
        None: registering a checkpoint twice, as a resumed `cxr tune` or a repeated `cxr models register`
        would, then finds the first. `segmenter`: as `register` takes it."""
        from cxrcore.checkpoint import WEIGHTS_NAME, load_card, local_checkpoint_dir

        card = _as_checkpoint(load_card(checkpoint))
        if segmenter is not None:
            card["segmenter"] = self._segmenter_location(str(self.local_checkpoint(segmenter)), checkpoint)
        weights = file_sha256(pafs.LocalFileSystem(), str(local_checkpoint_dir(checkpoint) / WEIGHTS_NAME))
        return next(
            (
                version
                for version in self.versions(card["model"]["name"])
                if _as_checkpoint(version.card) == card and self._weights_sha256(version) == weights
            ),
            None,
        )

    def _weights_sha256(self, version: ModelVersion) -> str:
        """The sha256 of `version`'s weights: as its card records it (every load checks the file against it,
        `local_checkpoint`), else, for a version an earlier cxr registered, of the file."""
        from cxrcore.checkpoint import WEIGHTS_NAME

        if version.card.weights_sha256:
            return version.card.weights_sha256
        return file_sha256(pafs.LocalFileSystem(), str(self.local_checkpoint(version.ref) / WEIGHTS_NAME))

    def register_once(
        self, checkpoint: str | Path, *, report: str | Path | None = None, alias: str | None = None
    ) -> Registration:
        """`cxr models register`: a checkpoint registered once, found where it already is (`alias` then
        moved to it); a dual-channel one's lung segmenter registered first, or found, so that the version
        names a segmenter this registry holds, wherever the registry is read or moved to. `register` stores
        what it is given as the next version, and keeps the segmenter's folder as the card names it."""
        from cxrcore.checkpoint import load_card

        if alias is not None:
            _check_alias(alias)  # before anything is copied
        card = load_card(checkpoint)
        unet, unet_new = None, False
        if "mask" in card.input_spec.get("channels", []) and card.segmenter:
            try:
                with self._locked(REGISTER_LOCK_NAME):
                    unet = self.registered_as(self.segmenter_checkpoint(card.segmenter))
                    if unet is None:
                        unet, unet_new = self.register(self.segmenter_checkpoint(card.segmenter)), True
            except (RegistryError, FileNotFoundError) as exc:
                raise RegistryError(f"{checkpoint}'s lung segmenter: {exc}") from exc
        segmenter = unet.ref if unet else None
        with self._locked(REGISTER_LOCK_NAME):  # the lookup and the registration as one step
            found = self.registered_as(checkpoint, segmenter)
            if found is None:
                version = self.register(checkpoint, report=report, segmenter=segmenter)
            else:  # a report given for it now: added where it has none (two at once add one)
                version = found if report is None else self._attach_report(found, report, checkpoint)
        added = found is not None and found.report is None and version.report is not None
        # promoted outside the registration lock: promote takes the aliases' own
        version = self.promote(version.ref, alias) if alias else version
        return Registration(version, found is not None, unet, unet_new, added)

    def _attach_report(
        self, version: ModelVersion, report: str | Path, checkpoint: str | Path
    ) -> ModelVersion:
        """`version`, registered without an evaluation report, with `report` (of the same weights) added:
        register first, evaluate after, as the README's Python example does. A version that has a report
        keeps it (its test figures are what was registered); another is refused, not dropped unsaid."""
        if version.report is not None:
            given_fs, given = resolve(str(report))
            if read_text(given_fs, f"{given}/metrics.json") == read_text(
                *resolve(f"{version.report}/metrics.json")
            ):  # the same command again: done already
                return version
            raise RegistryError(
                f"{checkpoint} is registered already, as {version.ref}, with its own report "
                f"({version.report}): a version's report is not replaced"
            )
        report_fs, report_path = resolve(str(report))
        if report_fs.get_file_info(report_path).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"report folder {report} not found")
        source_fs, source = resolve(str(checkpoint))
        _check_report_describes(report_fs, report_path, report, source_fs, source, version.name)
        folder = f"{self._path}/{version.name}/v{version.version}"
        if self._local:
            staging = f"{folder}/{REPORT_NAME}.tmp-{uuid.uuid4().hex[:8]}"
            try:  # whole or not at all: a report cut short would be read as the version's test figures
                _copy(report_fs, report_path, self._fs, staging, skip=DATA_REPORT_FILES)
                self._fs.move(staging, f"{folder}/{REPORT_NAME}")
            except BaseException:
                remove(self._fs, staging)
                raise
        else:  # an object store moves no folder; the card's report_sha256, written last, vouches for it
            _copy(report_fs, report_path, self._fs, f"{folder}/{REPORT_NAME}", skip=DATA_REPORT_FILES)
        from cxrcore.checkpoint import CARD_NAME, ModelCard

        card_data = self._read_json(f"{folder}/{CARD_NAME}")
        card_data["report_sha256"] = self._report_sha256(folder)
        self._write_card(folder, card_data)
        attached = replace(version, report=self._uri(version.name, f"v{version.version}", REPORT_NAME))
        return replace(attached, card=ModelCard.from_dict(card_data))

    def register(
        self,
        checkpoint: str | Path,
        *,
        report: str | Path | None = None,
        alias: str | None = None,
        segmenter: str | None = None,
    ) -> ModelVersion:
        """Store a checkpoint (card and weights, plus an evaluation report folder) as the next version;
        `segmenter` (a version of this registry) replaces the lung segmenter its card names."""
        from cxrcore.checkpoint import CARD_NAME, WEIGHTS_NAME, ModelCard

        if alias is not None:
            _check_alias(alias)
        source_fs, source = resolve(str(checkpoint))
        text = read_text(source_fs, f"{source}/{CARD_NAME}")
        if text is None or not exists(source_fs, f"{source}/{WEIGHTS_NAME}"):
            missing = CARD_NAME if text is None else WEIGHTS_NAME
            raise FileNotFoundError(f"{checkpoint} is not a cxr checkpoint (no {missing})")
        card_data: dict[str, Any] = json.loads(text)
        self._check_weights(source_fs, f"{source}/{WEIGHTS_NAME}", str(checkpoint), "registered")
        name = str(card_data["model"]["name"])
        if not _NAME.fullmatch(name):
            raise RegistryError(f"model name {name!r} cannot name a registry folder")
        if segmenter is not None:
            card_data["segmenter"] = str(self.local_checkpoint(segmenter))
        if card_data.get("segmenter"):
            card_data["segmenter"] = self._segmenter_location(str(card_data["segmenter"]), checkpoint)
        report_fs, report_path = resolve(str(report)) if report is not None else (None, "")
        if report_fs is not None and report_fs.get_file_info(report_path).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"report folder {report} not found")
        if report_fs is not None:
            _check_report_describes(report_fs, report_path, report, source_fs, source, name)

        number, folder, token, held = self._claim_next(name)
        try:
            _copy(source_fs, f"{source}/{WEIGHTS_NAME}", self._fs, f"{folder}/{WEIGHTS_NAME}")
            if report_fs is not None:
                # a registry travels to serving nodes and is shared; DATA_REPORT_FILES stay with the data
                _copy(report_fs, report_path, self._fs, f"{folder}/{REPORT_NAME}", skip=DATA_REPORT_FILES)
            card_data["data"] = {
                **card_data.get("data", {}),
                "manifest": self._keep_manifest(folder, card_data),
            }
            card_data["version"] = f"{name}:{number}"
            # the weights as stored here, which every load checks (`local_checkpoint`)
            card_data["weights_sha256"] = file_sha256(self._fs, f"{folder}/{WEIGHTS_NAME}")
            card_data["registered_at"] = provenance.now()
            card_data["registered_by"] = provenance.versions()
            from cxrcore.config import resolve_location

            came_from = resolve_location(str(checkpoint))  # the run's (or Tune trial's) checkpoint
            card_data["registered_from"] = came_from  # a path, or a URI of an object store
            if report_fs is not None:
                card_data["report_sha256"] = self._report_sha256(folder)
            if card_data.get("segmenter"):  # the one found for it later must be this one
                with contextlib.suppress(RegistryError, FileNotFoundError):  # none to pin: serving says so
                    found = self.segmenter_checkpoint(str(card_data["segmenter"]))
                    card_data["segmenter_weights_sha256"] = file_sha256(
                        pafs.LocalFileSystem(), str(found / WEIGHTS_NAME)
                    )
            self._write_card(folder, card_data)
        except BaseException as exc:
            remove(self._fs, folder)
            name_the_place(exc, self._uri(name, f"v{number}"))
            raise
        finally:
            if held is not None:
                os.close(held)  # releases the folder's lock: clean() may look at it now
        if not self._local:
            remove(self._fs, f"{folder}/{_CLAIM_PREFIX}{token}")
        version = ModelVersion(
            name=name,
            version=number,
            uri=self._uri(name, f"v{number}"),
            card=ModelCard.from_dict(card_data),
            report=self._uri(name, f"v{number}", REPORT_NAME) if report_fs is not None else None,
        )
        return self.promote(version.ref, alias) if alias is not None else version

    def _keep_manifest(self, folder: str, card_data: dict[str, Any], write: bool = True) -> dict[str, Any]:
        """Write the data manifest of the card's dataset into the version's `folder` (unless not `write`);
        the card's `data.manifest` block, which says why there is none where none could be made."""
        from cxrcore.data.manifest import (
            MANIFEST_NAME,
            ManifestError,
            dataset_manifest,
            manifest_block,
            manifest_bytes,
        )

        data = card_data.get("data", {})
        try:
            table, dataset = dataset_manifest(str(data.get("dataset") or ""), data.get("fingerprint"))
        except ManifestError as exc:
            return {"missing": str(exc)}
        content = manifest_bytes(table)
        if write:
            write_bytes(self._fs, f"{folder}/{MANIFEST_NAME}", content)
        return manifest_block(table, dataset, content)

    def versions(self, name: str | None = None) -> list[ModelVersion]:
        """Every finished version (of one model when `name` is given), sorted by name and version."""
        from cxrcore.checkpoint import CARD_NAME, ModelCard

        names = self._names() if name is None else [name] if _NAME.fullmatch(name) else []
        aliases = self.aliases()
        found: list[ModelVersion] = []
        for model in sorted(names):
            for number, contents in sorted(self._version_folders(model).items()):
                if CARD_NAME not in contents:
                    continue  # a registration still being written, or one killed midway
                folder, ref = f"{model}/v{number}", f"{model}:{number}"
                found.append(
                    ModelVersion(
                        name=model,
                        version=number,
                        uri=self._uri(model, f"v{number}"),
                        card=ModelCard.from_dict(self._read_json(f"{self._path}/{folder}/{CARD_NAME}")),
                        aliases=tuple(sorted(a for a, target in aliases.items() if target == ref)),
                        report=self._uri(folder, REPORT_NAME) if REPORT_NAME in contents else None,
                    )
                )
        return found

    def interrupted(self, name: str | None = None) -> list[Interrupted]:
        """Version folders without a card and not yet cleaned: killed registrations, or running ones."""
        from cxrcore.checkpoint import CARD_NAME

        names = self._names() if name is None else [name] if _NAME.fullmatch(name) else []
        now = time.time()
        found: list[Interrupted] = []
        for model in names:
            for number, contents in sorted(self._version_folders(model).items()):
                if CARD_NAME in contents or TOMBSTONE_NAME in contents:
                    continue  # finished, or already cleaned
                stored = [i for i in contents.values() if i.type == pafs.FileType.File]
                times = [i.mtime.timestamp() for i in contents.values() if i.mtime is not None]
                found.append(
                    Interrupted(
                        name=model,
                        version=number,
                        uri=self._uri(model, f"v{number}"),
                        files=len(stored),
                        bytes=sum(i.size or 0 for i in stored),
                        age_s=max(0.0, now - max(times)) if times else None,
                    )
                )
        return found

    def seal(self, ref: str | None = None, *, dry_run: bool = False) -> list[Sealed]:
        """Record what an earlier cxr did not in the cards of its versions (all, or `ref`'s): the sha256 of
        the weights as they are now (`weights_sha256`, with `sealed_at`: every later use checks them), and
        the data manifest, where the dataset the card names is readable here and was not ingested again
        since. A version that lacks neither is left as it is; a manifest that could not be made before is
        tried again. Returns what was added (with dry_run: what would be, nothing written).

        Trust on first use: the hash describes the file as it is when sealed, whatever happened to it
        before; `registered_at` stays unknown."""
        from cxrcore.checkpoint import CARD_NAME, WEIGHTS_NAME, CardChangedError, check_card_recorded
        from cxrcore.data.manifest import MANIFEST_NAME

        versions = [self.get(ref)] if ref is not None else self.versions()
        sealed = []
        with self._locked(REGISTER_LOCK_NAME):
            for version in versions:
                folder = f"{self._path}/{version.name}/v{version.version}"
                card_data = self._read_json(f"{folder}/{CARD_NAME}")
                try:  # a card edited since its hash was recorded is not sealed as it is; the others are
                    check_card_recorded(card_data, self._uri(version.name, f"v{version.version}"))
                except CardChangedError as exc:
                    sealed.append(Sealed(version.ref, None, None, problem=str(exc)))
                    continue
                data = card_data.setdefault("data", {})
                weights = None
                if not card_data.get("weights_sha256"):
                    weights = file_sha256(self._fs, f"{folder}/{WEIGHTS_NAME}")
                block = data.get("manifest") or {}
                manifest = None
                lost = bool(block.get("file")) and not exists(self._fs, f"{folder}/{MANIFEST_NAME}")
                if not block.get("file") or lost:
                    manifest = self._keep_manifest(folder, card_data, write=not dry_run)
                    if manifest == block and not lost:
                        manifest = None  # still missing, for the same reason
                    if lost and not (manifest or {}).get("file"):
                        manifest = None  # lost and not made again: the card keeps its record of it
                card = not card_data.get("card_sha256")
                if weights is None and manifest is None and not card:
                    continue
                sealed.append(Sealed(version.ref, weights, manifest, card))
                if dry_run:
                    continue
                if weights is not None:
                    card_data["weights_sha256"], card_data["sealed_at"] = weights, provenance.now()
                if manifest is not None:
                    data["manifest"] = manifest
                if version.report is not None and not card_data.get("report_sha256"):
                    card_data["report_sha256"] = self._report_sha256(folder)
                if card_data.get("segmenter") and not card_data.get("segmenter_weights_sha256"):
                    with contextlib.suppress(RegistryError, OSError):  # the one it serves with now
                        named = str(card_data["segmenter"])
                        pinned = self._own_segmenter_version(named) or self.segmenter_checkpoint(
                            named, of=version.ref
                        )
                        card_data["segmenter_weights_sha256"] = file_sha256(
                            pafs.LocalFileSystem(), str(pinned / WEIGHTS_NAME)
                        )
                try:
                    self._write_card(folder, card_data)
                except BaseException as exc:
                    name_the_place(exc, self._uri(version.name, f"v{version.version}"))
                    raise
        return sealed

    def clean(self, older_than_s: float = 3600.0, *, dry_run: bool = False) -> list[Interrupted]:
        """Free what registrations killed midway left, where nothing changed for `older_than_s` seconds.

        Each such folder is emptied but for a tombstone, so its number stays used and no reference to it
        can ever name other weights. Younger folders are left alone: a registration may still be writing
        them. Returns the folders cleaned (or, with dry_run, those that would be).
        """
        if older_than_s < 0:
            raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
        stale = [i for i in self.interrupted() if i.age_s is not None and i.age_s >= older_than_s]
        cleaned = []
        for item in stale:
            folder = f"{self._path}/{item.name}/v{item.version}"
            with self._folder_unless_registering(folder) as free:
                # Listed before its lock was taken: a registration may have finished it since (its card)
                # or another clean freed it (its tombstone). Either way it is not debris now.
                if not free or not self._still_unfinished(folder):
                    continue  # a registration is writing it now, however long it has been at it
                cleaned.append(item)
                if dry_run:
                    continue
                write_text(
                    self._fs,
                    f"{folder}/{TOMBSTONE_NAME}",
                    json.dumps({"cleaned_at": time.time(), "files": item.files, "bytes": item.bytes}),
                )
                for info in self._list(folder):
                    if info.base_name != TOMBSTONE_NAME:
                        remove(self._fs, info.path)
        return cleaned

    def _still_unfinished(self, folder: str) -> bool:
        from cxrcore.checkpoint import CARD_NAME

        names = {info.base_name for info in self._list(folder)}
        return CARD_NAME not in names and TOMBSTONE_NAME not in names

    @contextmanager
    def _folder_unless_registering(self, folder: str) -> Iterator[bool]:
        """True, holding the version folder's lock, where no registration holds it (False: one does).
        Object stores have no lock: True there (clean's age is what guards a running registration)."""
        if not self._local:
            yield True
            return
        try:
            descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            yield False
            return
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(descriptor)

    def get(self, ref: str) -> ModelVersion:
        """The version an alias ("production"), a "name:N" or a model name (its latest version) names."""
        if self._local and os.path.isfile(self._path):  # not pyarrow's "Cannot list directory ... errno 20"
            raise RegistryError(f"the registry {self.root} is a file, not a registry folder")
        aliases = self.aliases()
        target = aliases.get(ref, ref)
        name, colon, number = target.partition(":")
        found = self.versions(name)
        if not found:
            if ref in aliases:
                raise RegistryError(
                    f"alias {ref!r} points to {target}, which is not in the registry {self.root}"
                )
            raise RegistryError(self._unknown(ref, aliases))
        if not colon:
            return found[-1]
        if not number.isdigit():
            raise RegistryError(
                f"bad model reference {ref!r}: expected an alias, NAME or NAME:N (N a number)"
            )
        for version in found:
            if version.version == int(number):
                return version
        via = f" (alias {ref!r} points to it)" if ref in aliases else ""
        known = ", ".join(str(v.version) for v in found)
        unfinished = [i for i in self.interrupted(name) if i.version == int(number)]
        if unfinished:  # `cxr models list` names it: say what it is, not only that it is missing
            via += (
                " (its folder holds an unfinished registration: one still running, or killed midway, "
                "which `cxr models clean` frees)"
            )
        raise RegistryError(f"{name} has no version {number}{via}; its versions: {known}")

    def promote(self, ref: str, alias: str = PRODUCTION) -> ModelVersion:
        """Point `alias` at the version `ref` names (pinned: promoting "dual_cnn" pins its latest version)."""
        _check_alias(alias)
        target = self.get(ref)  # an unknown reference fails here, before the lock creates anything
        task = target.card.input_spec.get("task", "classify")
        if alias == PRODUCTION and task != "classify":
            raise RegistryError(
                f"{target.ref} is a {task} model (the lung segmenter), not a classifier: {PRODUCTION} is "
                "what `cxr serve` answers with, and a dual-channel classifier brings its segmenter along; "
                f"promote a classifier, or give {target.ref} another alias"
            )
        self._check_servable(target)
        from cxrcore.checkpoint import WEIGHTS_NAME

        self._check_weights(self._fs, f"{self._path}/{target.name}/v{target.version}/{WEIGHTS_NAME}",
                            target.ref, "promoted")  # fmt: skip
        self.local_checkpoint(target.ref)  # the weights it was registered with (`_unchanged`)
        with self._locked():
            if alias in self._names():
                raise RegistryError(
                    f"alias {alias!r} is also a model name in {self.root}: pick another alias"
                )
            version = self.get(ref)  # again under the lock: an alias `ref` may have moved meanwhile
            aliases = self.aliases()
            before = aliases.get(alias)
            aliases[alias] = version.ref
            if before != version.ref:  # recorded first: a move the history cannot keep is not made
                self._record_move(alias, before, version)
            write_text(
                self._fs, f"{self._path}/{ALIASES_NAME}", json.dumps(dict(sorted(aliases.items())), indent=2)
            )
        return replace(version, aliases=tuple(sorted(a for a, t in aliases.items() if t == version.ref)))

    @staticmethod
    def _check_weights(filesystem: pafs.FileSystem, path: str, what: str, verb: str) -> None:
        """RegistryError where the weights at `path` could not be loaded (cut short, not safetensors) or hold
        NaN or infinite values (a review, session 57: such a version was registered, promoted and served,
        every request answered 500): checked before a checkpoint is registered and before a version is
        promoted."""
        from safetensors.torch import load as load_tensors

        from cxrcore.checkpoint import NonFiniteWeightsError, check_finite_weights, safetensors_problem

        if not path.endswith(".safetensors"):
            return
        size = filesystem.get_file_info(path).size or 0
        with filesystem.open_input_stream(path) as stream:
            problem = safetensors_problem(stream, size)
        if not problem:
            with filesystem.open_input_stream(path) as stream:
                tensors = load_tensors(stream.read())
            try:
                check_finite_weights(tensors, Path(path))
            except NonFiniteWeightsError as exc:
                raise RegistryError(f"{exc}; it is not {verb}") from exc
        if problem:
            raise RegistryError(
                f"{what}'s weights {path} cannot be loaded ({problem}), so they are not {verb}; "
                + (
                    "copy the checkpoint again from where it was saved"
                    if verb == "registered"
                    else "register the checkpoint again (`cxr models register`) and promote the new version"
                )
            )

    def _check_servable(self, version: ModelVersion) -> None:
        """A dual-channel version's segmenter is somewhere: an alias moved to one whose segmenter had moved
        away was accepted, and `cxr serve` then failed on a path nobody had named."""
        if "mask" not in version.card.input_spec.get("channels", []):
            return
        segmenter = version.card.segmenter
        problem = None if segmenter else "its card names none"
        if segmenter and "://" in segmenter and not segmenter.startswith("file://"):
            from cxrcore.checkpoint import CARD_NAME

            if not exists(*resolve(f"{segmenter.rstrip('/')}/{CARD_NAME}")):
                problem = f"{segmenter} holds no checkpoint"
        elif segmenter:
            try:
                self.segmenter_checkpoint(segmenter, of=version.ref)
            except RegistryError as exc:
                problem = str(exc)
        if problem:
            remedy = (
                ""
                if "a copy without it" in problem
                else "; register its segmenter here and the model again with it"
            )
            raise RegistryError(
                f"{version.ref} is a dual-channel model whose lung segmenter cannot be found ({problem}): "
                f"it could not be served{remedy}"
            )

    def aliases(self) -> dict[str, str]:
        """Alias → "name:N"; empty when nothing was promoted yet."""
        path = f"{self._path}/{ALIASES_NAME}"
        if not exists(self._fs, path):
            return {}
        return {str(k): str(v) for k, v in self._read_json(path).items()}

    def add_evaluation(self, ref: str, report: str | Path) -> tuple[dict[str, Any], bool]:
        """Keep an evaluation of `ref`'s weights (`cxr evaluate --out`: external data above all) with the
        version: its folder copied into `v<N>/evaluations/<k>/` (predictions.csv stays with the data) and
        an entry appended to `v<N>/evaluations.jsonl` (`evaluation_entry`: what it scored, its figures, its
        verdict, when and by whom, its metrics.json's sha256). A version is immutable; what was learnt of it
        since is added beside it. Returns the entry and whether it was added now (False: the same
        metrics.json is there already). An evaluation of other weights is refused."""
        report_fs, report_path = resolve(str(report))
        text = read_text(report_fs, f"{report_path}/metrics.json")
        if text is None:
            raise FileNotFoundError(f"{report} holds no metrics.json: pass a `cxr evaluate --out` folder")
        try:
            metrics = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{report}/metrics.json is not valid JSON: {exc}") from exc
        version = self.get(ref)
        self.local_checkpoint(version.ref)  # its weights and card as registered (refused otherwise)
        scored = (metrics.get("evaluated") or {}).get("weights_sha256")
        if not scored or scored != version.card.weights_sha256:
            raise RegistryError(
                f"{report} evaluates other weights ({str(scored)[:12]}…) than {version.ref}'s "
                f"({str(version.card.weights_sha256)[:12]}…): evaluate the version itself "
                f"(cxr evaluate --model {version.ref} --registry {self.root} --data DATASET --out DIR)"
            )
        pinned, drew = (
            version.card.segmenter_weights_sha256,
            (metrics.get("evaluated") or {}).get("segmenter_weights_sha256"),
        )
        if pinned and drew and pinned != drew:
            raise RegistryError(
                f"{report} read its masks from another segmenter ({drew[:12]}…) than {version.ref}'s "
                f"({pinned[:12]}…): its figures are not the version's as it serves; evaluate it with its own"
            )
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == version.card.report_sha256:
            raise RegistryError(f"{report} is {version.ref}'s registered report already (`cxr models show`)")
        folder = f"{self._path}/{version.name}/v{version.version}"
        with self._locked(REGISTER_LOCK_NAME):
            known = self.evaluations(version.ref)
            for entry in known:
                if entry.get("metrics_sha256") == digest and not entry.get("problem"):
                    return entry, False
            # past every entry and folder: one a kill left unindexed keeps its number
            number = 1 + max((int(entry["number"]) for entry in known), default=0)
            target = f"{folder}/{EVALUATIONS_NAME}/{number}"
            if self._local:  # whole or not at all: staged, then renamed
                staging = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
                try:
                    _copy(report_fs, report_path, self._fs, staging, skip=DATA_REPORT_FILES)
                    self._fs.move(staging, target)
                except BaseException:
                    remove(self._fs, staging)
                    raise
            else:  # an object store moves no folder: copied in place, indexed last (unindexed: said so)
                _copy(report_fs, report_path, self._fs, target, skip=DATA_REPORT_FILES)
            entry = {"number": number, **evaluation_entry(metrics), "metrics_sha256": digest,
                     "added_at": provenance.now(), **_who()}  # fmt: skip
            index = f"{folder}/{EVALUATIONS_NAME}.jsonl"
            write_text(self._fs, index, (read_text(self._fs, index) or "") + json.dumps(entry) + "\n")
        return entry, True

    def evaluations(self, ref: str) -> list[dict[str, Any]]:
        """The evaluations added to `ref`'s version (`add_evaluation`), oldest first: each evaluation folder
        and each index entry, the figures and verdict read from the folder's metrics.json (the index's copy
        can be edited without a trace), who added it and when from the index. `problem` says why one is not
        to be read: its metrics.json changed or removed since it was added, a folder the index does not
        hold, or an evaluation of other weights than the version's."""
        version = self.get(ref)
        folder = f"{self._path}/{version.name}/v{version.version}"
        indexed: dict[int, dict[str, Any]] = {}
        for line in (read_text(self._fs, f"{folder}/{EVALUATIONS_NAME}.jsonl") or "").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and isinstance(entry.get("number"), int):
                    indexed[entry["number"]] = entry
        folders = {
            int(info.base_name)
            for info in self._list(f"{folder}/{EVALUATIONS_NAME}")
            if info.type == pafs.FileType.Directory and info.base_name.isdigit()
        }
        entries = []
        for number in sorted(set(indexed) | folders):
            entry = {**indexed.get(number, {}), "number": number}
            text = read_text(self._fs, f"{folder}/{EVALUATIONS_NAME}/{number}/metrics.json")
            metrics = None
            with contextlib.suppress(ValueError):
                metrics = json.loads(text) if text else None
            if isinstance(metrics, dict):
                entry.update(evaluation_entry(metrics))
            digest = hashlib.sha256(text.encode()).hexdigest() if text else None
            scored = (
                (metrics.get("evaluated") or {}).get("weights_sha256") if isinstance(metrics, dict) else None
            )
            problem = None
            if number not in indexed:
                problem = "it is not in evaluations.jsonl: added outside cxr, or its line removed"
            elif digest is None or digest != entry.get("metrics_sha256"):
                problem = "its metrics.json was changed or removed since it was added"
            elif scored != version.card.weights_sha256:
                problem = "it scored other weights than the version's"
            entries.append({**entry, "changed": problem is not None, "problem": problem})
        return entries

    def unrecorded_aliases(self) -> dict[str, str]:
        """Alias → a sentence, for each alias whose target is not where the history's last move of it put it:
        `aliases.json` changed outside cxr (an edit, a restore from a backup), a production change with no
        record of when or by whom. Aliases the history never recorded (an earlier cxr's) are not judged."""
        try:
            moves = self.history()
        except RegistryError:
            return {}
        last = {move.get("alias"): move.get("to") for move in moves}
        return {
            alias: f"the alias {alias} points to {target}, but the history's last move of it was to "
            f"{last[alias]}: {ALIASES_NAME} was changed outside cxr, and when and by whom is not recorded"
            for alias, target in sorted(self.aliases().items())
            if alias in last and last[alias] != target
        }

    def local_checkpoint(self, ref: str) -> Path:
        """A local folder holding `ref`'s checkpoint: the version folder, or a cached copy of a remote one."""
        from cxrcore.checkpoint import CARD_NAME, WEIGHTS_NAME
        from cxrcore.data.manifest import MANIFEST_NAME

        version = self.get(ref)
        folder = f"{self._path}/{version.name}/v{version.version}"
        if self._local:
            return self._unchanged(version, Path(folder))
        target = self._cache.joinpath(*cache_key(self.root), version.name, f"v{version.version}")
        if (target / CARD_NAME).is_file():
            cached = json.loads((target / CARD_NAME).read_text()).get("weights_sha256")
            with contextlib.suppress(RegistryError):  # a copy gone bad: fetched again below
                if cached == version.card.weights_sha256:
                    return self._unchanged(version, target)  # a version is stored once: its copy stays valid
            shutil.rmtree(target, ignore_errors=True)  # or a registry emptied and filled again: not this one
        staging = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        staging.mkdir(parents=True)
        local = pafs.LocalFileSystem()
        try:
            # the manifest by its own name, never by what a card says: a card naming "../x" wrote outside
            manifest = [MANIFEST_NAME] if (version.card.data.get("manifest") or {}).get("file") else []
            files = [WEIGHTS_NAME, *manifest, CARD_NAME]
            for file in files:  # the card last: it marks a finished copy
                try:
                    _copy(self._fs, f"{folder}/{file}", local, str(staging / file))
                except FileNotFoundError:
                    if file != MANIFEST_NAME:
                        raise
                    # lost from the registry (a sync of cards and weights only): the version still serves;
                    # `cxr evaluate` says so and reads the model's dataset instead, and `seal` makes it again
            self._unchanged(version, staging, f"{self.root}/{version.name}/v{version.version}")  # before use
            os.replace(staging, target)
        except OSError:
            if not (target / CARD_NAME).is_file():  # not merely another process finishing first
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self._unchanged(version, target)

    def _unchanged(self, version: ModelVersion, folder: Path, where: str | None = None) -> Path:
        """`folder`, where its weights are the ones `version` was registered with (its card's
        weights_sha256; a version an earlier cxr registered records none): a registry's versions are
        stored once, and weights replaced under one (by hand, a bad copy, a sync gone wrong) were served
        under its name with nothing said. Raises RegistryError naming both hashes otherwise, and the
        registry's file (`where`) when `folder` holds a copy just fetched from it."""
        from cxrcore.checkpoint import CARD_NAME, WEIGHTS_NAME, check_card_recorded

        check_card_recorded(json.loads((folder / CARD_NAME).read_text()), where or folder)
        expected = version.card.weights_sha256
        if expected is None:
            return folder
        found = file_sha256(pafs.LocalFileSystem(), str(folder / WEIGHTS_NAME))
        if found != expected:
            source = f" ({where}/{WEIGHTS_NAME}, as fetched" if where else f" ({folder / WEIGHTS_NAME}"
            came_from = version.card.registered_from
            remedy = (
                f"copy them back from {came_from}/{WEIGHTS_NAME}, where they were registered from"
                if came_from
                else "remove the version's folder and register its checkpoint again"
            )
            raise RegistryError(
                f"{version.ref}'s weights{source}, sha256 {found[:12]}…) are not the ones it was registered "
                f"with (sha256 {expected[:12]}…): they were replaced or damaged since; {remedy}"
            )
        return folder

    def segmenter_checkpoint(self, segmenter: str, of: str | None = None) -> Path:
        """A card's segmenter (what its `segmenter` field holds) as a local checkpoint folder: a folder as it
        is, a URI's cached copy, a version of this registry by reference, and a version folder of a registry
        that has since moved or been copied (`OLD/<name>/v<N>`) as this registry's version N of <name>: a
        card records a local registry's segmenter by its folder, and `mv REG REG2` or an rsync to a serving
        node at another path otherwise broke every dual-channel version in it.

        That folder is read as it is only while this registry lacks the version or holds a different one
        (its card not the same byte for byte): a copy beside its original had read the original's. And
        where `of`, the version whose card this is, was registered in OLD too (this registry a copy of it),
        a copy without the segmenter is refused although OLD still holds it: it had been promoted and
        served here, and failed on the node it was copied to for, or once OLD was cleaned up.

        Where `of` recorded its segmenter's weights when it was registered (`segmenter_weights_sha256`),
        the segmenter found must have them: a registry copy holding another version under that name and
        number had served the model with other masks under the same names."""
        from cxrcore.checkpoint import WEIGHTS_NAME

        found = self._segmenter_folder(segmenter, of)
        pinned = None
        if of is not None:
            with contextlib.suppress(RegistryError, TypeError, ValueError):  # `of` of another registry
                pinned = self.get(of).card.segmenter_weights_sha256
        if pinned:
            weights = file_sha256(pafs.LocalFileSystem(), str(found / WEIGHTS_NAME))
            own = self._own_segmenter_version(segmenter)
            if weights != pinned and own is not None and own != found:  # this registry's own copy of it
                found, weights = own, file_sha256(pafs.LocalFileSystem(), str(own / WEIGHTS_NAME))
            if weights != pinned:
                raise RegistryError(
                    f"{of}'s segmenter, found at {found}, has other weights (sha256 {weights[:12]}…) than "
                    f"the one it was registered with ({pinned[:12]}…): its masks, and so its answers, would "
                    "not be the ones evaluated; copy the registered segmenter's version into this registry"
                )
        return found

    def _own_segmenter_version(self, segmenter: str) -> Path | None:
        """This registry's version of the segmenter a card names (by a version folder's `<name>/v<N>`, of
        any registry, or `name:N`), where it holds one; None otherwise."""
        parts = segmenter.rstrip("/").split("/")
        if len(parts) >= 2 and _NAME.fullmatch(parts[-2]) and _VERSION_DIR.fullmatch(parts[-1]):
            ref = f"{parts[-2]}:{parts[-1][1:]}"
        elif ":" in segmenter and "/" not in segmenter:
            ref = segmenter
        else:
            return None
        from cxrcore.config import ConfigError

        try:
            return self.local_checkpoint(ref)
        except (RegistryError, OSError, ConfigError):  # none here, or one changed since: not this one
            return None

    def _segmenter_folder(self, segmenter: str, of: str | None) -> Path:
        """`segmenter_checkpoint`'s folder, before its weights are checked."""
        from cxrcore.checkpoint import local_checkpoint_dir
        from cxrcore.data import storage

        if storage.is_remote(segmenter):
            return local_checkpoint_dir(segmenter)
        parts = segmenter.rstrip("/").split("/")
        moved = len(parts) >= 2 and _NAME.fullmatch(parts[-2]) and _VERSION_DIR.fullmatch(parts[-1])
        ref = f"{parts[-2]}:{parts[-1][1:]}" if moved else segmenter
        named = Path(segmenter)
        if moved and self._local and named.is_dir():
            origin, ours = named.parent.parent, Path(self._path, parts[-2], parts[-1])
            if not ours.exists() or not ours.samefile(named):
                if _same_card(named, ours):
                    return ours
                if of is not None and not ours.exists() and self._copy_of(origin, of):
                    raise RegistryError(
                        f"the segmenter {segmenter} is a version of {origin}, of which the registry "
                        f"{self.root} is a copy without it: copy {parts[-2]}/{parts[-1]} into it too"
                    )
        if named.is_dir():
            return named
        try:
            return self.local_checkpoint(ref)
        except RegistryError as exc:
            where = f"nor a version in the registry {self.root}"
            raise RegistryError(f"the segmenter {segmenter} is neither a folder here {where}") from exc

    def _copy_of(self, origin: Path, ref: str) -> bool:
        """Whether the local registry `origin` holds `ref`'s version as this one does (this one its copy)."""
        version = self.get(ref)
        folder = f"v{version.version}"
        return _same_card(origin / version.name / folder, Path(self._path, version.name, folder))

    def _segmenter_location(self, segmenter: str, checkpoint: str | Path) -> str:
        """Where a card being registered should say its segmenter is, readable wherever the registry is.

        A version of this registry, named by its folder, its URI or this machine's cached copy of it
        (what `local_checkpoint` returns, and so what a Tune run trains with), is recorded by its place
        in the registry; a registry reference ("tiny_unet:1") or another URI is kept. A local path with a
        registry on an object store is refused: no other machine could load that segmenter.
        """
        if ":" in segmenter and "/" not in segmenter:
            return segmenter  # a registry reference, resolved by Serve and `cxr evaluate`
        if "://" in segmenter and not segmenter.startswith("file://"):
            inside = self._relative(segmenter.rstrip("/"), self.root.rstrip("/")) if not self._local else None
        else:
            local = Path(resolve(segmenter)[1]).resolve()
            roots = [self._cache.joinpath(*cache_key(self.root))]
            if self._local:
                roots.append(Path(self._path))
            inside = next(
                (r for r in (self._relative(str(local), str(root.resolve())) for root in roots) if r), None
            )
            if inside is None and not self._local:
                raise RegistryError(
                    f"{checkpoint}'s card names its segmenter by the local path {segmenter}, which other "
                    f"machines cannot read; register that segmenter in {self.root} first (a version of the "
                    "registry is recorded by its place in it) or train with --segmenter pointing to a URI"
                )
        if inside is None:
            return segmenter
        from cxrcore.checkpoint import CARD_NAME

        name, version = inside
        if not exists(self._fs, f"{self._path}/{name}/v{version}/{CARD_NAME}"):
            raise RegistryError(
                f"{checkpoint}'s card names the segmenter {segmenter}, version {version} of {name}, "
                f"which is not in the registry {self.root}"
            )
        return self._uri(name, f"v{version}")

    @staticmethod
    def _relative(location: str, root: str) -> tuple[str, int] | None:
        """(name, N) when `location` is the folder of version N of a model `name` under `root`."""
        parts = location[len(root) + 1 :].split("/") if location.startswith(f"{root}/") else []
        match = _VERSION_DIR.fullmatch(parts[1]) if len(parts) == 2 and _NAME.fullmatch(parts[0]) else None
        return (parts[0], int(match.group(1))) if match else None

    def _version_folders(self, model: str) -> dict[int, dict[str, pafs.FileInfo]]:
        """Version number → what one listing found in REG/<model>/v<N>/, by path within that folder ("" is
        the folder itself, "report/metrics.json" a file of its report)."""
        folders: dict[int, dict[str, pafs.FileInfo]] = {}
        for info in self._list(f"{self._path}/{model}", recursive=True):
            parts = info.path[len(self._path) :].lstrip("/").split("/")
            match = _VERSION_DIR.fullmatch(parts[1]) if len(parts) >= 2 else None
            if match:
                folders.setdefault(int(match.group(1)), {})["/".join(parts[2:])] = info
        return folders

    def _record_move(self, alias: str, before: str | None, after: ModelVersion) -> None:
        """Append an alias's move to HISTORY_NAME (held by the caller's lock; an object store's file is
        written again whole), before the move is made: a history that cannot be written refuses the move
        (RegistryError), as an unrecorded production change is what the history exists to rule out. Each
        entry names the weights moved to and the command that moved it (`cxr tune`'s promotion or a
        person's `cxr models promote`)."""
        path = f"{self._path}/{HISTORY_NAME}"
        entry = {
            "time": provenance.now(),
            "alias": alias,
            "from": before,
            "to": after.ref,
            "weights_sha256": after.card.weights_sha256,
            **_who(),
        }
        try:
            if self._local:
                with open(path, "a", encoding="utf-8") as stream:
                    stream.write(json.dumps(entry) + "\n")
            else:
                write_text(self._fs, path, (read_text(self._fs, path) or "") + json.dumps(entry) + "\n")
        except OSError as exc:
            raise RegistryError(
                f"{alias} was not moved to {after.ref}: its move cannot be recorded in {self.root}/"
                f"{HISTORY_NAME} ({exc}); make the history writable and promote again"
            ) from exc

    def history(self) -> list[dict[str, Any]]:
        """Every move of an alias this registry recorded (HISTORY_NAME), oldest first; lines cut short by a
        kill are left out."""
        try:
            text = read_text(self._fs, f"{self._path}/{HISTORY_NAME}") or ""
        except OSError as exc:
            raise RegistryError(
                f"the history of moves {self.root}/{HISTORY_NAME} cannot be read: {exc}"
            ) from exc
        moves = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                move = json.loads(line)
                if isinstance(move, dict):  # a line of anything else is not a move (`[1, 2]` had crashed it)
                    moves.append(move)
        return moves

    def _names(self) -> list[str]:
        return sorted(
            info.base_name
            for info in self._list(self._path)
            if info.type == pafs.FileType.Directory and _NAME.fullmatch(info.base_name)
        )

    def _list(self, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
        """What is under `path`, or [] when it does not exist."""
        selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
        for _ in range(_LIST_ATTEMPTS - 1):
            try:
                return list(self._fs.get_file_info(selector))
            except FileNotFoundError:
                pass  # arrow's local listing fails when a folder appears or vanishes meanwhile: look again
        return list(self._fs.get_file_info(selector))

    def _claim_next(self, name: str) -> tuple[int, str, str, int | None]:
        """(number, folder, claim token, descriptor holding the folder's flock: local registries only) of
        a version folder that this registration alone owns."""
        token = uuid.uuid4().hex
        tried = 0
        for attempt in range(_MAX_ATTEMPTS):
            present = [_VERSION_DIR.fullmatch(info.base_name) for info in self._list(f"{self._path}/{name}")]
            number = max([tried, *(int(m.group(1)) for m in present if m)]) + 1
            folder = f"{self._path}/{name}/v{number}"
            if self._claim(folder, token):
                held = self._hold(folder)
                if held is None or not os.listdir(folder):
                    return number, folder, token, held
                os.close(held)  # cleaned between its claim and its lock (`--older-than 0`): the next one
                tried = number
                continue
            tried = number
            if not self._local:  # both racers may withdraw: part them before the next try
                time.sleep(random.uniform(0, 0.02 * (attempt + 1)))
        raise RegistryError(
            f"could not claim a new version of {name} in {self.root} after {_MAX_ATTEMPTS} tries"
        )

    def _claim(self, folder: str, token: str) -> bool:
        if self._local:
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            try:
                os.mkdir(folder)
            except FileExistsError:
                return False
            return True
        marker = f"{folder}/{_CLAIM_PREFIX}{token}"
        write_text(self._fs, marker, token)
        others = [info for info in self._list(folder) if info.path != marker]
        if others:
            remove(self._fs, marker)
        return not others

    def _hold(self, folder: str) -> int | None:
        """A descriptor holding the flock of a version folder just claimed (None on an object store).
        clean() locks a folder before it empties it and skips one it cannot lock."""
        if not self._local:
            return None
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        return descriptor

    @contextmanager
    def _locked(self, lock_name: str = LOCK_NAME) -> Iterator[None]:
        """Exclusive among processes for a read-modify-write of aliases.json (local registries only), or,
        named REGISTER_LOCK_NAME, for register_once's lookup and registration: registrations into one
        registry take turns, and one that has to wait for another's copy says so."""
        if not self._local:
            yield  # object stores have no lock: see the module docstring
            return
        os.makedirs(self._path, exist_ok=True)
        descriptor, writable = open_lock_file(os.path.join(self._path, lock_name))  # shared by a group
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if lock_name == REGISTER_LOCK_NAME:
                    holder = (
                        os.pread(descriptor, 200, 0).decode(errors="replace").strip() or "another process"
                    )
                    print(
                        f"waiting for a registration into {self.root} by {holder} to finish copying",
                        file=sys.stderr,
                        flush=True,
                    )
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            if lock_name == REGISTER_LOCK_NAME and writable:  # who holds it, for the next one's message
                os.ftruncate(descriptor, 0)
                os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
            yield
        finally:
            os.close(descriptor)  # releases the lock

    def _write_card(self, folder: str, card_data: dict[str, Any]) -> None:
        """Write a version's card with its own hash (`card_sha256`), which every load of it checks."""
        from cxrcore.checkpoint import CARD_NAME, card_digest

        card_data["card_sha256"] = card_digest(card_data)
        write_text(self._fs, f"{folder}/{CARD_NAME}", json.dumps(card_data, indent=2))

    def _report_sha256(self, folder: str) -> str | None:
        """sha256 of a version's registered report's metrics.json, None where it has none."""
        path = f"{folder}/{REPORT_NAME}/metrics.json"
        return file_sha256(self._fs, path) if exists(self._fs, path) else None

    def _read_json(self, path: str) -> dict[str, Any]:
        text = read_text(self._fs, path)
        try:
            data = json.loads(text or "")
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{path} in the registry {self.root} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise RegistryError(f"{path} in the registry {self.root} does not hold a JSON object")
        return data

    def _uri(self, *parts: str) -> str:
        base = self.root.rstrip("/") if "://" in self.root else self._path
        return "/".join([base, *parts])

    def _unknown(self, ref: str, aliases: dict[str, str]) -> str:
        every = self.versions()
        if not every and self._local and not os.path.isdir(self._path):  # most often a mistyped --registry
            return (
                f"no model {ref!r}: no registry at {self.root} (no such folder here); `cxr tune` and the "
                "demo create one where they register"
            )
        if not every:
            return f"no model {ref!r}: the registry {self.root} is empty (nothing registered yet)"
        names = sorted({v.name for v in every})
        known = [*sorted(aliases), *names, *((v.ref for v in every) if ":" in ref else ())]
        close = difflib.get_close_matches(ref, known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        latest = {v.name: v.ref for v in every}
        listing = ", ".join([*(f"{a} -> {aliases[a]}" for a in sorted(aliases)), *(latest[n] for n in names)])
        return f"unknown model reference {ref!r}{hint} (aliases and latest versions: {listing})"


def report_metrics(report: str | None) -> dict[str, Any] | None:
    """metrics.json of the evaluation report registered with a version (`ModelVersion.report`), where it
    has one. Raises OSError or ValueError where it cannot be read."""
    if report is None:
        return None
    filesystem, path = resolve(report)
    text = read_text(filesystem, f"{path}/metrics.json")
    return json.loads(text) if text else None


_EVALUATION_FIGURES = (
    "accuracy",
    "accuracy_ci95",
    "balanced_accuracy",
    "macro_f1",
    "macro_auroc",
    "macro_auroc_ci95",
)


def evaluation_entry(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """What an evaluation found, in brief (an entry of a version's evaluations.jsonl): what it scored (the
    dataset's fingerprint, its relation to the training data, the split), its figures, and for data from
    elsewhere its verdict and whether that is a warning (`verdict_alarming`)."""
    from cxrcore.evaluate.external import verdict_alarming

    evaluated = metrics.get("evaluated") or {}
    comparison = metrics.get("internal_comparison") or {}
    return {
        "evaluated_at": evaluated.get("evaluated_at"),
        "dataset": evaluated.get("dataset"),
        "fingerprint": evaluated.get("fingerprint"),
        "relation": evaluated.get("relation"),
        "split": evaluated.get("split"),
        "images": metrics.get("n"),
        **{key: metrics.get(key) for key in _EVALUATION_FIGURES},
        "unusual_inputs": evaluated.get("unusual_inputs"),
        "verdict": comparison.get("verdict"),
        "alarming": verdict_alarming(comparison) if comparison else None,
    }


def evaluation_warnings(entries: list[dict[str, Any]]) -> list[str]:
    """A sentence for each evaluation added to a version whose verdict is a warning (`verdict_alarming`: a
    large drop, not shown to beat chance, images not known to be clean of its own), whose images the input
    check found unlike the training images, or whose metrics.json changed since it was added. Said by `cxr
    serve`, GET /v1/model and `cxr models show`."""
    found = []
    for entry in entries:
        where = (
            f"its evaluation {entry.get('number')} ({entry.get('relation')} data, {entry.get('images')} "
            f"images, added {entry.get('added_at')})"
        )
        if entry.get("changed"):
            found.append(f"{where}: {entry.get('problem') or 'changed since it was added'}")
            continue
        if entry.get("alarming"):
            found.append(f"{where}: {entry.get('verdict')}")
        if entry.get("unusual_inputs"):
            found.append(f"{where}: {entry.get('unusual_inputs')}")
    return found


def _who() -> dict[str, Any]:
    """Who records an entry: user (or uid), host, pid, cxr's version and the command line."""
    import getpass
    import shlex

    import cxrcore

    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    program = "cxr" if program == "__main__.py" else program  # `python -m cxrcore`
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no user name for this uid (a container's): its number
        user = str(os.getuid())
    return {
        "user": user,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "cxr": cxrcore.__version__,
        "command": shlex.join([program, *sys.argv[1:]])[:500],
    }


def _report_file_sha256(report: str) -> str | None:
    filesystem, path = resolve(report)
    return (
        file_sha256(filesystem, f"{path}/metrics.json")
        if exists(filesystem, f"{path}/metrics.json")
        else None
    )


UNREADABLE_REPORT = "its report's metrics.json cannot be read"
"""How `registered_test` begins its reason for a report it could not read (`cxr models list` shows "?")."""


def registered_test(version: ModelVersion) -> tuple[dict[str, Any] | None, str | None]:
    """The test figures of the report registered with `version` (`brief_test_figures`), or None and why
    there are none: no report, one that scored something else than its own dataset's test split, or one
    that cannot be read. A damaged report never stops what reads it: the weights serve all the same."""
    from cxrcore.metrics import brief_test_figures, is_test_report

    if version.report is None:
        return None, "registered without an evaluation report: the card's figures are validation ones"
    try:
        metrics = report_metrics(version.report)
    except (OSError, ValueError) as exc:
        return None, f"{UNREADABLE_REPORT} ({type(exc).__name__}: {exc})"
    if not isinstance(metrics, dict):
        return None, "its report holds no metrics.json"
    recorded = version.card.report_sha256
    if recorded and _report_file_sha256(version.report) != recorded:
        return None, (
            f"its report's metrics.json is not the one registered with it (sha256 {recorded[:12]}…): it was "
            "edited since, so its figures are not shown"
        )
    scored = (metrics.get("evaluated") or {}).get("weights_sha256")
    weights = version.card.weights_sha256
    if scored and weights and scored != weights:
        return None, (
            f"its report scored other weights (sha256 {scored[:12]}…) than the version's "
            f"({weights[:12]}…): the weights or the report were replaced since"
        )
    figures = brief_test_figures(metrics)
    if figures is None:
        evaluated = metrics.get("evaluated") or {}
        what = (
            f"the {evaluated.get('split')} split of {evaluated.get('relation')} data"
            if evaluated and not is_test_report(metrics)
            else "no accuracy"
        )
        return None, f"its registered report scores {what}, not the test split of its own dataset"
    return figures, None


REPORT_DOUBTED = (UNREADABLE_REPORT, "holds no metrics.json", "edited since", "scored other weights")
"""`registered_test`'s reasons that put the registered report itself in doubt (not one of other data)."""


def report_warning(why: str | None) -> str | None:
    """What is said where a version's registered report gives no test figures because it is damaged, edited
    or of other weights (REPORT_DOUBTED): an edit must not silence "do not serve it on this evidence"."""
    if not why or not any(reason in why for reason in REPORT_DOUBTED):
        return None
    return f"its registered evaluation report shows no test figures ({why}): what it was tested on is unknown"


def serving_warnings(test: dict[str, Any] | None, data: dict[str, Any]) -> list[str]:
    """What is known against serving a model, in sentences: its registered test figures (`registered_test`)
    not shown to beat always answering the commonest class, a class its training split held no image of,
    and a training dataset (its card's `data`) whose sources separate classes. Said by `cxr serve`,
    GET /v1/model and `cxr models promote`."""
    found = []
    test = test or {}
    if test.get("beats_commonest_class") is False:
        low, high = test["accuracy_ci95"]  # there is one wherever it is judged
        found.append(
            f"its registered test accuracy, {test['accuracy']:.3f} (95% CI {low:.2f}–{high:.2f}) on "
            f"{test['images']} images, is not shown to beat always answering the commonest class "
            f"({test['commonest_class_accuracy']:.3f}): do not serve it on this evidence"
        )
    counts = data.get("train_class_counts") or {}
    if unseen := [name for name, count in counts.items() if count == 0]:
        found.append(
            f"it never trained on an image of {', '.join(unseen)} (its training split held none), so it "
            f"never answers {'it' if len(unseen) == 1 else 'them'}"
        )
    if confound := data.get("sources_separate_classes"):
        found.append(f"in the dataset it trained on, {confound}")
    return found


def _check_report_describes(
    report_fs: pafs.FileSystem,
    report_path: str,
    report: Any,
    source_fs: pafs.FileSystem,
    source: str,
    name: str,
) -> None:
    """Refuse an evaluation report of another model: its figures would become this version's test
    figures, which `cxr evaluate` compares external data with. The report names the weights it scored
    (`evaluated.weights_sha256`; reports of an earlier cxr, only the model)."""
    from cxrcore.checkpoint import WEIGHTS_NAME

    text = read_text(report_fs, f"{report_path}/metrics.json")
    evaluated = (json.loads(text) if text else {}).get("evaluated") or {}
    scored = evaluated.get("weights_sha256")
    if scored is not None:
        if file_sha256(source_fs, f"{source}/{WEIGHTS_NAME}") == scored:
            return
        what = f"other weights than {source}'s"
    else:
        model = str(evaluated.get("model") or "")
        ref = re.fullmatch(r"([A-Za-z0-9_.-]+):\d+", model)  # a registry version; a folder names no model
        if ref is None or ref.group(1) == name:
            return
        what = f"{model}, not this {name}"
    raise RegistryError(
        f"--report {report} evaluates {what} (its metrics.json, `evaluated`): register the checkpoint with "
        f"its own evaluation (cxr evaluate --checkpoint CKPT --data DATASET --out DIR)"
    )


def _same_card(a: Path, b: Path) -> bool:
    """Whether two local version folders hold the same card, byte for byte (a registry and its copy)."""
    from cxrcore.checkpoint import CARD_NAME

    try:
        return (a / CARD_NAME).read_bytes() == (b / CARD_NAME).read_bytes()
    except OSError:
        return False


def _as_checkpoint(card: ModelCard) -> dict[str, Any]:
    """A card as a checkpoint's, without what registering it added."""
    data = card.to_dict()
    data["data"] = {key: value for key, value in data.get("data", {}).items() if key != "manifest"}
    return {**data, **_REGISTRATION_FIELDS}


def _check_alias(alias: str) -> None:
    if not _ALIAS.fullmatch(alias):
        raise RegistryError(
            f"bad alias {alias!r}: use lowercase letters, digits, '_' and '-', starting with a letter "
            "(e.g. production, staging)"
        )
