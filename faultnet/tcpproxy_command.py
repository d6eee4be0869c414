"""``rup faultproxy``: run the TCP chaos proxy from the command line.

With ``--listen`` and ``--upstream`` it runs one proxy and prints where it listens on its
first line of output (``listening on HOST:PORT, relaying to HOST:PORT``), then ``control
API on http://HOST:PORT`` when ``--control`` is given, then the plan. With ``--control``
alone it is a Toxiproxy-compatible server whose proxies are made through the API (or
``--config``). It relays until interrupted, and prints the first proxy's counters as JSON
on the way out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Final

import trio

from faultnet import cli_support
from faultnet.control import proxy_specs_from_json
from faultnet.plan import FaultPlan, PlanSyntaxError
from faultnet.profiles import PROFILES, Leg
from faultnet.tcpproxy import (
    DEFAULT_PROXY_NAME,
    Address,
    ProxyCollection,
    ProxySpec,
    format_address,
    open_proxy_collection,
)

__all__ = [
    "EXIT_CODES",
    "HELP",
    "configure",
    "parse_address",
    "parse_plan",
    "plan_from_arguments",
    "run",
]

HELP = "relay TCP connections to an upstream, injecting a fault plan's toxics"

EXIT_CODES: Final = {
    0: "stopped cleanly",
    1: "cannot listen (address in use, or not ours), or --config unreadable",
    2: "bad arguments",
    130: "interrupted (Ctrl-C)",
}

_PLAN_HELP = (
    "fault plan, as text (e.g. 'seed=7; latency:down(ms=50); reset_peer:up(after=64k)~0.3') "
    "or JSON; added after the --profile's toxics; default: no toxics"
)
_PROFILE_HELP = "network profile for the proxy: " + "; ".join(
    f"{name}: {profile.description}" for name, profile in PROFILES.items()
)


parse_address = cli_support.parse_address


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
    parser.epilog = cli_support.exit_codes_epilog(EXIT_CODES)
    parser.add_argument(
        "--listen",
        type=parse_address,
        metavar="HOST:PORT",
        help="where clients connect (port 0 picks a free one); goes with --upstream",
    )
    parser.add_argument(
        "--upstream",
        type=_parse_upstream,
        metavar="HOST:PORT",
        help="the server every connection is relayed to; goes with --listen",
    )
    parser.add_argument(
        "--plan", type=parse_plan, default=FaultPlan.NONE, metavar="PLAN", help=_PLAN_HELP
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), help=_PROFILE_HELP)
    parser.add_argument(
        "--leg",
        choices=[leg.value for leg in Leg],
        default=Leg.CLIENT.value,
        help="which leg of the --profile this proxy stands on: client (client <-> rup "
        "proxy) or gcs (rup proxy <-> GCS); default: %(default)s",
    )
    parser.add_argument(
        "--control",
        type=parse_address,
        metavar="HOST:PORT",
        help="serve the HTTP control API here: Toxiproxy's (/proxies, /proxies/NAME/toxics, "
        "/populate, /reset, /version), plus GET/POST /toxics, DELETE /toxics/ID and GET /stats "
        "on the first proxy",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="JSON list of proxies to create at start, as Toxiproxy's -config and /populate "
        "take them",
    )


def _fail(message: str, code: int) -> int:
    print(f"rup faultproxy: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    if (args.listen is None) != (args.upstream is None):
        return _fail("error: --listen and --upstream go together", 2)
    if args.listen is None and args.control is None and args.config is None:
        return _fail("error: give --listen and --upstream, or --control, or --config", 2)
    if args.profile is None and args.leg != Leg.CLIENT.value:
        return _fail("error: --leg needs a --profile", 2)
    if args.listen is None and (args.profile or args.plan.toxics):
        return _fail("error: --plan and --profile need --listen and --upstream", 2)
    specs: list[ProxySpec] = []
    if args.listen is not None:
        plan = plan_from_arguments(args)
        specs.append(
            ProxySpec(
                DEFAULT_PROXY_NAME, args.listen, args.upstream, toxics=plan.toxics, seed=plan.seed
            )
        )
    if args.config is not None:
        try:
            specs += proxy_specs_from_json(json.loads(args.config.read_text()))
        except (OSError, ValueError) as exc:
            return _fail(f"cannot read --config {args.config}: {exc}", 1)
    try:
        trio.run(_serve, specs, args.control)
    except OSError as exc:
        # The listeners could not be bound; everything later is handled per connection.
        addresses = [spec.listen for spec in specs] + ([args.control] if args.control else [])
        if len(addresses) == 1:
            return _fail(cli_support.listen_failure(addresses[0], exc), 1)
        return _fail(f"cannot listen: {cli_support.os_reason(exc)}", 1)
    return 0


def plan_from_arguments(args: argparse.Namespace) -> FaultPlan:
    """The --profile leg's toxics, then --plan's, with --plan's seed."""
    plan: FaultPlan = args.plan
    if args.profile is None:
        return plan
    network = PROFILES[args.profile].plan(Leg(args.leg))
    return dataclasses.replace(plan, toxics=network.toxics + plan.toxics)


async def _serve(specs: list[ProxySpec], control: Address | None) -> None:
    collection: ProxyCollection | None = None
    try:
        async with open_proxy_collection(specs, control=control) as collection:
            for proxy in collection.proxies():
                listening = format_address(proxy.address)
                relaying = format_address(proxy.upstream)
                prefix = "" if proxy.name == DEFAULT_PROXY_NAME else f"{proxy.name}: "
                print(f"{prefix}listening on {listening}, relaying to {relaying}")
            if collection.control_address is not None:
                print(f"control API on http://{format_address(collection.control_address)}")
            for proxy in collection.proxies():
                if proxy.name == DEFAULT_PROXY_NAME:
                    print(f"plan: {proxy.plan.to_text()}")
            sys.stdout.flush()
            await trio.sleep_forever()
    finally:
        if collection is not None and collection.proxies():
            stats = collection.proxies()[0].stats().to_dict()
            print(json.dumps(stats), file=sys.stderr, flush=True)
