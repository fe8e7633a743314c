"""Duplicate grouping and the deterministic, stratified, duplicate-aware train/val/test split, with whole
sources held out for testing."""

from __future__ import annotations

import difflib
import hashlib
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from itertools import pairwise

import numpy as np

from cxrcore.config import ConfigError

SPLITS = ("train", "val", "test")


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def duplicate_groups(
    content_hashes: Sequence[str], perceptual_hashes: np.ndarray, max_bits: int
) -> list[int]:
    """Group rows that are exact (same content hash) or near duplicates (perceptual hashes within max_bits).

    perceptual_hashes is an (N, W) uint64 array (W words per hash). Near pairs are found with banded
    locality-sensitive hashing: split the bits into max_bits + 1 bands; by the pigeonhole principle two
    hashes within max_bits agree exactly on at least one band, so only rows sharing a band are compared.
    Returns a group id per row (the smallest row index in its group).
    """
    n = len(content_hashes)
    groups = _UnionFind(n)
    first_seen: dict[str, int] = {}
    for i, digest in enumerate(content_hashes):
        if digest in first_seen:
            groups.union(first_seen[digest], i)
        else:
            first_seen[digest] = i

    if max_bits > 0 and n > 1:
        words = np.ascontiguousarray(perceptual_hashes, dtype=np.uint64)
        bits = np.unpackbits(words.astype(">u8").view(np.uint8), axis=1)
        band_edges = np.linspace(0, bits.shape[1], max_bits + 2).astype(int)
        for start, stop in pairwise(band_edges):
            buckets: dict[bytes, list[int]] = defaultdict(list)
            for i, key in enumerate(np.packbits(bits[:, start:stop], axis=1)):
                buckets[key.tobytes()].append(i)
            for rows in buckets.values():
                for k, row in enumerate(rows[:-1]):
                    others = np.asarray(rows[k + 1 :])
                    distances = np.bitwise_count(words[others] ^ words[row]).sum(axis=1)
                    for other in others[distances <= max_bits]:
                        groups.union(row, int(other))
    return [groups.find(i) for i in range(n)]


def assign_splits(
    labels: Sequence[str],
    groups: Sequence[int],
    group_keys: Mapping[int, str],
    fractions: dict[str, float],
    seed: int,
    held_out: Sequence[bool] = (),
) -> list[str]:
    """A split name per row: stratified by label, whole duplicate groups together, reproducible.

    Each group (labelled by its most common label) is ordered by a seeded hash of its content key, so
    the assignment depends on image content and the seed, never on file names or scan order. Groups
    then go, in that order, to whichever split is furthest below its target share of the class.
    A row marked `held_out` (its source is held out) takes its whole group to test, so that no copy of a
    held-out image reaches train or val; the other groups share the fractions among themselves.
    """
    test_groups = {groups[row] for row, held in enumerate(held_out) if held}
    members: dict[int, list[int]] = defaultdict(list)
    for row, group in enumerate(groups):
        members[group].append(row)
    by_class: dict[str, list[int]] = defaultdict(list)
    for group, rows in members.items():
        if group in test_groups:
            continue
        label = Counter(labels[r] for r in rows).most_common(1)[0][0]
        by_class[label].append(group)

    def order(group: int) -> str:
        return hashlib.sha256(f"{seed}:{group_keys[group]}".encode()).hexdigest()

    names = list(fractions)
    targets = np.array([fractions[s] for s in names])
    assignment = ["test" if group in test_groups else "" for group in groups]
    for label in sorted(by_class):
        assigned = np.zeros(len(names))
        for group in sorted(by_class[label], key=order):
            size = len(members[group])
            deficit = targets * (assigned.sum() + size) - assigned
            choice = int(np.argmax(deficit))
            assigned[choice] += size
            for row in members[group]:
                assignment[row] = names[choice]
    return assignment


def choose_test_sources(requested: Sequence[str], known: Mapping[str, int]) -> set[str]:
    """The sources of `known` (source → images) that --test-sources names, compared without case or "www.".

    A name that is no known source is an error listing the known ones, and so is holding out every
    source, which would leave nothing to train on.
    """
    by_key = {_source_key(source): source for source in known}
    chosen: set[str] = set()
    for name in requested:
        source = by_key.get(_source_key(name))
        if source is None:
            close = difflib.get_close_matches(_source_key(name), list(by_key), n=1)
            hint = f" (did you mean {by_key[close[0]]!r}?)" if close else ""
            listing = ", ".join(f"{s} ({n} images)" for s, n in known.items())
            raise ConfigError(f"--test-sources: unknown source {name!r}{hint}; the sources are: {listing}")
        chosen.add(source)
    if chosen >= set(known):
        raise ConfigError(
            f"--test-sources: {', '.join(sorted(chosen))} is every source of the dataset; "
            "hold out fewer, so that something is left to train on"
        )
    return chosen


def _source_key(name: str) -> str:
    return name.strip().casefold().removeprefix("www.").rstrip("/")
