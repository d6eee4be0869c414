"""Network profiles for benchmarks: what each leg's plan holds, that a connection through a
proxy with a profile's leg takes exactly the time the network would, and the command line."""

from __future__ import annotations

import argparse
import os
from contextlib import suppress
from functools import partial

import pytest
import trio
import trio.testing

from faultnet import tcpproxy_command as faultproxy_command
from faultnet.plan import Bandwidth, Direction, FaultPlan, Latency
from faultnet.profiles import MB, PROFILES, Leg, Link
from faultnet.tcpproxy import Address, open_chaos_proxy

UP, DOWN = Direction.UPSTREAM, Direction.DOWNSTREAM


def test_lan_has_no_toxics() -> None:
    assert PROFILES["lan"].client_leg == FaultPlan.NONE
    assert PROFILES["lan"].gcs_leg == FaultPlan.NONE


def test_wan_gives_each_leg_its_rate_and_latency_each_way() -> None:
    wan = PROFILES["wan"]
    assert wan.client_leg.toxics == (
        Bandwidth(direction=UP, rate=20 * MB),
        Latency(direction=UP, ms=10),
        Bandwidth(direction=DOWN, rate=20 * MB),
        Latency(direction=DOWN, ms=10),
    )
    assert wan.gcs_leg.toxics == (
        Bandwidth(direction=UP, rate=50 * MB),
        Latency(direction=UP, ms=5),
        Bandwidth(direction=DOWN, rate=50 * MB),
        Latency(direction=DOWN, ms=5),
    )
    assert wan.link(Leg.GCS).round_trip_seconds == pytest.approx(0.01)


def test_far_is_slow_and_distant_on_both_legs() -> None:
    far = PROFILES["far"]
    assert far.link(Leg.CLIENT) == far.link(Leg.GCS) == Link(rate=5 * MB, latency_ms=40)
    # a profile's plan reads back from its text, so it can go on any command line
    assert FaultPlan.parse(far.client_leg.to_text()) == far.client_leg


class Sink:
    """An upstream that counts what arrives and answers each 4-byte ping with a pong."""

    def __init__(self) -> None:
        self.received = 0
        self.last_arrival = 0.0
        self.finished = trio.Event()

    async def __call__(self, stream: trio.SocketStream) -> None:
        async with stream:
            with suppress(trio.BrokenResourceError):
                while data := await stream.receive_some(1024 * 1024):
                    self.received += len(data)
                    self.last_arrival = trio.current_time()
                    if data == b"ping":
                        await stream.send_all(b"pong")
            self.finished.set()


async def serve(nursery: trio.Nursery, sink: Sink) -> Address:
    listeners = await nursery.start(partial(trio.serve_tcp, sink, 0, host="127.0.0.1"))
    host, port = listeners[0].socket.getsockname()[:2]
    return host, port


@pytest.mark.parametrize(
    ("name", "leg"), [("wan", Leg.CLIENT), ("wan", Leg.GCS), ("far", Leg.CLIENT)]
)
async def test_a_connection_over_a_profile_leg_takes_the_networks_time(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery, name: str, leg: Leg
) -> None:
    mock_clock.autojump_threshold = 0.002
    link = PROFILES[name].link(leg)
    assert link.rate is not None
    sink = Sink()
    upstream = await serve(nursery, sink)
    size = link.rate // 5  # 0.2 s at the leg's rate
    async with (
        open_chaos_proxy(upstream, PROFILES[name].plan(leg)) as proxy,
        await trio.open_tcp_stream(*proxy.address) as stream,
    ):
        start = trio.current_time()
        await stream.send_all(b"ping")
        assert await stream.receive_some() == b"pong"
        assert trio.current_time() - start == pytest.approx(
            link.round_trip_seconds + 8 / link.rate, abs=1e-6
        )

        start = trio.current_time()
        await stream.send_all(os.urandom(size))
        await stream.send_eof()
        await sink.finished.wait()
        # every byte a latency late, and the link busy for size / rate
        assert sink.last_arrival - start == pytest.approx(
            size / link.rate + link.latency_ms / 1000, abs=1e-6
        )
    assert sink.received == 4 + size


def test_the_command_line_takes_a_profile_and_a_leg() -> None:
    parser = argparse.ArgumentParser(prog="rup faultproxy")
    faultproxy_command.configure(parser)
    where = ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"]
    args = parser.parse_args(
        [*where, "--profile", "wan", "--leg", "gcs", "--plan", "seed=3; corrupt(at=5)"]
    )

    plan = faultproxy_command.plan_from_arguments(args)

    assert plan.seed == 3
    assert plan.toxics == (
        *PROFILES["wan"].gcs_leg.toxics,
        *FaultPlan.parse("corrupt(at=5)").toxics,
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--leg", "gcs"], "--leg needs a"),
        (["--listen", "127.0.0.1:0"], "--listen and --upstream go together"),
        ([], "give --listen and --upstream, or --control"),
        (["--control", "127.0.0.1:0", "--profile", "wan"], "need --listen and --upstream"),
    ],
)
def test_the_command_line_refuses_arguments_that_do_not_go_together(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="rup faultproxy")
    faultproxy_command.configure(parser)

    assert faultproxy_command.run(parser.parse_args(arguments)) == 2

    [error] = capsys.readouterr().err.splitlines()
    assert error.startswith("rup faultproxy: error: ")
    assert message in error


def test_an_unknown_profile_is_refused_with_the_known_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser(prog="rup faultproxy")
    faultproxy_command.configure(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--profile", "moon"])
    assert "choose from 'far', 'lan', 'wan'" in capsys.readouterr().err
