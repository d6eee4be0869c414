"""``rup faultproxy``: run the TCP chaos proxy from the command line.

It prints where it listens on its first line of output (``listening on HOST:PORT``, and
``control API on http://HOST:PORT`` when ``--control`` is given), then relays until
interrupted, and prints its counters as JSON on the way out.
"""

from __future__ import annotations

import argparse
import json
import sys

import trio

from faultnet import tcpproxy
from faultnet.plan import FaultPlan, PlanSyntaxError
from faultnet.tcpproxy import Address, ChaosProxy, open_chaos_proxy

__all__ = ["HELP", "configure", "parse_address", "parse_plan", "run"]

HELP = "relay TCP connections to one upstream, injecting a fault plan's toxics"

_PLAN_HELP = (
    "fault plan, as text (e.g. 'seed=7; latency:down(ms=50); reset_peer:up(after=64k)~0.3') "
    "or JSON; default: no toxics"
)


def parse_address(text: str) -> Address:
    """Read ``HOST:PORT`` (``[V6ADDR]:PORT`` for IPv6); an ``argparse`` type."""
    try:
        return tcpproxy.parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_plan(text: str) -> FaultPlan:
    """Read a fault plan in text or JSON form; an ``argparse`` type."""
    try:
        return FaultPlan.parse(text)
    except PlanSyntaxError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _parse_upstream(text: str) -> Address:
    address = parse_address(text)
    if address[1] == 0:
        raise argparse.ArgumentTypeError(f"the upstream needs a real port, got {text!r}")
    return address


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        type=parse_address,
        required=True,
        metavar="HOST:PORT",
        help="where clients connect (port 0 picks a free one)",
    )
    parser.add_argument(
        "--upstream",
        type=_parse_upstream,
        required=True,
        metavar="HOST:PORT",
        help="the server every connection is relayed to",
    )
    parser.add_argument("--plan", type=parse_plan, default=FaultPlan.NONE, help=_PLAN_HELP)
    parser.add_argument(
        "--control",
        type=parse_address,
        metavar="HOST:PORT",
        help="serve the HTTP control API here: Toxiproxy's (/proxies, /proxies/NAME/toxics, "
        "/populate, /reset, /version), plus GET/POST /toxics, DELETE /toxics/ID and GET /stats "
        "on this proxy",
    )


def run(args: argparse.Namespace) -> int:
    try:
        trio.run(_serve, args)
    except OSError as exc:
        # The listeners could not be bound; everything later is handled per connection.
        print(f"rup faultproxy: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(args: argparse.Namespace) -> None:
    proxy: ChaosProxy | None = None
    try:
        async with open_chaos_proxy(
            args.upstream, args.plan, listen=args.listen, control=args.control
        ) as proxy:
            host, port = proxy.address
            upstream_host, upstream_port = proxy.upstream
            print(f"listening on {host}:{port}, relaying to {upstream_host}:{upstream_port}")
            if proxy.control_address is not None:
                control_host, control_port = proxy.control_address
                print(f"control API on http://{control_host}:{control_port}")
            print(f"plan: {proxy.plan.to_text()}", flush=True)
            await trio.sleep_forever()
    finally:
        if proxy is not None:
            print(json.dumps(proxy.stats().to_dict()), file=sys.stderr, flush=True)
