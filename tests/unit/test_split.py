"""Duplicate grouping, the stratified, deterministic, duplicate-aware split, and held-out sources."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from cxrcore.config import ConfigError
from cxrcore.data.split import assign_splits, choose_test_sources, duplicate_groups

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def _hashes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2**63, size=(n, 4), dtype=np.int64).astype(np.uint64)


def test_exact_and_near_duplicates_are_grouped() -> None:
    rng = np.random.default_rng(0)
    words = _hashes(rng, 6)
    words[3] = words[1]
    words[3, 0] ^= np.uint64(0b1011)  # 3 bits from row 1: a near duplicate
    words[4] = words[2]
    words[4, 0] ^= np.uint64((1 << 40) - 1)  # 40 bits from row 2: a different image
    digests = ["a", "b", "c", "d", "e", "a"]  # row 5 is an exact copy of row 0
    groups = duplicate_groups(digests, words, max_bits=4)
    assert groups == [0, 1, 2, 1, 4, 0]
    assert duplicate_groups(digests, words, max_bits=0) == [0, 1, 2, 3, 4, 0]


def test_near_duplicates_are_found_wherever_the_differing_bits_are() -> None:
    rng = np.random.default_rng(1)
    words = _hashes(rng, 200)
    for i in range(0, 200, 2):  # every odd row differs from its even neighbour in 12 random bits
        copy = words[i].copy()
        for bit in rng.choice(256, size=12, replace=False):
            copy[bit // 64] ^= np.uint64(1 << int(bit % 64))
        words[i + 1] = copy
    groups = duplicate_groups([str(i) for i in range(200)], words, max_bits=12)
    assert groups == [i - i % 2 for i in range(200)]


def _all_pairs_groups(digests: list[str], words: np.ndarray, max_bits: int) -> list[int]:
    """The definition, pair by pair: rows join when their contents match or hashes are within max_bits."""
    n = len(digests)
    group = list(range(n))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            distance = int(np.bitwise_count(words[i] ^ words[j]).sum())
            if digests[i] == digests[j] or (max_bits > 0 and distance <= max_bits):
                low, high = sorted((root(i), root(j)))
                group[high] = low
    return [root(i) for i in range(n)]


def _clustered(rng: np.random.Generator, n: int, centres: int, flips: int) -> np.ndarray:
    """n hashes around a few centres, each up to `flips` random bits away: chains of near duplicates."""
    words = _hashes(rng, centres)[rng.integers(0, centres, size=n)]
    for row in words:
        for bit in rng.choice(256, size=int(rng.integers(0, flips + 1)), replace=False):
            row[bit // 64] ^= np.uint64(1 << int(bit % 64))
    return words


@pytest.mark.parametrize("max_bits", [0, 3, 12])
@pytest.mark.parametrize("pairs_per_chunk", [1 << 20, 7])
def test_duplicate_groups_match_the_all_pairs_definition(
    max_bits: int, pairs_per_chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tiny chunk makes every bucket take the row-block path that very large buckets take.
    monkeypatch.setattr("cxrcore.data.split.PAIRS_PER_CHUNK", pairs_per_chunk)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        words = _clustered(rng, 150, centres=12, flips=2 * max_bits + 2)
        words[rng.integers(0, 150, size=20)] = words[rng.integers(0, 150, size=20)]  # identical hashes
        digests = [str(d) for d in rng.integers(0, 130, size=150)]  # some exact copies by content
        assert duplicate_groups(digests, words, max_bits) == _all_pairs_groups(digests, words, max_bits)


def test_many_identical_hashes_form_one_group_and_max_bits_0_groups_by_content_only() -> None:
    words = np.repeat(_hashes(np.random.default_rng(2), 1), 3000, axis=0)
    digests = [str(i % 5) for i in range(3000)]
    assert duplicate_groups(digests, words, max_bits=6) == [0] * 3000
    assert duplicate_groups(digests, words, max_bits=0) == [i % 5 for i in range(3000)]
    assert duplicate_groups([], np.zeros((0, 4), dtype=np.uint64), max_bits=6) == []


def test_split_is_stratified_and_close_to_the_fractions() -> None:
    labels = ["A"] * 500 + ["B"] * 50 + ["C"] * 7
    groups = list(range(len(labels)))
    splits = assign_splits(labels, groups, {g: f"k{g}" for g in groups}, FRACTIONS, seed=0)
    for label, n in Counter(labels).items():
        counts = Counter(s for s, lab in zip(splits, labels, strict=True) if lab == label)
        for split, fraction in FRACTIONS.items():
            assert abs(counts[split] - fraction * n) <= 1, (label, split, counts)


def test_duplicate_groups_stay_in_one_split_and_split_depends_on_content_and_seed() -> None:
    labels = ["A"] * 100
    groups = [i // 4 * 4 for i in range(100)]  # groups of four
    keys = {g: f"content-{g}" for g in set(groups)}
    splits = assign_splits(labels, groups, keys, FRACTIONS, seed=0)
    for g in set(groups):
        assert len({splits[i] for i in range(100) if groups[i] == g}) == 1
    assert splits == assign_splits(labels, groups, keys, FRACTIONS, seed=0)
    assert splits != assign_splits(labels, groups, keys, FRACTIONS, seed=1)
    # Renumbering rows (another scan order) moves nothing: the split follows content keys.
    order = list(reversed(range(100)))
    renumbered_groups = [99 - groups[i] - 3 for i in order]  # each group's smallest new row index
    renumbered_keys = {99 - g - 3: k for g, k in keys.items()}
    renumbered = assign_splits(
        [labels[i] for i in order], renumbered_groups, renumbered_keys, FRACTIONS, seed=0
    )
    assert renumbered == [splits[i] for i in order]


def test_images_added_or_removed_move_few_of_the_others() -> None:
    """A dataset's next version (a folder grown by new images, or one removed) keeps its other images where
    they were: 2 of 160 moved when 40 were added, none when one was removed (55 and 18 before, when each
    group went to the split furthest below its share in turn). A model trained on the first version is
    scored on the second's test split without having trained on most of it."""

    def splits(rows: range) -> dict[str, str]:
        keys = {row: f"image-{row}" for row in rows}
        assigned = assign_splits(["A"] * len(rows), list(rows), keys, FRACTIONS, seed=0)
        return dict(zip(keys.values(), assigned, strict=True))

    first, grown, shrunk = splits(range(160)), splits(range(200)), splits(range(1, 160))
    assert sum(first[key] != grown[key] for key in first) <= 4
    assert sum(first[key] != shrunk[key] for key in shrunk) <= 2
    assert Counter(grown.values()) == {"train": 160, "val": 20, "test": 20}


def test_held_out_rows_and_their_duplicates_all_go_to_test_and_the_rest_split_as_alone() -> None:
    labels = ["A"] * 60 + ["B"] * 40
    groups = [i - i % 2 if i < 20 else i for i in range(100)]  # rows 0..19 in pairs of duplicates
    keys = {g: f"k{g}" for g in set(groups)}
    held = [i % 5 == 0 for i in range(100)]  # every fifth row's source is held out; row 0 pairs with 1
    splits = assign_splits(labels, groups, keys, FRACTIONS, seed=0, held_out=held)
    test_groups = {groups[i] for i in range(100) if held[i]}
    assert all(splits[i] == "test" for i in range(100) if groups[i] in test_groups)
    assert splits[1] == "test"  # a duplicate of a held-out image never reaches train or val
    rest = [i for i in range(100) if groups[i] not in test_groups]
    alone = assign_splits([labels[i] for i in rest], [groups[i] for i in rest], keys, FRACTIONS, seed=0)
    assert [splits[i] for i in rest] == alone
    assert assign_splits(labels, groups, keys, FRACTIONS, 0, [False] * 100) == assign_splits(
        labels, groups, keys, FRACTIONS, 0
    )


def test_test_sources_are_names_from_the_scan() -> None:
    known = {"site-a.synthetic.cxr": 40, "site-b.synthetic.cxr": 38, "nejm.org": 10}
    assert choose_test_sources(["WWW.Site-B.synthetic.cxr/", "nejm.org"], known) == {
        "site-b.synthetic.cxr",
        "nejm.org",
    }
    assert choose_test_sources([], known) == set()
    with pytest.raises(ConfigError, match=r"unknown source 'site-c.synthetic.cxr' \(did you mean 'site-"):
        choose_test_sources(["site-c.synthetic.cxr"], known)
    with pytest.raises(ConfigError, match=r"sources are: site-a.synthetic.cxr \(40 images\), site-b"):
        choose_test_sources(["nowhere"], known)
    with pytest.raises(ConfigError, match="every source of the dataset"):
        choose_test_sources(list(known), known)


def test_patients_join_their_groups_and_a_placeholder_id_joins_nothing() -> None:
    from cxrcore.data.split import patient_groups

    duplicates = [0, 1, 1, 3, 4, 5]  # rows 1 and 2 are copies of one picture
    patients = ["P1", "", "P2", "P1", "P2", ""]
    groups, placeholders = patient_groups(duplicates, patients)
    assert groups == [0, 1, 1, 0, 1, 5] and placeholders == {}  # P2 joins row 4 to the copies' group
    many = ["ANON"] * 12 + ["P3", "P3"] + [""] * 6  # 12 of 20: a placeholder, not a patient
    groups, placeholders = patient_groups(list(range(20)), many)
    assert placeholders == {"ANON": 12} and groups == [*range(12), 12, 12, *range(14, 20)]
    masked = ["0000", "0000", "XXXX", "XXXX", "7", "7", "Unknown", "Unknown"]  # "7" is a patient
    groups, placeholders = patient_groups(list(range(8)), masked)
    assert groups == [0, 1, 2, 3, 4, 4, 6, 7] and placeholders == {"0000": 2, "Unknown": 2, "XXXX": 2}
    common = ["P1"] * 25 + [f"Q{i}" for i in range(75)]  # a quarter under one id: more than a patient holds
    assert patient_groups(list(range(100)), common)[1] == {"P1": 25}


def test_an_id_taken_for_a_placeholder_by_its_count_alone_is_neither_printed_nor_stored() -> None:
    """A privacy review (session 52): a patient with 22 daily films (over 20 and a tenth of the images) had
    their MRN printed and kept in ingest_report.json as an "anonymised placeholder"; ids that say they name
    no one ("ANON", zeros) are still named, and so are patient folders, whose names the dataset holds."""
    import json

    from cxrcore.data.ingest import _patient_warnings, _shown

    placeholders = {"ANON": 30, "MRN-0042": 22}
    report = {"column": "PatientID (DICOM)", "placeholders": _shown(placeholders), "without_patient": 52}
    warnings = _patient_warnings(report)
    assert report["placeholders"] == {"ANON": 30, "not shown 1": 22}
    assert "MRN-0042" not in json.dumps(report) + "".join(warnings)
    assert warnings[0].startswith("patient id 'ANON' names 30 images")
    assert warnings[1].startswith("a patient id (not shown: it may be a real patient's, with many films)")
