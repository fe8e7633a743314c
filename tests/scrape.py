"""Reading Ray's Prometheus endpoint in tests: scrape, sum over Ray's own labels, poll with a bound."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.http_client import HTTP

T = TypeVar("T")


def scrape(url: str) -> list[Sample]:
    """Every sample on the endpoint (names as exported: `ray_` prefix, `_total`/`_bucket` suffixes)."""
    text = HTTP.get(url, timeout=5).text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float | None:
    """`name` summed over the series whose labels include `labels` (Ray adds WorkerId, NodeAddress, ...);
    None when there is no such series."""
    values = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    return sum(values) if values else None


def wait_for(url: str, condition: Callable[[list[Sample]], T | None], timeout: float, what: str) -> T:
    """Scrape `url` until `condition(samples)` is truthy and return it; fail after `timeout` seconds,
    showing the cxr samples last seen (Ray exports metrics every RAY_metrics_report_interval_ms)."""
    deadline = time.monotonic() + timeout
    samples: list[Sample] = []
    while True:
        try:
            samples = scrape(url)
        except httpx.HTTPError:
            samples = []
        found = condition(samples)
        if found:
            return found
        if time.monotonic() > deadline:
            seen = "\n".join(f"{s.name}{s.labels} {s.value}" for s in samples if "cxr_" in s.name)
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; cxr samples seen:\n{seen}")
        time.sleep(0.25)
