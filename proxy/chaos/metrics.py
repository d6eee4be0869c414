"""The numbers a chaos run reads: the proxy's counters, fault counts, this process's RSS.

The proxy's counters come from a proxy in this process (its :class:`prometheus_client.Counter`)
or from one in another process (its ``/metrics`` page, read with :func:`scrape`).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable
from typing import Any

import requests
from prometheus_client import Metric
from prometheus_client.parser import text_string_to_metric_families

from faultnet.counters import FaultCountersDict

__all__ = ["counts_by_label", "merged_fault_counts", "process_rss", "scrape"]


def counts_by_label(families: Iterable[Metric]) -> dict[str, int]:
    """``{label value: count}`` of a counter with one label, e.g. ``counter.collect()``."""
    return {
        next(iter(sample.labels.values()), ""): int(sample.value)
        for metric in families
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


def scrape(url: str) -> dict[str, list[Metric]]:
    """Blocking: the metric families of the ``/metrics`` page at ``url``, by name.

    Raises ``requests.RequestException`` when the page cannot be read.
    """
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    families: dict[str, list[Metric]] = {}
    for family in text_string_to_metric_families(response.text):
        families.setdefault(family.name, []).append(family)
    return families


def merged_fault_counts(*counts: FaultCountersDict) -> dict[str, Any]:
    """The sum of several fault counters' snapshots, in the same shape."""
    faults: collections.Counter[str] = collections.Counter()
    for count in counts:
        faults.update(count["faults"])
    return {
        "connections": sum(count["connections"] for count in counts),
        "bytes_up": sum(count["bytes_up"] for count in counts),
        "bytes_down": sum(count["bytes_down"] for count in counts),
        "faults": dict(sorted(faults.items())),
    }


def process_rss() -> int:
    """This process's resident set size, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
