"""The proxy's counters as the chaos report shows them: one count per label value."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Metric

__all__ = ["counts_by_label"]


def counts_by_label(families: Iterable[Metric]) -> dict[str, int]:
    """``{label value: count}`` of a counter with one label, e.g. ``counter.collect()``."""
    return {
        next(iter(sample.labels.values()), ""): int(sample.value)
        for metric in families
        for sample in metric.samples
        if sample.name.endswith("_total")
    }
