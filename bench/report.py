"""Turning benchmark results into a table, ``docs/benchmarks.md`` and PNG plots.

Each benchmark returns its own dict; nothing here depends on their exact shapes beyond two
conventions: a number whose key contains ``ratio`` is a claim (a ratio to the benchmark's
stated baseline), and the series the plots need are looked up where their benchmarks put
them, skipping a plot whose data is missing. matplotlib is optional (the ``bench`` extra):
without it the report still has every figure, just no plots.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

__all__ = [
    "PLOTS",
    "find_ratios",
    "flatten",
    "machine",
    "now",
    "render_markdown",
    "write_plots",
]

ROOT: Final = Path(__file__).resolve().parent.parent
_MiB: Final = 1024 * 1024

#: plot file name -> caption; each is drawn by the function of the same name below
PLOTS: Final = {
    "writer_chunk_size.png": "ReliableWriter and google-resumable-media against chunk size",
    "chaos_intensity.png": "rup chaos: throughput and verified share against fault intensity",
    "soak_rss.png": "rup chaos soak: process RSS over the course of the run",
}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    memory = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count() or 0,
        "cpu_model": cpu,
        "memory_bytes": memory,
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
    }


def flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every scalar in a nested result, as (``dotted.key``, value); lists are skipped."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, f"{path}.")
        elif isinstance(value, bool | int | float | str) or value is None:
            yield path, value


def find_ratios(result: Mapping[str, Any]) -> dict[str, float]:
    """The claims of one result: every number under a key that mentions ``ratio``.

    ``target_ratio`` and the like are the goals the claims are held to, not claims.
    """
    return {
        key: float(value)
        for key, value in flatten(result)
        if "ratio" in key
        and not key.rpartition(".")[2].startswith("target")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.4e}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 * _MiB:
        return f"{value} ({value / _MiB:.1f} Mi)"
    return str(value)


def _cell(text: str) -> str:
    """``text`` made safe for a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _record_lists(result: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]]:
    """Lists of records (a sweep's points, say) at the top level or one level down."""
    found: dict[str, list[Mapping[str, Any]]] = {}
    for key, value in result.items():
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            found[key] = value
        elif isinstance(value, Mapping):
            found.update({f"{key}.{k}": v for k, v in _record_lists(value).items() if "." not in k})
    return found


def _not_verified(data: Any) -> Iterator[str]:
    """Every line under a ``not_verified`` key, at any depth (chaos runs list them there)."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            if key == "not_verified" and isinstance(value, list):
                yield from (str(line) for line in value)
            else:
                yield from _not_verified(value)
    elif isinstance(data, list):
        for item in data:
            yield from _not_verified(item)


def _table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    for row in rows:
        cells = (
            _cell(str(len(row[c])) if isinstance(row[c], list) else _format(row[c]))
            if c in row
            else ""
            for c in columns
        )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _first_paragraph(text: str | None) -> str:
    return (text or "").strip().split("\n\n", 1)[0].replace("\n", " ")


def render_markdown(
    summary: Mapping[str, Any], docstrings: Mapping[str, str], plots: Sequence[str]
) -> str:
    """``docs/benchmarks.md``: the machine, the command, the claims, every figure, the plots."""
    info = summary["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{summary['command']}` on {summary['generated']}"
        f"{' (quick sizes)' if summary.get('quick') else ''}.",
        "Absolute numbers differ from machine to machine; **the ratios are the claims**.",
        "Rerun everything with `python -m bench` (`--quick` for reduced sizes,",
        "`--only NAME` for one benchmark); raw results are in `bench/results/`.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPUs | {info['cpus']} |",
        f"| CPU model | {info['cpu_model']} |",
        f"| memory | {info['memory_bytes'] / 2**30:.1f} GiB |",
        f"| Python | {info['implementation']} {info['python']} |",
        f"| platform | {info['platform']} |",
        "",
        "## Claims",
        "",
        "| benchmark | ratio | value |",
        "|---|---|---:|",
    ]
    benchmarks: Mapping[str, Any] = summary["benchmarks"]
    for name, entry in benchmarks.items():
        if not entry.get("ok"):
            last_line = (str(entry.get("error", "")).strip().splitlines() or ["?"])[-1]
            lines.append(f"| {name} | did not run: {_cell(last_line[:100])} | |")
            continue
        for key, value in find_ratios(entry["result"]).items():
            lines.append(f"| {name} | `{key}` | {value:.3f} |")
    for name, entry in benchmarks.items():
        lines += ["", f"## {name}", "", _first_paragraph(docstrings.get(name)), ""]
        if not entry.get("ok"):
            lines += ["Did not run:", "", "```", str(entry.get("error", "")).strip(), "```"]
            continue
        when = f", {entry['measured']}" if "measured" in entry else ""
        sizes = " at quick sizes" if entry.get("quick") else ""
        lines += [
            f"Took {entry['seconds']:.0f} s{sizes}{when}.",
            "",
            "| figure | value |",
            "|---|---:|",
        ]
        lines += [
            f"| `{key}` | {_format(value)} |"
            for key, value in flatten(entry["result"])
            if key != "benchmark"
        ]
        for key, rows in _record_lists(entry["result"]).items():
            lines += ["", f"`{key}`:", "", *_table(rows)]
        not_verified = list(_not_verified(entry["result"]))
        if not_verified:
            lines += ["", "Uploads not verified, each with the command that replays it:", ""]
            lines += [f"- {_cell(line)}" for line in not_verified]
    if plots:
        lines += ["", "## Plots", ""]
        for plot in plots:
            lines += [
                f"### {PLOTS.get(plot, plot)}",
                "",
                f"![{PLOTS.get(plot, plot)}](plots/{plot})",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


# -- plots -----------------------------------------------------------------------------------


def _result(summary: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    entry = summary.get("benchmarks", {}).get(name)
    if not entry or not entry.get("ok"):
        return None
    result: Mapping[str, Any] = entry["result"]
    return result


def _chunk_series(writer: Mapping[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Throughput (MiB/s) against chunk size (MiB), per writer, from bench_chunk_sizes."""
    sweep = writer.get("chunk_sweep") or writer.get("by_chunk_size") or []
    series: dict[str, list[tuple[float, float]]] = {}
    for point in sweep if isinstance(sweep, list) else []:
        if not isinstance(point, Mapping) or "chunk_size" not in point:
            continue
        chunk = float(point["chunk_size"]) / _MiB
        for key, value in point.items():
            if key != "chunk_size" and isinstance(value, int | float) and "mib_s" in key:
                series.setdefault(key.removesuffix("_mib_s"), []).append((chunk, float(value)))
    return series


def writer_chunk_size(summary: Mapping[str, Any], axes: Any) -> bool:
    sweep = _result(summary, "chunk_sizes")
    series = _chunk_series(sweep) if sweep is not None else {}
    if not series:
        return False
    labels = {"reliablewriter": "ReliableWriter", "resumable_media": "google-resumable-media"}
    for name, points in sorted(series.items()):
        xs, ys = zip(*sorted(points), strict=True)
        axes.plot(xs, ys, marker="o", label=labels.get(name, name))
    axes.set_xscale("log", base=2)
    axes.set_xticks(xs, [f"{x:g}" for x in xs])
    axes.set_xlabel("chunk size (MiB)")
    axes.set_ylabel("throughput (MiB/s)")
    axes.set_ylim(bottom=0)
    axes.legend()
    return True


def chaos_intensity(summary: Mapping[str, Any], axes: Any) -> bool:
    soak = _result(summary, "soak")
    sweep = soak.get("intensity_sweep", []) if soak is not None else []
    if not sweep:
        return False
    xs = [point["intensity"] for point in sweep]
    axes.plot(xs, [point["throughput_mib_s"] for point in sweep], marker="o", label="MiB/s")
    axes.set_xlabel("fault intensity (x moderate mix)")
    axes.set_ylabel("aggregate throughput (MiB/s)")
    axes.set_ylim(bottom=0)
    share = axes.twinx()
    share.plot(xs, [100 * point["verified_share"] for point in sweep], "g--", marker="s")
    share.set_ylabel("verified (%)", color="g")
    share.set_ylim(0, 105)
    return True


def soak_rss(summary: Mapping[str, Any], axes: Any) -> bool:
    soak = _result(summary, "soak")
    samples = soak.get("soak", {}).get("rss_samples", []) if soak is not None else []
    if not samples:
        return False
    axes.plot([s[0] for s in samples], [s[1] / _MiB for s in samples], marker=".")
    axes.set_xlabel("uploads finished")
    axes.set_ylabel("process RSS (MiB)")
    axes.set_ylim(bottom=0)
    return True


def write_plots(summary: Mapping[str, Any], directory: Path) -> list[str]:
    """Draw every plot whose data is present; returns the file names written.

    Returns an empty list when matplotlib is not installed (``pip install -e '.[bench]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return []
    drawers = {
        "writer_chunk_size.png": writer_chunk_size,
        "chaos_intensity.png": chaos_intensity,
        "soak_rss.png": soak_rss,
    }
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, draw in drawers.items():
        figure, axes = pyplot.subplots(figsize=(6.4, 4.0), dpi=100)
        try:
            if draw(summary, axes):
                axes.set_title(PLOTS[file_name], fontsize=10)
                axes.grid(True, alpha=0.3)
                figure.tight_layout()
                figure.savefig(directory / file_name)
                written.append(file_name)
        finally:
            pyplot.close(figure)
    return written


def now() -> str:
    """The current UTC time, as the report prints it."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
