"""``python -m bench``: run every benchmark, print the claims, write the report.

Every ``bench/bench_NAME.py`` exposes ``run(quick: bool) -> dict``. Each one runs in a fresh
Python process of its own, so no benchmark's memory, threads or GIL contention leaks into
the next one's numbers (several measure RSS). A benchmark that fails is reported as such
and the others still run. The results go to ``bench/results/all.json`` (merged with the
previous file, so ``--only NAME`` refreshes one entry), and the report to
``docs/benchmarks.md`` with plots in ``docs/plots/`` (plots need the ``bench`` extra).

Exit status: 0 when every benchmark that was asked for ran, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from rich.table import Table

from bench import report

BENCH_DIR: Final = Path(__file__).resolve().parent
RESULTS: Final = BENCH_DIR / "results" / "all.json"
DOCS: Final = BENCH_DIR.parent / "docs"
#: a benchmark still running after this long is stopped and reported as failed
TIMEOUT: Final = 1500.0


def available() -> list[str]:
    """Every benchmark's name: ``bench_NAME.py`` gives ``NAME``."""
    return sorted(path.stem.removeprefix("bench_") for path in BENCH_DIR.glob("bench_*.py"))


def _run_child(name: str, quick: bool, out: Path) -> None:
    """In the child process: run one benchmark and write its result as JSON."""
    module = importlib.import_module(f"bench.bench_{name}")
    out.write_text(json.dumps(module.run(quick)))


def _run_isolated(name: str, quick: bool) -> dict[str, Any]:
    """Run benchmark ``name`` in a fresh process; its entry for ``all.json``."""
    with tempfile.TemporaryDirectory(prefix="rup-bench-") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "bench", "--child", name, "--out", str(out)]
        if quick:
            command.append("--quick")
        started = time.monotonic()
        try:
            process = subprocess.run(
                command, cwd=BENCH_DIR.parent, capture_output=True, text=True, timeout=TIMEOUT,
                check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"ok": False, "seconds": TIMEOUT, "error": f"still running after {TIMEOUT} s"}
        seconds = round(time.monotonic() - started, 1)
        if process.returncode != 0 or not out.exists():
            tail = "\n".join((process.stderr or process.stdout).strip().splitlines()[-15:])
            return {"ok": False, "seconds": seconds, "error": tail or f"exit {process.returncode}"}
        return {"ok": True, "seconds": seconds, "result": json.loads(out.read_text())}


def _docstrings(names: list[str]) -> dict[str, str]:
    docs = {}
    for name in names:
        try:
            docs[name] = importlib.import_module(f"bench.bench_{name}").__doc__ or ""
        except Exception as exc:  # a benchmark that cannot even import still gets a section
            docs[name] = f"(cannot import bench.bench_{name}: {exc})"
    return docs


def _table(entries: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="rup benchmarks: ratios to each baseline (the claims)")
    table.add_column("benchmark")
    table.add_column("time", justify="right")
    table.add_column("status")
    table.add_column("ratio", overflow="fold")
    table.add_column("value", justify="right")
    for name, entry in entries.items():
        if not entry["ok"]:
            error = str(entry.get("error", "")).splitlines()
            table.add_row(
                name,
                f"{entry['seconds']:.0f} s",
                "[red]failed[/red]",
                error[-1][:70] if error else "",
                "",
            )
            continue
        ratios = report.find_ratios(entry["result"]) or {"(no ratio reported)": float("nan")}
        for position, (key, value) in enumerate(ratios.items()):
            first = position == 0
            table.add_row(
                name if first else "",
                f"{entry['seconds']:.0f} s" if first else "",
                "[green]ok[/green]" if first else "",
                key,
                f"{value:.3f}",
            )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="reduced sizes, for a short run")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", choices=available(), help="run only these"
    )
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _run_child(args.child, args.quick, args.out)
        return 0

    console = Console()
    names = args.only or available()
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
        console.print(f"[bold]{name}[/bold]: running{' (quick)' if args.quick else ''}...")
        entries[name] = {
            **_run_isolated(name, args.quick),
            "measured": report.now(),
            "quick": args.quick,
        }
        status = "ok" if entries[name]["ok"] else "[red]FAILED[/red]"
        console.print(f"  {status} in {entries[name]['seconds']:.0f} s")
    console.print(_table(entries))

    previous: dict[str, Any] = {}
    if RESULTS.exists():
        previous = json.loads(RESULTS.read_text()).get("benchmarks", {})
    summary = {
        "generated": report.now(),
        "command": shlex.join(
            ["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])]
        ),
        "quick": args.quick,
        "machine": report.machine(),
        "benchmarks": dict(sorted({**previous, **entries}.items())),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"results: {RESULTS}")
    if not args.no_docs:
        plots = report.write_plots(summary, DOCS / "plots")
        if not plots:
            console.print("no plots: matplotlib is missing (pip install -e '.[bench]') or no data")
        markdown = report.render_markdown(summary, _docstrings(list(summary["benchmarks"])), plots)
        (DOCS / "benchmarks.md").write_text(markdown)
        console.print(f"report: {DOCS / 'benchmarks.md'}")
    return 0 if all(entry["ok"] for entry in entries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
