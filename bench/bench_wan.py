"""End to end over a modelled network: rup's single session and composite uploads.

Loopback on 2 shared cores measures CPU, not what users feel. Here both legs go through
``rup faultproxy`` with a named profile, per connection (``--profile``; "wan" by default):

    client ──[client leg: 20 MB/s, 10 ms each way]──► rup serve ──[GCS leg: 50 MB/s, 5 ms]──► GCS

One object (1 GiB; 256 MiB with ``--quick``) is uploaded, each way in one run:

* ``direct_grm_client_leg``: google-resumable-media, one stream, through the client leg's
  link straight to the endpoint: the user's alternative, uploading from where they are;
* ``direct_grm_gcs_leg``: the same through the GCS leg's link (what one session can do);
* ``single_cN``: rup with N = 1, 4, 8 client connections and one GCS session;
* ``composite_kK``: rup composite (``rup serve --composite always``) with K = 2, 4, 8
  segments in flight, over K client connections.

Each rup run has a fresh ``rup serve`` process, whose CPU seconds per GiB and peak RSS
(``VmHWM``, and its growth over the started, idle process) are read from ``/proc``. Reported:
MB/s, the share of the profile's aggregate link limit (the slower leg's per-connection rate
times the connections or sessions that leg carries), CPU s/GiB, peak RSS against the proxy's
configured buffers (K windows) plus 64 MiB, and the ratios the issue sets targets for. ``--plot
FILE`` draws throughput against K and connections (needs matplotlib: ``pip install
matplotlib``).

The fault proxies are Python processes on the same 2 shared cores: at the higher rates,
their CPU, not the modelled links, may be what caps a run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from bench._rup_process import (
    behind_profile,
    process_cpu_seconds,
    process_rss,
    rup_process,
    serve_address,
)
from bench.bench_writer import anchor_throughput, gcs_endpoint
from faultnet.gcs.clients import anonymous_client
from faultnet.profiles import PROFILES, Leg
from proxy.client import ClientSettings, UploadOptions, upload_file

__all__ = ["run"]

MiB = 1024 * 1024
CHUNK = 8 * MiB
CONNECTIONS = (1, 4, 8)
PARALLEL = (2, 4, 8)
UPLOAD_BUFFER_MIB = 32
RESULTS = Path(__file__).parent / "results" / "wan.json"
#: where ``python -m bench`` draws the plot that docs/benchmarks.md shows
PLOT = Path(__file__).parent.parent / "docs" / "wan.svg"
#: the issue's targets, under "wan"
TARGET_TO_DIRECT = 3.0
TARGET_TO_SINGLE = 2.0
TARGET_LINK_SHARE = 0.85


@contextlib.contextmanager
def _proxy(gcs_url: str, composite: str, parallel: int, segment: int) -> Iterator[tuple[str, int]]:
    """A fresh ``rup serve`` writing to ``gcs_url``; yields HOST:PORT and its pid."""
    with rup_process(
        "serve", "--listen", "127.0.0.1:0", "--gcs-endpoint", gcs_url,
        "--upload-buffer-mib", str(UPLOAD_BUFFER_MIB),
        "--composite", composite, "--parallel-segments", str(parallel),
        "--segment-size-mib", str(segment // MiB),
    ) as (process, line):  # fmt: skip
        host, port = serve_address(line)
        yield f"{host}:{port}", process.pid


def _payload(path: Path, size: int) -> None:
    block = os.urandom(8 * MiB)
    with path.open("wb") as file:
        for offset in range(0, size, len(block)):
            file.write(block[: min(len(block), size - offset)])


def _upload(address: str, path: Path, name: str, connections: int) -> tuple[float, bool]:
    """Seconds for ``rup`` to upload ``path``, and whether the object is composite."""
    host, _, port = address.rpartition(":")
    expected = path.stat().st_size

    async def go() -> tuple[float, bool]:
        started = time.perf_counter()
        options = UploadOptions(
            proxy=(host, int(port)), settings=ClientSettings(connections=connections)
        )
        result = await upload_file(path, f"gs://bench/{name}", options)
        if result.size != expected:
            raise RuntimeError(f"the proxy reported {result.size} bytes for {name}")
        return time.perf_counter() - started, result.composite

    return trio.run(go)


def _rup_run(
    gcs_leg: str,
    profile: str,
    path: Path,
    *,
    connections: int,
    composite: bool,
    parallel: int,
    segment: int,
) -> dict[str, Any]:
    size = path.stat().st_size
    mode = "always" if composite else "never"
    name = f"k{parallel}" if composite else f"c{connections}"
    with (
        _proxy(gcs_leg, mode, parallel, segment) as (address, pid),
        behind_profile(address, profile, Leg.CLIENT.value) as client_leg,
    ):
        cpu_before = process_cpu_seconds(pid)
        idle = process_rss(pid, "VmRSS")
        seconds, is_composite = _upload(client_leg, path, name, connections)
        cpu = process_cpu_seconds(pid) - cpu_before
        rss = process_rss(pid)
    if is_composite != composite:
        raise RuntimeError(f"{name}: expected composite={composite}, got {is_composite}")
    rate = size / seconds
    limit = _link_limit(profile, connections=connections, sessions=parallel if composite else 1)
    buffers = (parallel if composite else 1) * UPLOAD_BUFFER_MIB * MiB
    return {
        "mb_per_s": round(rate / 1e6, 1),
        "share_of_link_limit": None if limit is None else round(rate / limit, 3),
        "link_limit_mb_per_s": None if limit is None else round(limit / 1e6, 1),
        "proxy_cpu_seconds_per_gib": round(cpu / (size / (1 << 30)), 2),
        "proxy_peak_rss_mib": round(rss / MiB, 1),
        # what the upload added to the started, idle process, against its buffers + 64 MiB
        "proxy_rss_growth_mib": round((rss - idle) / MiB, 1),
        "proxy_rss_bound_mib": round((buffers + 64 * MiB) / MiB, 1),
    }


def _link_limit(profile: str, *, connections: int, sessions: int) -> float | None:
    """The most the profile lets through: each leg's per-connection rate times the
    connections (client leg) or sessions (GCS leg) it carries, the slower leg's; None
    for a profile without rates ("lan")."""
    links = PROFILES[profile]
    client, gcs = links.link(Leg.CLIENT).rate, links.link(Leg.GCS).rate
    if client is None or gcs is None:
        return None
    return float(min(connections * client, sessions * gcs))


def run(
    quick: bool, size: int | None = None, profile: str = "wan", plot: Path | None = PLOT
) -> dict[str, Any]:
    """Every mode once, in one run; also writes :data:`RESULTS` (and ``plot``)."""
    size = size or ((256 if quick else 1024) * MiB)
    segment = max(CHUNK, -(-size // 16 // CHUNK) * CHUNK)  # 16 segments: K=8 has work for all
    runs: dict[str, dict[str, Any]] = {}
    links = PROFILES[profile]
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(gcs_endpoint())
        endpoint = url.removeprefix("http://").rstrip("/")
        gcs_leg, client_direct = (
            "http://" + stack.enter_context(behind_profile(endpoint, profile, leg.value))
            for leg in (Leg.GCS, Leg.CLIENT)
        )
        for leg, through in ((Leg.CLIENT, client_direct), (Leg.GCS, gcs_leg)):
            rate = anchor_throughput(through, size, CHUNK)
            link = links.link(leg).rate
            runs[f"direct_grm_{leg.value}_leg"] = {
                "mb_per_s": round(rate / 1e6, 1),
                "share_of_link_limit": None if link is None else round(rate / link, 3),
            }
        path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "payload.bin"
        _payload(path, size)
        for connections in CONNECTIONS:
            runs[f"single_c{connections}"] = _rup_run(
                gcs_leg, profile, path, connections=connections, composite=False,
                parallel=1, segment=segment,
            )  # fmt: skip
        for parallel in PARALLEL:
            runs[f"composite_k{parallel}"] = _rup_run(
                gcs_leg, profile, path, connections=parallel, composite=True,
                parallel=parallel, segment=segment,
            )  # fmt: skip
        storage = anonymous_client(url)
        leftovers = [blob.name for blob in storage.list_blobs("bench", prefix=".rup/")]
    direct = runs["direct_grm_client_leg"]["mb_per_s"]
    single = runs["single_c4"]["mb_per_s"]
    k4 = runs["composite_k4"]["mb_per_s"]
    single_share = runs["single_c8"]["share_of_link_limit"]
    result: dict[str, Any] = {
        "benchmark": "wan",
        "profile": profile,
        "links": links.description,
        "size_bytes": size,
        "segment_bytes": segment,
        "runs": runs,
        "ratio_composite_k4_to_direct_client_leg": round(k4 / direct, 2),
        "ratio_composite_k4_to_single_c4": round(k4 / single, 2),
        "single_session_share_of_gcs_link": single_share,
        "targets": {
            "composite_k4_to_direct_client_leg": TARGET_TO_DIRECT,
            "composite_k4_to_single": TARGET_TO_SINGLE,
            "single_session_share": TARGET_LINK_SHARE,
        },
        "proxy_within_buffers_plus_64_mib": all(
            values["proxy_rss_growth_mib"] <= values["proxy_rss_bound_mib"]
            for values in runs.values()
            if "proxy_rss_growth_mib" in values
        ),
        "temporaries_left_behind": leftovers,
    }
    if plot is not None:
        try:
            _plot(result, plot)
        except ImportError:
            result["plot"] = "not drawn: matplotlib is not installed (pip install -e '.[bench]')"
        else:
            result["plot"] = str(plot)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _plot(result: dict[str, Any], path: Path) -> None:
    """Throughput against connections (one session) and K (composite, K connections)."""
    import matplotlib  # optional (the "bench" extra): imported only for --plot

    matplotlib.use("Agg")
    from matplotlib import pyplot

    runs = result["runs"]
    figure, axes = pyplot.subplots(figsize=(6, 4))
    axes.plot(CONNECTIONS, [runs[f"single_c{n}"]["mb_per_s"] for n in CONNECTIONS], "o-",
              label="rup, one GCS session (x = client connections)")  # fmt: skip
    axes.plot(PARALLEL, [runs[f"composite_k{k}"]["mb_per_s"] for k in PARALLEL], "s-",
              label="rup composite (x = K segments = connections)")  # fmt: skip
    for name, style in (("direct_grm_client_leg", ":"), ("direct_grm_gcs_leg", "--")):
        axes.axhline(runs[name]["mb_per_s"], linestyle=style, color="grey",
                     label=name.replace("_", " "))  # fmt: skip
    axes.set_xlabel("client connections / K")
    axes.set_ylabel("MB/s")
    axes.set_xticks(sorted({*CONNECTIONS, *PARALLEL}))
    axes.set_title(f"{result['size_bytes'] // MiB} MiB over the '{result['profile']}' profile")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB")
    parser.add_argument("--profile", default="wan", choices=sorted(PROFILES))
    parser.add_argument(
        "--plot", type=Path, default=PLOT, help=f"where to draw the plot (default {PLOT.name})"
    )
    args = parser.parse_args(argv)
    json.dump(run(args.quick, profile=args.profile, plot=args.plot), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
