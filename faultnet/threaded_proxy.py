"""A chaos proxy for blocking code: the trio proxy runs on a thread of its own.

:func:`~faultnet.tcpproxy.open_chaos_proxy` is for trio code. Blocking code (tests with
google-cloud-storage or requests, the pytest plugin's ``chaos_proxy`` fixture) uses
:func:`chaos_proxy_in_thread`, whose :class:`ThreadedChaosProxy` forwards each call to the
proxy's trio thread. Those calls block until the proxy thread has made the change, so none
may be made from a trio task (trio refuses): trio code uses ``open_chaos_proxy`` instead,
or the Toxiproxy HTTP API at :attr:`ThreadedChaosProxy.control_url`.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import trio

from faultnet.plan import FaultPlan, Toxic
from faultnet.tcpproxy import (
    DEFAULT_PROXY_NAME,
    Address,
    ChaosProxy,
    NamedToxic,
    ProxyStats,
    format_address,
    open_chaos_proxy,
)

__all__ = ["ThreadedChaosProxy", "chaos_proxy_in_thread"]

_T = TypeVar("_T")

#: how long starting or stopping the proxy thread may take before it counts as hung
_THREAD_TIMEOUT = 30.0


class ThreadedChaosProxy:
    """A running :class:`~faultnet.tcpproxy.ChaosProxy`, driven from any non-trio thread.

    Toxic changes apply to connections accepted afterwards, and with ``live=True`` to the
    open ones too (see :mod:`faultnet.tcpproxy`). A toxic may be given as a
    :class:`~faultnet.plan.Toxic` or in the plan syntax (``"reset_peer:up(after=300k)"``).
    """

    def __init__(self, proxy: ChaosProxy, token: trio.lowlevel.TrioToken) -> None:
        self._proxy = proxy
        self._token = token

    def _call(self, function: Callable[[], _T]) -> _T:
        return trio.from_thread.run_sync(function, trio_token=self._token)

    @property
    def name(self) -> str:
        """The proxy's name in the Toxiproxy API."""
        return self._proxy.name

    @property
    def address(self) -> Address:
        """Where clients connect instead of the upstream."""
        return self._proxy.address

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of :attr:`address`, for HTTP upstreams."""
        return f"http://{format_address(self.address)}"

    @property
    def upstream(self) -> Address:
        return self._proxy.upstream

    @property
    def control_url(self) -> str | None:
        """The Toxiproxy-compatible HTTP API, if the proxy was started with one."""
        control = self._proxy.control_address
        return None if control is None else f"http://{format_address(control)}"

    def toxics(self) -> tuple[NamedToxic, ...]:
        return self._call(self._proxy.toxics)

    def add_toxic(
        self, toxic: Toxic | str, name: str | None = None, *, live: bool = False
    ) -> NamedToxic:
        return self._call(
            functools.partial(self._proxy.add_toxic, _one_toxic(toxic), name, live=live)
        )

    def remove_toxic(self, key: int | str, *, live: bool = False) -> NamedToxic:
        return self._call(functools.partial(self._proxy.remove_toxic, key, live=live))

    def reset(self, *, live: bool = False) -> None:
        """Remove every toxic and zero the counters."""
        self._call(functools.partial(self._proxy.reset, live=live))

    def stats(self) -> ProxyStats:
        return self._call(self._proxy.stats)


def _one_toxic(toxic: Toxic | str) -> Toxic:
    if isinstance(toxic, Toxic):
        return toxic
    toxics = FaultPlan.parse(toxic).toxics
    if len(toxics) != 1:
        raise ValueError(f"expected one toxic, got {len(toxics)}: {toxic!r}")
    return toxics[0]


@contextlib.contextmanager
def chaos_proxy_in_thread(
    upstream: Address,
    plan: FaultPlan | str = FaultPlan.NONE,
    *,
    listen: Address = ("127.0.0.1", 0),
    control: Address | None = None,
    name: str = DEFAULT_PROXY_NAME,
) -> Iterator[ThreadedChaosProxy]:
    """Run a chaos proxy in front of ``upstream`` on a new thread, for the ``with`` block.

    ``plan`` is a :class:`~faultnet.plan.FaultPlan` or its text form. With ``control``
    (port 0: any free one) the Toxiproxy HTTP API is served too. Leaving the block closes
    every relayed connection and the listeners, and joins the thread; a failure to listen
    (e.g. the port is taken) is raised here.
    """
    if isinstance(plan, str):
        plan = FaultPlan.parse(plan)
    running = plan  # narrowed for the closure
    started: queue.SimpleQueue[tuple[ChaosProxy, trio.lowlevel.TrioToken] | BaseException] = (
        queue.SimpleQueue()
    )
    stop: list[trio.Event] = []

    async def serve() -> None:
        try:
            async with open_chaos_proxy(
                upstream, running, listen=listen, control=control, name=name
            ) as proxy:
                stop.append(trio.Event())
                started.put((proxy, trio.lowlevel.current_trio_token()))
                await stop[0].wait()
        except BaseException as exc:
            if stop:
                raise  # after the start: the thread's own failure
            started.put(exc)  # before it: the caller re-raises it

    thread = threading.Thread(target=trio.run, args=(serve,), name="chaos-proxy", daemon=True)
    thread.start()
    outcome = started.get(timeout=_THREAD_TIMEOUT)
    if isinstance(outcome, BaseException):
        thread.join(_THREAD_TIMEOUT)
        raise outcome
    proxy, token = outcome
    try:
        yield ThreadedChaosProxy(proxy, token)
    finally:
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(stop[0].set, trio_token=token)
        thread.join(_THREAD_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("the chaos proxy thread did not stop")
