"""Throughput of the TCP chaos proxy against a direct loopback copy.

The same sender and receiver (blocking sockets, one thread each, 1 MiB writes and reads)
move the same bytes three ways: directly, through the proxy with no toxics, and through
the proxy with an inert toxic (a ``corrupt`` placed past the end of the stream, so the
fault engine runs on every chunk but never changes a byte). The proxy runs in its own
process, as it does under ``rup faultproxy``, so it does not share a GIL with the sender
and receiver. Target: at least 500 MB/s through the proxy with no toxics.

Run ``python -m bench.bench_faultproxy --size 256`` for a quick run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import statistics
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import trio

from faultnet.plan import Corrupt, FaultPlan
from faultnet.tcpproxy import Address, open_chaos_proxy

__all__ = ["TARGET_MB_PER_S", "main", "run"]

#: the issue's target for the proxy with no toxics, in MB/s (10**6 bytes)
TARGET_MB_PER_S = 500.0
QUICK_SIZE = 256 * 1024 * 1024
FULL_SIZE = 1024 * 1024 * 1024
ROUNDS = 3
BLOCK = 1024 * 1024
RESULTS = Path(__file__).resolve().parent / "results" / "faultproxy.json"


def _start_receiver() -> tuple[Address, threading.Thread]:
    """A one-shot server: count bytes until EOF, answer with the count, close."""
    server = socket.create_server(("127.0.0.1", 0))
    host, port = server.getsockname()[:2]

    def receive() -> None:
        with server, server.accept()[0] as connection:
            buffer = bytearray(BLOCK)
            total = 0
            while count := connection.recv_into(buffer):
                total += count
            connection.sendall(str(total).encode())

    thread = threading.Thread(target=receive, name="bench-receiver", daemon=True)
    thread.start()
    return (host, port), thread


def _send(address: Address, size: int) -> float:
    """Send ``size`` bytes to ``address``; the seconds until the receiver confirmed them all."""
    block = memoryview(bytes(BLOCK))
    with socket.create_connection(address) as connection:
        started = time.perf_counter()
        remaining = size
        while remaining:
            piece = block[: min(remaining, BLOCK)]
            connection.sendall(piece)
            remaining -= len(piece)
        connection.shutdown(socket.SHUT_WR)
        confirmed = int(connection.recv(64))
        elapsed = time.perf_counter() - started
    if confirmed != size:
        raise RuntimeError(f"receiver got {confirmed} bytes of {size}")
    return elapsed


def _serve_proxy(plan_text: str, address_pipe: Connection, stop_pipe: Connection) -> None:
    """Child process: run a proxy to the upstream the parent names, until told to stop."""

    async def serve() -> None:
        upstream: Address = address_pipe.recv()
        async with open_chaos_proxy(upstream, FaultPlan.parse(plan_text)) as proxy:
            address_pipe.send(proxy.address)
            await trio.to_thread.run_sync(stop_pipe.recv)

    trio.run(serve)


def _measure(size: int, plan: FaultPlan | None) -> float:
    """MB/s of one transfer, directly (``plan`` None) or through a proxy running ``plan``."""
    receiver_address, receiver = _start_receiver()
    if plan is None:
        seconds = _send(receiver_address, size)
        receiver.join()
        return size / seconds / 1e6

    context = multiprocessing.get_context("spawn")
    parent_address, child_address = context.Pipe()
    parent_stop, child_stop = context.Pipe()
    process = context.Process(
        target=_serve_proxy, args=(plan.to_json(), child_address, child_stop), daemon=True
    )
    process.start()
    try:
        parent_address.send(receiver_address)
        proxy_address: Address = parent_address.recv()
        seconds = _send(proxy_address, size)
        receiver.join()
    finally:
        parent_stop.send(None)
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
    return size / seconds / 1e6


def run(quick: bool, size: int | None = None) -> dict[str, Any]:
    """Measure all three ways; best of :data:`ROUNDS` each. Also writes :data:`RESULTS`."""
    size = size or (QUICK_SIZE if quick else FULL_SIZE)
    inert = FaultPlan(toxics=(Corrupt(at=size * 2),))  # never reached: the engine idles
    scenarios: dict[str, FaultPlan | None] = {
        "direct": None,
        "proxy": FaultPlan.NONE,
        "proxy_inert_toxic": inert,
    }
    runs: dict[str, list[float]] = {name: [] for name in scenarios}
    for _ in range(ROUNDS):  # interleaved, so machine noise hits every scenario alike
        for name, plan in scenarios.items():
            runs[name].append(_measure(size, plan))
    best = {name: max(values) for name, values in runs.items()}
    result: dict[str, Any] = {
        "benchmark": "faultproxy",
        "size_bytes": size,
        "rounds": ROUNDS,
        "mb_per_s": {name: round(value, 1) for name, value in best.items()},
        "median_mb_per_s": {name: round(statistics.median(v), 1) for name, v in runs.items()},
        "ratio_to_direct": {
            name: round(best[name] / best["direct"], 3) for name in scenarios if name != "direct"
        },
        "target_mb_per_s": TARGET_MB_PER_S,
        "ratio_to_target": round(best["proxy"] / TARGET_MB_PER_S, 3),
        "meets_target": best["proxy"] >= TARGET_MB_PER_S,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_faultproxy", description=__doc__)
    parser.add_argument(
        "--size",
        type=int,
        metavar="MIB",
        help=f"MiB per transfer (default {FULL_SIZE >> 20}; {QUICK_SIZE >> 20} with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args(argv)
    result = run(args.quick, args.size * 1024 * 1024 if args.size else None)
    size_mib = result["size_bytes"] >> 20
    print(f"chaos proxy throughput, {size_mib} MiB per transfer, best of {ROUNDS}:")
    for name, value in result["mb_per_s"].items():
        ratio = result["ratio_to_direct"].get(name, 1.0)
        print(f"  {name:<18} {value:8.1f} MB/s   {ratio:6.3f}x direct")
    verdict = "meets" if result["meets_target"] else "MISSES"
    print(
        f"  proxy vs target {TARGET_MB_PER_S:.0f} MB/s: {result['ratio_to_target']:.2f}x "
        f"({verdict} it)"
    )
    print(f"  written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
