"""The chaos proxy's HTTP control API: Toxiproxy's, plus rup's own few routes.

Toxiproxy's API (its clients work unchanged; shapes in :mod:`faultnet.toxiproxy_json`):

- ``GET /proxies``: every proxy with its toxics, by name;
- ``POST /proxies``: create one (``name``, ``listen``, ``upstream``, ``enabled``; rup also
  takes ``toxics``, attached before the proxy listens); 201, 409 if the name is taken;
- ``POST /populate``: create or replace a list of proxies; 201 with ``{"proxies": [...]}``;
- ``GET``, ``POST`` (or ``PATCH``), ``DELETE /proxies/{proxy}``: show, update (``listen``,
  ``upstream``, ``enabled``), delete (204);
- ``GET``, ``POST /proxies/{proxy}/toxics``: list, add (200 with the toxic; 409 if the
  name is taken);
- ``GET``, ``POST`` (or ``PATCH``), ``DELETE /proxies/{proxy}/toxics/{toxic}``;
- ``POST /reset``: enable every proxy, remove every toxic and zero the counters; 204;
- ``GET /version``: ``{"version": ...}``.

Errors answer ``{"error": message, "status": code}``, as Toxiproxy's do. As Toxiproxy's,
the API refuses browsers (a ``User-Agent`` starting ``Mozilla/``) with a 403, so that a
web page cannot reconfigure the proxies behind a cross-site request.

rup's routes, on the first proxy the process holds (the one ``rup faultproxy --listen``
makes), with rup's attribute names and units and ``up`` as the default direction:

- ``GET``, ``POST /toxics``, ``DELETE /toxics/{index or name}``, ``GET /stats``;
- ``GET /proxies/{proxy}/stats`` gives any proxy's counters.

A toxic change made through Toxiproxy's routes reaches the connections already open, as
Toxiproxy's does; one made through rup's ``/toxics`` applies to the connections accepted
afterwards only, as a network that changes under new flows.
"""

from __future__ import annotations

from functools import partial
from importlib import metadata
from typing import Any

import trio

from faultnet.http_json import HTTPError, Request, Response, serve_json
from faultnet.plan import PlanSyntaxError, Toxic, toxic_from_dict
from faultnet.tcpproxy import (
    Address,
    ChaosProxy,
    DuplicateToxicError,
    NamedToxic,
    ProxyCollection,
    ProxyExistsError,
    ProxyLimitError,
    ProxyNotFoundError,
    ProxySpec,
    ToxicNotFoundError,
    is_toxic_index,
    parse_address,
)
from faultnet.toxiproxy_json import proxy_to_json, toxic_from_json, toxic_to_json

__all__ = ["TOXIPROXY_API_VERSION", "proxy_specs_from_json", "serve_control"]

#: the Toxiproxy API version whose routes and shapes this serves
TOXIPROXY_API_VERSION = "2.0.0"


class _ToxiproxyError(HTTPError):
    """An error on a Toxiproxy route: its body carries the status too, as Toxiproxy's."""

    def response(self) -> Response:
        return Response(self.status, {"error": self.message, "status": self.status})


async def serve_control(
    collection: ProxyCollection,
    address: Address,
    *,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control API for ``collection`` on ``address`` until cancelled.

    Reports the bound address through ``task_status``. Cancelling it drops any request in
    progress without an answer.
    """
    listeners = await trio.open_tcp_listeners(address[1], host=address[0])
    host, port = listeners[0].socket.getsockname()[:2]
    for extra in listeners[1:]:
        await extra.aclose()
    task_status.started((host, port))
    await serve_json(listeners[:1], partial(_route, collection))


def _version() -> str:
    try:
        rup = metadata.version("reliable-upload-proxy")
    except metadata.PackageNotFoundError:
        rup = "unknown"
    return f"{TOXIPROXY_API_VERSION}+rup.{rup}"


# -- routing -----------------------------------------------------------------------------

#: the methods each route shape takes, for the 405 answer; "*" stands for a name
_ALLOWED_METHODS = {
    ("toxics",): "GET, POST",
    ("toxics", "*"): "DELETE",
    ("stats",): "GET",
    ("reset",): "POST",
    ("version",): "GET",
    ("populate",): "POST",
    ("proxies",): "GET, POST",
    ("proxies", "*"): "GET, POST, PATCH, DELETE",
    ("proxies", "*", "toxics"): "GET, POST",
    ("proxies", "*", "toxics", "*"): "GET, POST, PATCH, DELETE",
    ("proxies", "*", "stats"): "GET",
}


async def _route(collection: ProxyCollection, request: Request) -> Response:
    if request.headers.get("user-agent", "").startswith("Mozilla/"):
        # As Toxiproxy does: a web page must not reconfigure proxies through the browser
        # (a cross-site form POST needs no preflight, and proxies listen where told).
        raise _ToxiproxyError(403, "user agent not allowed: browsers may not use this API")
    segments = tuple(s for s in request.path.split("/") if s)
    if segments[:1] in (("toxics",), ("stats",)):
        response = _route_rup(collection, request.method, segments, request)
    else:
        try:
            response = await _route_toxiproxy(collection, request.method, segments, request)
        except HTTPError as exc:
            raise _ToxiproxyError(exc.status, exc.message) from exc
    if response is not None:
        return response
    shape = tuple("*" if i % 2 else s for i, s in enumerate(segments))
    allowed = _ALLOWED_METHODS.get(shape)
    if allowed is not None:
        return Response(
            405, {"error": f"{request.method} not allowed; use {allowed}"}, (("Allow", allowed),)
        )
    return Response(404, {"error": f"no such resource {request.path[:100]!r}"})


async def _route_toxiproxy(
    collection: ProxyCollection, method: str, segments: tuple[str, ...], request: Request
) -> Response | None:
    try:
        match method, segments:
            case "GET", ("version",):
                return Response(200, {"version": _version()})
            case "POST", ("reset",):
                await collection.reset()
                return Response(204)
            case "GET", ("proxies",):
                return Response(200, {p.name: proxy_to_json(p) for p in collection.proxies()})
            case "POST", ("proxies",):
                proxy = await collection.create(_proxy_spec(request.json()))
                return Response(201, proxy_to_json(proxy))
            case "POST", ("populate",):
                specs = _populate_specs(request.json())
                proxies = await collection.populate(specs)
                return Response(201, {"proxies": [proxy_to_json(p) for p in proxies]})
            case "GET", ("proxies", name):
                return Response(200, proxy_to_json(collection.get(name)))
            case "POST" | "PATCH", ("proxies", name):
                return Response(200, proxy_to_json(await _update_proxy(collection, name, request)))
            case "DELETE", ("proxies", name):
                await collection.delete(name)
                return Response(204)
            case "GET", ("proxies", name, "stats"):
                return Response(200, collection.get(name).stats().to_dict())
            case "GET", ("proxies", name, "toxics"):
                return Response(200, [toxic_to_json(t) for t in collection.get(name).toxics()])
            case "POST", ("proxies", name, "toxics"):
                proxy = collection.get(name)
                wanted = toxic_from_json(request.json())
                added = proxy.add_toxic(wanted.toxic, wanted.name, live=True)
                return Response(200, toxic_to_json(added))
            case "GET", ("proxies", name, "toxics", toxic):
                return Response(200, toxic_to_json(collection.get(name).toxic(toxic)))
            case "POST" | "PATCH", ("proxies", name, "toxics", toxic):
                proxy = collection.get(name)
                updated = toxic_from_json(request.json(), existing=proxy.toxic(toxic))
                replaced = proxy.replace_toxic(toxic, updated.toxic, live=True)
                return Response(200, toxic_to_json(replaced))
            case "DELETE", ("proxies", name, "toxics", toxic):
                collection.get(name).remove_toxic(toxic, live=True)
                return Response(204)
    except (ProxyNotFoundError, ToxicNotFoundError) as exc:
        raise HTTPError(404, str(exc)) from exc
    except (ProxyExistsError, DuplicateToxicError) as exc:
        raise HTTPError(409, str(exc)) from exc
    except ProxyLimitError as exc:
        raise HTTPError(429, str(exc)) from exc
    except OSError as exc:
        raise HTTPError(409, f"cannot listen: {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise HTTPError(400, str(exc)) from exc
    return None


def _proxy_spec(data: Any) -> ProxySpec:
    """A proxy in Toxiproxy's shape (``toxics`` is rup's extension)."""
    if not isinstance(data, dict):
        raise HTTPError(400, "a proxy must be a JSON object")
    for required in ("name", "upstream"):
        if not isinstance(data.get(required), str) or not data[required]:
            raise HTTPError(400, f"missing required field: {required}")
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise HTTPError(400, f"'enabled' must be true or false, got {enabled!r}")
    toxics = data.get("toxics", [])
    if not isinstance(toxics, list):
        raise HTTPError(400, "a proxy's 'toxics' must be a list")
    requests = [toxic_from_json(t) for t in toxics]
    names = [r.name for r in requests]
    if len(set(names)) != len(names):
        raise HTTPError(409, "a proxy's toxics must have distinct names")
    return ProxySpec(
        name=data["name"],
        listen=_address(data.get("listen", "127.0.0.1:0"), "listen"),
        upstream=_address(data["upstream"], "upstream"),
        enabled=enabled,
        toxics=tuple(NamedToxic(name=r.name, toxic=r.toxic) for r in requests),
    )


def proxy_specs_from_json(data: Any) -> list[ProxySpec]:
    """Proxies as ``/populate`` and Toxiproxy's ``-config`` file take them: a list (or
    ``{"proxies": [...]}``) of proxies in Toxiproxy's shape. :class:`ValueError` if not."""
    try:
        return _populate_specs(data)
    except HTTPError as exc:
        raise ValueError(exc.message) from exc


def _populate_specs(data: Any) -> list[ProxySpec]:
    # Toxiproxy takes a bare list; its config files also come as {"proxies": [...]}.
    proxies = data.get("proxies") if isinstance(data, dict) else data
    if not isinstance(proxies, list):
        raise HTTPError(400, "populate takes a list of proxies")
    return [_proxy_spec(p) for p in proxies]


async def _update_proxy(collection: ProxyCollection, name: str, request: Request) -> ChaosProxy:
    data = request.json()
    if not isinstance(data, dict):
        raise HTTPError(400, "a proxy update must be a JSON object")
    enabled = data.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise HTTPError(400, f"'enabled' must be true or false, got {enabled!r}")
    listen = data.get("listen")
    upstream = data.get("upstream")
    return await collection.update(
        name,
        listen=_address(listen, "listen") if listen is not None else None,
        upstream=_address(upstream, "upstream") if upstream is not None else None,
        enabled=enabled,
    )


def _address(value: Any, what: str) -> Address:
    if not isinstance(value, str):
        raise HTTPError(400, f"{what} must be a HOST:PORT string, got {value!r}")
    try:
        return parse_address(value)
    except ValueError as exc:
        raise HTTPError(400, f"{what}: {exc}") from exc


# -- rup's own routes ----------------------------------------------------------------------


def _route_rup(
    collection: ProxyCollection, method: str, segments: tuple[str, ...], request: Request
) -> Response | None:
    proxies = collection.proxies()
    if not proxies:
        raise HTTPError(404, "no proxy yet; create one with POST /proxies")
    proxy = proxies[0]
    try:
        match method, segments:
            case "GET", ("toxics",):
                return Response(200, _toxics_listing(proxy))
            case "POST", ("toxics",):
                toxic, name = _toxic_from_body(request)
                named = proxy.add_toxic(toxic, name)
                return Response(201, {"index": len(proxy.toxics()) - 1, **named.to_dict()})
            case "DELETE", ("toxics", key):
                removed = proxy.remove_toxic(int(key) if is_toxic_index(key) else key)
                return Response(200, {"removed": removed.to_dict()})
            case "GET", ("stats",):
                return Response(200, proxy.stats().to_dict())
    except ToxicNotFoundError as exc:
        raise HTTPError(404, str(exc)) from exc
    except DuplicateToxicError as exc:
        raise HTTPError(409, str(exc)) from exc
    except ProxyLimitError as exc:
        raise HTTPError(429, str(exc)) from exc
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from exc
    return None


def _toxics_listing(proxy: ChaosProxy) -> dict[str, Any]:
    return {
        "plan": proxy.plan.to_text(),
        "toxics": [{"index": i, **t.to_dict()} for i, t in enumerate(proxy.toxics())],
    }


_DIRECTION_NAMES = ("up", "down", "upstream", "downstream")


def _toxic_from_body(request: Request) -> tuple[Toxic, str | None]:
    """Read a toxic in rup's JSON shape, where ``stream`` may name the direction."""
    data = request.json()
    if not isinstance(data, dict):
        raise HTTPError(400, "a toxic must be a JSON object")
    name = data.pop("name", None)
    if name is not None and not isinstance(name, str):
        raise HTTPError(400, f"a toxic's name must be a string, got {name!r}")
    if "direction" not in data and "stream" in data:
        data["direction"] = data.pop("stream")
    if data.get("direction", "up") not in _DIRECTION_NAMES:
        raise HTTPError(400, f"direction must be one of {', '.join(_DIRECTION_NAMES)}")
    try:
        return toxic_from_dict(data), name
    except (TypeError, ValueError) as exc:
        message = str(exc) if isinstance(exc, PlanSyntaxError) else f"malformed toxic: {exc}"
        raise HTTPError(400, message) from exc
